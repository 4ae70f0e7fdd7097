"""The benchmarks still run: the soak with tiny parameters, and the check it ends with. No timing is
asserted here; the figures belong to the benchmarks themselves."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "localvault_soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("localvault_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def test_the_soak_runs_and_judges_errors_and_lost_writes(tmp_path: Path) -> None:
    command = [sys.executable, str(SOAK), "--clients", "2", "--seconds", "1", "--warmup-requests", "20"]
    command += ["--no-timing-targets", "--data-parent", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    for operation in soak.OPERATIONS:
        assert operation in rows
    targets = [line for line in done.stdout.splitlines() if line.startswith(("errors:", "lost writes:"))]
    assert len(targets) == 2 and all(line.endswith("PASS") for line in targets), done.stdout
    assert "not judged" in done.stdout
    assert not list(tmp_path.iterdir())  # the --data run's directory is gone


@pytest.mark.parametrize("argument", ["--clients=0", "--seconds=0", "--warmup-requests=-1"])
def test_a_bad_argument_is_one_line_and_exit_2(argument: str) -> None:
    done = subprocess.run([sys.executable, str(SOAK), argument], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("localvault_soak.py: error:")
    assert "Traceback" not in done.stderr


def test_the_final_check_finds_what_the_vault_does_not_hold(key_client, unique_key_name: str) -> None:
    created = key_client.create_ec_key(unique_key_name, tags={"write": "1"})
    rotated = key_client.rotate_key(unique_key_name)
    versions = [created.properties.version, rotated.properties.version]
    model = soak.KeyModel(unique_key_name, "active", versions, {"write": "1"})
    assert soak.verify(key_client, model) == []

    lost_version = soak.KeyModel(unique_key_name, "active", [*versions, "0" * 32], {"write": "1"})
    lost_tags = soak.KeyModel(unique_key_name, "active", versions, {"write": "2"})
    not_deleted = soak.KeyModel(unique_key_name, "deleted", versions, {"write": "1"})
    for wrong in (lost_version, lost_tags, not_deleted):
        problems = soak.verify(key_client, wrong)
        assert problems and all(line.startswith(f"{unique_key_name}: ") for line in problems)

    key_client.begin_delete_key(unique_key_name).wait()
    assert soak.verify(key_client, not_deleted) == []
    assert soak.verify(key_client, model) == [
        f"{unique_key_name}: the vault has it deleted, the client left it active"
    ]


def test_the_proxy_benchmark_runs_both_modes() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "localvault_proxy.py")]
    command += ["--clients", "1", "--seconds", "0.3", "--rounds", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for operation in ("get_key", "RS256 sign"):
        for mode in ("direct", "proxy"):
            assert any(
                line.split(":")[0].split() == [*operation.split(), mode] for line in done.stdout.splitlines()
            )
        assert f"{operation} direct/proxy throughput: " in done.stdout


def test_the_scale_benchmark_runs_and_prints_each_figure() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "localvault_scale.py")]
    command += ["--small", "2", "--large", "30", "--list-sizes", "5,30", "--requests", "5", "--rounds", "1"]
    command += ["--versions", "2,20", "--writes", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for count in (2, 30):
        assert any(line.startswith(f"get_key at {count} keys: p50 ") for line in lines), done.stdout
    for count in (5, 30):
        assert any(line.startswith(f"listing {count} keys: ") for line in lines), done.stdout
    for count in (2, 20):
        assert any(line.startswith(f"update_key_properties on a key of {count} versions") for line in lines)
    verdicts = [line for line in lines if "(target at most 1.2x: " in line]
    assert len(verdicts) == 3, done.stdout
    assert any(line.startswith("a write at 20 versions against 2: ") for line in lines), done.stdout


def test_the_scale_benchmark_refuses_a_bad_size_in_one_line() -> None:
    script = str(ROOT / "benchmarks" / "localvault_scale.py")
    done = subprocess.run([sys.executable, script, "--list-sizes", "10,x"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("localvault_scale.py: error: argument --list-sizes")
    )


def test_the_stall_benchmark_runs_every_phase() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "localvault_stalls.py")]
    command += ["--seconds", "0.3", "--connections", "2", "--cpu-requests", "30"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for phase in ("at rest", "65 KB line", "slowloris", "buffered", "slow reader"):
        assert phase in done.stdout, done.stdout
    assert "server CPU per get_key" in done.stdout, done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_soak_stopped_midway_leaves_nothing_behind(tmp_path: Path, signum: int, code: int) -> None:
    # Its own temporary directory, so that the vault's certificates, the --data directory and anything else
    # it makes are seen; stopped while its clients soak the vault.
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [sys.executable, str(SOAK), "--clients", "2", "--seconds", "600", "--warmup-requests", "20"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, TMPDIR=str(temp)),
    )
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("in memory run: "):
                break
        assert list(temp.iterdir()), "the vault made no temporary directory"
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("localvault_soak.py: stopped ("), err
    assert "Traceback" not in err and "leaked" not in err, err
    assert list(temp.iterdir()) == []
