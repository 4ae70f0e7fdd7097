"""Ctrl-C at many moments of a real run: `python kv_keys.py` as a subprocess against the session's localvault.

The moment is chosen without sleeping: the vault holds the next request of one operation (hold_next), so that
the request is known to be in flight when the test sends SIGINT; the test releases it once the script has
shown that it handled the signal. After the script has exited and the vault has finished every request in
flight (LocalVault.wait_idle), what the script said must match what is there: whenever a key exists the
output names it, and "nothing was created" appears only when nothing exists.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Tuple

import pytest
from azure.keyvault.keys import KeyClient
from helpers import KV_KEYS, REPO, error_lines

from localvault import LocalVault

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess is POSIX only")

FIRST = "finishing the {} request, then cleaning up; Ctrl-C again to stop now"
RUN_AS_MAIN = "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


class Script:
    """kv_keys.py running; reads wait on its pipes, with a watchdog instead of sleeps."""

    def __init__(self, env: Dict[str, str], *argv: str, prelude: str = "") -> None:
        # prelude: Python run first in the same process, which then runs kv_keys.py as `python kv_keys.py` would
        command = [sys.executable, "-c", prelude + RUN_AS_MAIN] if prelude else [sys.executable]
        self.process = subprocess.Popen(
            [*command, KV_KEYS, *argv],
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
# One request held, Ctrl-C pressed: once, twice, or once during a request that changes nothing
# --------------------------------------------------------------------------------------------------------


class Moment(NamedTuple):
    operation: str  # the request held: the first of this operation
    when: str  # held before the vault acts on it, or after (changed, the answer not sent)
    presses: str  # "first": one Ctrl-C, which lets the request finish; "second": two; "stop": one, at once
    state: Tuple[bool, bool]  # (live, deleted) in the end
    report: List[str]  # the report after its error line; `*` stands for any text, {name} and {url} filled in
    argv: Tuple[str, ...] = ()


FIRST_REQUEST = {"CreateKey": "create", "DeleteKey": "delete", "PurgeDeletedKey": "purge"}
DELETED_BY_THE_CLEANUP = "cleanup: done, the key '{name}' created by this run is deleted."
MOMENTS = {
    f"first Ctrl-C during the create, held {when}": Moment(
        "CreateKey",
        when,
        "first",
        (False, True),
        ["hint: the key that this run created was deleted (see below)", DELETED_BY_THE_CLEANUP],
    )
    for when in ("before", "after")
}
MOMENTS.update(
    {
        f"second Ctrl-C during the create, held {when}, the key appears after the script has gone": Moment(
            "CreateKey",
            when,
            "second",
            (True, False),
            [
                "hint: the key '{name}' may exist in {url}, or may still appear*",
                "*KeyClient.get_key('{name}')*",
                "*KeyClient.begin_delete_key('{name}')*",
            ],
        )
        for when in ("before", "after")
    }
)
MOMENTS.update(
    {
        f"first Ctrl-C during the delete, held {when}": Moment(
            "DeleteKey",
            when,
            "first",
            (False, True),
            [
                "hint: the key that this run created is deleted; the vault finishes the deletion by itself",
                "cleanup: the deletion of '{name}' was requested; the vault completes it.",
            ],
        )
        for when in ("before", "after")
    }
)
MOMENTS.update(
    {
        "Ctrl-C during the name check, nothing was created": Moment(
            "GetDeletedKey", "before", "stop", (False, False), ["hint: nothing was created"]
        ),
        "Ctrl-C during the version check, the cleanup deletes the key": Moment(
            "GetKeyVersions", "before", "stop", (False, True), ["hint: *", DELETED_BY_THE_CLEANUP]
        ),
        "second Ctrl-C during the delete, the key may exist": Moment(
            "DeleteKey",
            "before",
            "second",
            (False, True),
            [
                "hint: the key '{name}' may exist in {url}, or may still appear: the delete request was cut "
                "off before its answer came (see below)",
                "*KeyClient.get_key('{name}')*",
                "*KeyClient.begin_delete_key('{name}')*",
            ],
        ),
        "first Ctrl-C during the purge": Moment(
            "PurgeDeletedKey",
            "before",
            "first",
            (False, False),
            ["hint: the key that this run created is deleted, and purged"],
            ("--purge",),
        ),
    }
)


def matches(line: str, pattern: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), line) is not None


@pytest.mark.parametrize("moment", MOMENTS.values(), ids=MOMENTS.keys())
def test_ctrl_c_with_a_request_in_flight(
    moment: Moment, start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str
) -> None:
    with localvault.hold_next(moment.operation, moment.when) as hold:
        run = start_script("--name", unique_key_name, *moment.argv)
        assert hold.wait(60), "the request never reached the vault"
        run.ctrl_c()
        if moment.presses != "stop":
            run.expect_stderr(FIRST.format(FIRST_REQUEST[moment.operation]))  # at once, while still held
        if moment.presses == "first":
            hold.release()
        if moment.presses == "second":
            run.ctrl_c()
        code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, (live, deleted)) == (130, moment.state), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[0] == "error: interrupted (Ctrl-C)", err
    report = [line.format(name=unique_key_name, url=localvault.url) for line in moment.report]
    assert len(lines[1:]) == len(report) and all(map(matches, lines[1:], report)), err


def test_ctrl_c_during_a_slow_rsa_4096_create(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str
) -> None:
    # Held only until the signal is sent, the moment the vault starts on the create: the key is then
    # generated at its real, slow pace while the script handles the Ctrl-C.
    with localvault.hold_next("CreateKey") as hold:
        run = start_script("--name", unique_key_name, "--size", "4096")
        assert hold.wait(60), "the request never reached the vault"
        run.ctrl_c()
    code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    assert FIRST.format("create") in err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert lines[2] == f"cleanup: done, the key '{unique_key_name}' created by this run is deleted."


def test_second_ctrl_c_during_the_cleanups_delete(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str
) -> None:
    with localvault.hold_next("GetKeyVersions") as check, localvault.hold_next("DeleteKey") as delete:
        run = start_script("--name", unique_key_name)
        assert check.wait(60), "the version check never reached the vault"
        run.ctrl_c()  # the first: the run stops and the cleanup deletes the key ...
        assert delete.wait(60), "the cleanup's delete never reached the vault"
        run.ctrl_c()  # ... the second stops the cleanup at once, while its delete request is held
        code, _, err = run.finish()
    live, deleted = live_and_deleted(localvault, key_client, unique_key_name)
    assert (code, live, deleted) == (130, False, True), err
    lines = assert_truthful(err, unique_key_name, live, deleted)
    assert (
        lines[1]
        == f"hint: the key that this run created may still be in {localvault.url}: delete it yourself (see below)"
    )
    assert lines[2].startswith("cleanup: stopped (Ctrl-C): the key ")


# --------------------------------------------------------------------------------------------------------
# A late Ctrl-C, once the run is over: a quiet end with exit status 0, whatever the process is doing then
# --------------------------------------------------------------------------------------------------------

# The moment is exact: the script sends SIGINT to itself at it (os.kill delivers it before returning).
AFTER_THE_LINE = """
import builtins, os, signal
real_print = builtins.print
def print(*args, **kwargs):
    real_print(*args, **kwargs)
    if {line!r} in " ".join(map(str, args)):
        os.kill(os.getpid(), signal.SIGINT)
