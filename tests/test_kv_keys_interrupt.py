"""Ctrl-C at many moments of a real run: `python kv_keys.py` as a subprocess against the session's localvault.

The moment is chosen without sleeping: a gate wraps one method of the vault's store, in this process, so that
the request is known to be in flight (the vault's handler is inside it) when the test sends SIGINT; the gate
opens again once the script has shown that it handled the signal. After the script has exited and the vault
has finished every request in flight (LocalVault.wait_idle), what the script said must match what is there:
whenever a key exists the output names it, and "nothing was created" appears only when nothing exists.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from azure.keyvault.keys import KeyClient
from helpers import KV_KEYS, REPO, error_lines

from localvault import LocalVault

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess is POSIX only")

FIRST = "finishing the {} request, then cleaning up; Ctrl-C again to stop now"


class Gate:
    """Wraps store.<method>: its n-th call runs `action` (before or after the real call), e.g. hold the
    request until opened, or send a signal at that exact moment."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        store: Any,
        method: str,
        when: str = "before",
        call: int = 1,
        action: Optional[Callable[[], None]] = None,
    ) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()
        self.calls = 0
        real = getattr(store, method)

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls != call:
                return real(*args, **kwargs)
            if when == "after":
                result = real(*args, **kwargs)
            self.reached.set()
            if action is not None:
                action()
            else:
                assert self.opened.wait(60), "the test never opened the gate"
            return result if when == "after" else real(*args, **kwargs)

        monkeypatch.setattr(store, method, gated)

    def wait(self) -> None:
        assert self.reached.wait(60), "the request never reached the vault"


class Script:
    """kv_keys.py running; reads wait on its pipes, with a watchdog instead of sleeps."""

    def __init__(self, env: Dict[str, str], *argv: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, KV_KEYS, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.watchdog = threading.Timer(120, self.process.kill)
        self.watchdog.start()
        self.stderr = ""

    def ctrl_c(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def expect_stderr(self, line: str) -> None:
        assert self.process.stderr is not None
        while True:
            read = self.process.stderr.readline()
            assert read, f"{line!r} never appeared on stderr: {self.stderr!r}"
            self.stderr += read
            if read.rstrip("\n") == line:
                return

    def finish(self) -> tuple:
        out, err = self.process.communicate(timeout=120)
        self.watchdog.cancel()
        return self.process.returncode, out, self.stderr + err

    def close(self) -> None:
        self.watchdog.cancel()
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def start_script(localvault: LocalVault, clean_env: Dict[str, str]) -> Iterator[Callable[..., Script]]:
    started: List[Script] = []

    def start(*argv: str) -> Script:
        started.append(Script(dict(clean_env, **localvault.environ()), *argv))
        return started[-1]

    yield start
    for running in started:
        running.close()


def live_and_deleted(localvault: LocalVault, key_client: KeyClient, name: str) -> tuple:
    """Once the vault has finished every request in flight, including those whose client has gone."""
    assert localvault.wait_idle(60)
    live = [k.name for k in key_client.list_properties_of_keys()]
    deleted = [k.name for k in key_client.list_deleted_keys()]
    return name in live, name in deleted


def assert_truthful(err: str, name: str, live: bool, deleted: bool) -> List[str]:
    """The report, checked against the vault: a key that exists is named; "nothing was created" only if true."""
    lines = error_lines(err)
    if live:
        assert name in err and any(w in err for w in ("may exist", "is still in", "may still be in")), err
    if "nothing was created" in err:
        assert not live and not deleted, err
    if "was deleted" in err or "is deleted" in err:
        assert not live, err
    return lines


# --------------------------------------------------------------------------------------------------------
# The create request in flight
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])  # the vault stores the key after, or before, the Ctrl-C
def test_first_ctrl_c_during_the_create_lets_it_finish_and_deletes_the_key(
    when: str, start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "add_version", when)
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    run.expect_stderr(FIRST.format("create"))  # said at once, while the request is still held
    gate.opened.set()
    code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[1:] == [
        "hint: the key that this run created was deleted (see below)",
        f"cleanup: done, the key '{unique_key_name}' created by this run is deleted.",
    ]


@pytest.mark.parametrize("when", ["before", "after"])
def test_second_ctrl_c_during_the_create_stops_at_once_and_names_the_key(
    when: str, start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "add_version", when)
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    run.expect_stderr(FIRST.format("create"))
    run.ctrl_c()
    code, _, err = run.finish()  # exited while the vault still holds the create request
    gate.opened.set()  # ... which the vault then finishes: the key appears after the script has gone
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, True, False), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[1].startswith(
        f"hint: the key '{unique_key_name}' may exist in {localvault.url}, or may still appear"
    )
    assert f"KeyClient.get_key('{unique_key_name}')" in lines[2]
    assert f"KeyClient.begin_delete_key('{unique_key_name}')" in lines[3]


