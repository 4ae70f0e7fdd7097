"""``python -m localvault`` as a user runs it: a subprocess, its exports, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from helpers import EXPORTED_NAMES

from localvault.cli import read_exports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDK_PROGRAM = textwrap.dedent(
    """
    import os
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys import KeyClient

    client = KeyClient(
        os.environ["LOCALVAULT_URL"],
        DefaultAzureCredential(),
        verify_challenge_resource=False,
        connection_verify=os.environ["LOCALVAULT_CA_FILE"],
    )
    key = client.create_rsa_key("cli-key", size=2048)
    assert client.get_key("cli-key").id == key.id
    assert [p.name for p in client.list_properties_of_keys()] == ["cli-key"]
    client.begin_delete_key("cli-key").wait()
    client.begin_recover_deleted_key("cli-key").wait()
    client.begin_delete_key("cli-key").wait()
    client.purge_deleted_key("cli-key")
    print("OK", key.properties.version)
    """
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KEY_VAULT_URL", "LOCALVAULT_CA_FILE")}
    env = {k: v for k, v in env.items() if not k.startswith(("IDENTITY_", "AZURE_", "MSI_"))}
    env["PYTHONPATH"] = ROOT
    return env


def _start(*args: str) -> tuple:
    process = subprocess.Popen(
        [sys.executable, "-m", "localvault", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
        cwd=ROOT,
    )
    exports = read_exports(process.stdout)
    return process, exports


def _stop(process: subprocess.Popen) -> tuple:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_standalone_serves_a_separate_sdk_process():
    process, exports = _start("--port", "0")
    try:
        assert set(exports) == set(EXPORTED_NAMES)
        env = dict(_clean_env(), **exports)
        env.pop("PYTHONPATH")  # plain azure-identity and azure-keyvault-keys, nothing of ours
        result = subprocess.run(
            [sys.executable, "-c", SDK_PROGRAM], env=env, capture_output=True, text=True, timeout=120, cwd="/"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("OK ")
    finally:
        code, out, err = _stop(process)
    assert code == 0, err
    assert "localvault stopped" in out
    assert "Traceback" not in err


def test_ctrl_c_exits_zero():
    process, exports = _start("--port", "0")
    assert exports
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "localvault", "--port", str(port)],
            capture_output=True,
            text=True,
            env=_clean_env(),
            cwd=ROOT,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0]


@pytest.mark.parametrize("option", ["--host", "--port", "--identity-port", "--retention-days"])
def test_help_documents_every_option(option):
    result = subprocess.run(
        [sys.executable, "-m", "localvault", "--help"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0
    assert option in result.stdout


@pytest.mark.parametrize("days", ["6", "91", "x"])
def test_bad_retention_is_a_usage_error(days):
    result = subprocess.run(
        [sys.executable, "-m", "localvault", "--retention-days", days],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--retention-days" in result.stderr


def test_retention_days_option_reaches_the_vault():
    process, exports = _start("--port", "0", "--retention-days", "7")
    try:
        env = dict(_clean_env(), **exports)
        program = SDK_PROGRAM.split("key = client")[0] + textwrap.dedent(
            """
            client.create_ec_key("short")
            deleted = client.begin_delete_key("short").result()
            print(deleted.properties.recoverable_days, deleted.properties.recovery_level == "CustomizedRecoverable+Purgeable")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["7", "True"]
    finally:
        code, _, err = _stop(process)
    assert code == 0, err


def test_non_loopback_host_warns():
    process, exports = _start("--host", "0.0.0.0", "--port", "0")
    code, _, err = _stop(process)
    assert code == 0
    assert "warning" in err and "not loopback" in err
    assert exports["LOCALVAULT_URL"].startswith("https://127.0.0.1:")