builtins.print = print
"""
# Registered before anything else, so that it runs as the interpreter exits, after main() has returned.
AT_EXIT = "import atexit, os, signal\natexit.register(os.kill, os.getpid(), signal.SIGINT)\n"
# The first variable that the embedded localvault's teardown restores: the vault is still stopping.
WHILE_THE_EMBEDDED_VAULT_STOPS = """
import os, signal, sys
sent = []
def hook(event, args):
    if event == "os.unsetenv" and not sent:
        sent.append(event)
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
"""
LATE = {
    "just after the last line": ((), AFTER_THE_LINE.format(line="(or run this script with --purge)")),
    "just after the last line, with --purge": (("--purge",), AFTER_THE_LINE.format(line="can be used again")),
    "just after the last line, with --keep": (("--keep",), AFTER_THE_LINE.format(line="to delete it later:")),
    "as the interpreter exits": ((), AT_EXIT),
    "while the embedded localvault stops": (("--local",), WHILE_THE_EMBEDDED_VAULT_STOPS),
}


@pytest.mark.parametrize(("argv", "prelude"), LATE.values(), ids=LATE.keys())
def test_a_late_ctrl_c_ends_quietly(
    argv: Tuple[str, ...],
    prelude: str,
    localvault: LocalVault,
    key_client: KeyClient,
    clean_env: Dict[str, str],
    unique_key_name: str,
) -> None:
    run = Script(dict(clean_env, **localvault.environ()), "--name", unique_key_name, *argv, prelude=prelude)
    try:
        code, out, err = run.finish()
    finally:
        run.close()
    assert (code, err) == (0, ""), out  # no traceback, no "Exception ignored in atexit callback"
    assert f"Key with name '{unique_key_name}' was found." in out
    if "--local" not in argv:
        live = "--keep" in argv
        assert live_and_deleted(localvault, key_client, unique_key_name) == (live, not live and "--purge" not in argv)


# --------------------------------------------------------------------------------------------------------
# A closed stdout (`| head -1`): a quiet end, and the same cleanup
# --------------------------------------------------------------------------------------------------------


def test_stdout_closed_while_the_create_is_in_flight(
    start_script, localvault: LocalVault, key_client: KeyClient, unique_key_name: str
) -> None:
    with localvault.hold_next("CreateKey") as hold:
        run = start_script("--name", unique_key_name)
        assert hold.wait(60), "the request never reached the vault"
        assert run.process.stdout is not None
        assert run.process.stdout.readline().startswith("Creating a key in ")
        run.process.stdout.close()  # the reader has gone; the script's next line meets a closed pipe
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
