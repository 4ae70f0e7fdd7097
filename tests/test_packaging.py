"""localvault as a package: consistent dependency lists, and a wheel that works outside the clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# The regular expression that PEP 723 gives for reading a script's metadata block.
PEP723_BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _script_metadata() -> dict:
    text = (ROOT / "kv_keys.py").read_text(encoding="utf-8")
    blocks = [m for m in PEP723_BLOCK.finditer(text) if m.group("type") == "script"]
    assert len(blocks) == 1, "kv_keys.py must have exactly one `# /// script` block"
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:] for line in blocks[0]["content"].splitlines(True)
    )
    return tomllib.loads(content)


def _requirements_txt() -> List[str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _by_name(requirements: List[str]) -> Dict[str, str]:
    """Each package with its version specifier, e.g. {"pyjwt": ">=2.8.0"}; a package twice is an error."""
    parsed = [Requirement(text) for text in requirements]
    names = [canonicalize_name(r.name) for r in parsed]
    assert len(set(names)) == len(names), f"a package is listed twice: {requirements}"
    return {canonicalize_name(r.name): str(r.specifier) for r in parsed}


def test_package_metadata_declares_exactly_requirements_txt():
    assert _by_name(_pyproject()["project"]["dependencies"]) == _by_name(_requirements_txt())


def test_script_metadata_declares_exactly_requirements_txt():
    """`uv run kv_keys.py` gets the same packages, with the same lower bounds, as requirements.txt."""
    assert _by_name(_script_metadata()["dependencies"]) == _by_name(_requirements_txt())


def test_script_and_package_need_the_same_python():
    assert _script_metadata()["requires-python"] == _pyproject()["project"]["requires-python"]


def test_readme_test_command_is_what_ci_runs():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci_lines
    assert "pip install -r requirements-dev.txt && python -m pytest -q\n" in readme


# -- the wheel, installed into a fresh venv ---------------------------------------------------------

OUTSIDE_TEST = textwrap.dedent(
    """
    import importlib
    import sys


    def test_fixtures_come_from_the_installed_package(localvault, key_client, unique_key_name):
        package = importlib.import_module("localvault")
        plugin = importlib.import_module("localvault.pytest_plugin")
        assert package.__file__.startswith(sys.prefix), package.__file__
        assert plugin.__file__.startswith(sys.prefix), plugin.__file__
        key = key_client.create_ec_key(unique_key_name)
        assert key.id.startswith(localvault.url + "/keys/")
        assert key_client.get_key(unique_key_name).id == key.id


    def test_unchanged_async_code_at_a_real_address(vault_url):
        import asyncio

        import aiohttp  # imported after the plugin set SSL_CERT_FILE, as a user's module would be
        from azure.identity.aio import DefaultAzureCredential
        from azure.keyvault.keys.aio import KeyClient

        async def main():
            async with DefaultAzureCredential() as credential, KeyClient(vault_url, credential) as client:
                key = await client.create_ec_key("mine")
                return key.id, [k.name async for k in client.list_properties_of_keys()]

        key_id, names = asyncio.run(main())
        assert aiohttp and key_id.startswith(vault_url + "/keys/mine/") and names == ["mine"]
    """
)
# What the plugin set in os.environ, read when the process exits: after the run, it must be gone.
OUTSIDE_CONFTEST = textwrap.dedent(
    """
    import atexit
    import json
    import os

    NAMES = ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "IDENTITY_ENDPOINT")


    @atexit.register
    def report():
        with open("environ-after-run.json", "w") as file:
            json.dump({name: os.environ.get(name) for name in NAMES}, file)
    """
)


def _site_packages() -> List[str]:
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]


def _run(args: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Path]]:
    """A fresh venv with the project's wheel installed, offline; it sees this environment's packages."""
    base = tmp_path_factory.mktemp("packaging")
    prefixes = ("PYTHON", "PIP_", "PYTEST_", "KEY_VAULT_", "IDENTITY_", "LOCALVAULT_", "AZURE_", "MSI_")
    proxies_and_trust = (
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(prefixes) and k.upper() not in proxies_and_trust
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    # Build from a copy, so that the build leaves no build/ or *.egg-info in the clone.
    source = base / "source"
    source.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "localvault", source / "localvault", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = base / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(wheels)],
        base,
        env,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")

    target = base / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env
    ).stdout.strip()
    # After its own site-packages, the venv sees this one's: pytest, pip, the Azure SDK.
    Path(purelib, "outer-site-packages.pth").write_text("\n".join(_site_packages()) + "\n", encoding="utf-8")
    _run(
        [str(python), "-m", "pip", "install", str(wheel), "--no-index", "--no-deps", "--ignore-installed",
         "--disable-pip-version-check", "--quiet"],
        base,
        env,
    )  # fmt: skip

    project = base / "elsewhere"  # a project of its own, outside the clone
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (project / "test_outside.py").write_text(OUTSIDE_TEST, encoding="utf-8")
    (project / "conftest.py").write_text(OUTSIDE_CONFTEST, encoding="utf-8")
    yield {"python": python, "bin": python.parent, "project": project, "env": env}  # type: ignore[misc]


def test_installed_plugin_gives_the_fixtures_without_any_option(installed):
    result = _run(
        [str(installed["python"]), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        installed["project"],
        installed["env"],
    )
    assert "2 passed" in result.stdout
    after = json.loads((installed["project"] / "environ-after-run.json").read_text(encoding="utf-8"))
    assert after == dict.fromkeys(after), after  # the plugin put os.environ back as it found it


def test_installed_plugin_and_this_repositorys_option_do_not_clash(installed):
    """This repository's addopts name the plugin with -p; installed, it must not register twice."""
    result = _run(
        [str(installed["python"]), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "localvault.pytest_plugin"],
        installed["project"],
        installed["env"],
    )  # fmt: skip
    assert "2 passed" in result.stdout


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        (["localvault"], "usage: localvault "),
        (["python", "-m", "localvault"], "usage: python -m localvault "),
    ],
)
def test_commands_name_themselves_in_their_usage(installed, command, usage):
    executable = installed["bin"] / command[0]
    result = _run([str(executable), *command[1:], "--help"], installed["project"], installed["env"])
    assert result.stdout.startswith(usage)
    assert "--retention-days" in result.stdout
