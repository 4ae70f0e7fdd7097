"""kv_keys.py as a subprocess, before any vault is involved: --help and input errors never import the Azure SDK,
and a copy of the script outside the clone says plainly that localvault is not there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from helpers import KV_KEYS, REPO, error_lines


@pytest.mark.parametrize(
    ("argv", "stdin", "extra", "code"),
    [
        (["--help"], "", {}, 0),
        (["--name", "bad_name"], "", {}, 2),
        (["--name", "ok"], "", {"KEY_VAULT_NAME": "x"}, 2),
        ([], "", {}, 2),  # end of input at the prompt
        ([], "bad name\n", {"KEY_VAULT_NAME": "my-vault"}, 2),
        # an empty --vault-url; the fallback it must not take is a loopback port where nothing listens
        (["--name", "ok", "--vault-url", ""], "", {"KEY_VAULT_URL": "https://127.0.0.1:9"}, 2),
        (["--name", "ok", "--vault-url", "https://127.0.0.1:"], "", {}, 2),  # an empty port
        (  # a stale LOCALVAULT_CA_FILE (relative to the clone, where no such file is)
            ["--name", "ok", "--vault-url", "https://127.0.0.1:9"],
            "",
            {"LOCALVAULT_CA_FILE": "no-such-localvault-dir/ca.pem"},
            5,
        ),
        (  # a loopback vault with a remote identity endpoint
            ["--name", "ok", "--vault-url", "https://127.0.0.1:9"],
            "",
            {
                "IDENTITY_ENDPOINT": "http://169.254.169.254/metadata/identity/oauth2/token",
                "IDENTITY_HEADER": "x",
            },
            2,
        ),
        (  # a loopback vault with half of localvault's identity variables, and a name still to ask for
            ["--vault-url", "https://127.0.0.1:9"],
            "never-read\n",
            {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/msi/token"},
            3,
        ),
    ],
)
def test_help_and_input_errors_do_not_import_azure(
    argv: List[str], stdin: str, extra: Dict[str, str], code: int, clean_env: Dict[str, str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", KV_KEYS, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env={**clean_env, **extra},
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert imported, "no -X importtime output"
    assert not [
        module for module in imported if module.startswith(("azure", "localvault", "requests", "msal"))
    ]
    if code == 3:
        assert "Input a name" not in result.stdout  # every variable is checked before the prompt


def test_outside_the_clone_without_a_vault(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    # kv_keys.py copied elsewhere, where `localvault` cannot be imported (nor anything else from the clone).
    script = tmp_path / "kv_keys.py"
    shutil.copy(KV_KEYS, script)
    result = subprocess.run(
        [sys.executable, "-I", str(script), "--name", "outside-key"],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert lines[0] == "error: no vault configured, and the localvault package is not here to start one"
    assert "run kv_keys.py from a clone" in lines[1] and "KEY_VAULT_NAME" in lines[1]
    assert result.stdout == ""  # no claim that localvault started


@pytest.mark.parametrize(
    "extra", [{"KEY_VAULT_NAME": "my-vault"}, {}], ids=["a vault in Azure", "the embedded localvault"]
)
def test_a_python_without_the_azure_sdk_says_which_python(extra: Dict[str, str], clean_env: Dict[str, str]) -> None:
    # -S: no site-packages, as in a terminal where the venv is not activated. localvault is still found beside
    # the script, so the embedded case gets as far as the SDK import too.
    result = subprocess.run(
        [sys.executable, "-S", KV_KEYS, "--name", "no-sdk-key"],
        capture_output=True,
        text=True,
        env={**clean_env, **extra},
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert lines == [
        f"error: the Azure SDK is not installed in this Python, {sys.executable} (no module named 'azure')",
        "hint: activate the virtual environment that has it (. .venv/bin/activate), or install it here: "
        "pip install -r requirements.txt",
    ]
    assert result.stdout == ""