def test_ctrl_c_during_a_slow_rsa_4096_create(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    # No gate that holds the request: the signal is sent the moment the vault starts on the create (its name
    # check comes before generating the key), and the key is generated at its real, slow pace meanwhile.
    runs: List[Script] = []
    Gate(monkeypatch, localvault.store, "check_name_free", action=lambda: runs[0].ctrl_c())
    runs.append(start_script("--name", unique_key_name, "--size", "4096"))
    code, _, err = runs[0].finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    assert FIRST.format("create") in err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[2] == f"cleanup: done, the key '{unique_key_name}' created by this run is deleted."


# --------------------------------------------------------------------------------------------------------
# Between steps: during a request that changes nothing, Ctrl-C stops at once and the cleanup follows
# --------------------------------------------------------------------------------------------------------


def test_ctrl_c_during_the_name_check_created_nothing(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "get_deleted")
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    code, _, err = run.finish()
    gate.opened.set()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, False), err
    assert assert_truthful(err, unique_key_name, live, deleted) == [
        "error: interrupted (Ctrl-C)",
        "hint: nothing was created",
    ]


def test_ctrl_c_during_the_version_check_deletes_the_key(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "list_versions")  # the first call; the cleanup's own passes
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    code, _, err = run.finish()
    gate.opened.set()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[2:] == [f"cleanup: done, the key '{unique_key_name}' created by this run is deleted."]


def test_second_ctrl_c_during_the_cleanups_delete(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    check = Gate(monkeypatch, localvault.store, "list_versions")
    delete = Gate(monkeypatch, localvault.store, "delete")
    run = start_script("--name", unique_key_name)
    check.wait()
    run.ctrl_c()  # the first: the run stops and the cleanup deletes the key ...
    delete.wait()
    run.ctrl_c()  # ... the second stops the cleanup at once, while its delete request is held
    code, _, err = run.finish()
    check.opened.set()
    delete.opened.set()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert (
        lines[1]
        == f"hint: the key that this run created may still be in {localvault.url}: delete it yourself (see below)"
    )
    assert lines[2].startswith("cleanup: stopped (Ctrl-C): the key ")


# --------------------------------------------------------------------------------------------------------
# The delete and purge requests in flight
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_first_ctrl_c_during_the_delete_lets_it_finish(
    when: str, start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "delete", when)
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    run.expect_stderr(FIRST.format("delete"))
    gate.opened.set()
    code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    assert assert_truthful(err, unique_key_name, live, deleted)[1:] == [
        "hint: the key that this run created is deleted; the vault finishes the deletion by itself",
        f"cleanup: the deletion of '{unique_key_name}' was requested; the vault completes it.",
    ]


def test_second_ctrl_c_during_the_delete_says_the_key_may_exist(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "delete")
    run = start_script("--name", unique_key_name)
    gate.wait()
    run.ctrl_c()
    run.expect_stderr(FIRST.format("delete"))
    run.ctrl_c()
    code, _, err = run.finish()
    gate.opened.set()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[1] == (
        f"hint: the key '{unique_key_name}' may exist in {localvault.url}, or may still appear: the delete "
        "request was cut off before its answer came (see below)"
    )


def test_first_ctrl_c_during_the_purge_lets_it_finish(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "purge")
    run = start_script("--name", unique_key_name, "--purge")
    gate.wait()
    run.ctrl_c()
    run.expect_stderr(FIRST.format("purge"))
    gate.opened.set()
    code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, False), err
    assert assert_truthful(err, unique_key_name, live, deleted)[1:] == [
        "hint: the key that this run created is deleted, and purged"
    ]


# --------------------------------------------------------------------------------------------------------
# A closed stdout (`| head -1`): a quiet end, and the same cleanup
# --------------------------------------------------------------------------------------------------------


def test_stdout_closed_while_the_create_is_in_flight(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str, monkeypatch
) -> None:
    gate = Gate(monkeypatch, localvault.store, "add_version")
    run = start_script("--name", unique_key_name)
    gate.wait()
    assert run.process.stdout is not None
    assert run.process.stdout.readline().startswith("Creating a key in ")
    run.process.stdout.close()  # the reader has gone; the script's next line meets a closed pipe
    gate.opened.set()
    code, err = run.process.wait(timeout=120), run.process.stderr.read()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, err, live, deleted) == (141, "", False, True)


def test_piped_into_head(
    localvault: LocalVault, key_client: KeyClient, clean_env: Dict[str, str], unique_key_name: str
) -> None:
    # As a user types it. Whether the script still writes after head has gone depends on timing; either way
    # it ends quietly and leaves no key.
    command = f'"{sys.executable}" "{KV_KEYS}" --name {unique_key_name} | head -1; exit "${{PIPESTATUS[0]}}"'
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        env=dict(clean_env, **localvault.environ()),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode in (0, 141), result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Creating a key in {localvault.url} called '{unique_key_name}' ...")
    assert live_and_deleted(localvault, key_client, unique_key_name) == (False, True)
