"""The real prompt, through a pseudo-terminal: what a person at a terminal sees and types.

kv_keys.py runs as a subprocess whose stdin, stdout and stderr are a pty (with the pty as its controlling
terminal, so that Ctrl-C is a real SIGINT from the terminal). The vault is the session's localvault.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from typing import Dict, Iterator, Optional

import pytest
from azure.keyvault.keys import KeyClient
from helpers import KV_KEYS, REPO

from localvault import LocalVault

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")

# Make the pty the controlling terminal (the child is a new session leader), then become kv_keys.py.
LAUNCHER = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class Terminal:
    """A process on a pseudo-terminal; reads wait on select() with a deadline, never on sleeps."""

    def __init__(self, env: Dict[str, str], *argv: str, stdout: Optional[int] = None) -> None:
        """stdout: subprocess.PIPE for a stdout that is not the terminal (`| head -1`); read it with piped()."""
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, KV_KEYS, *argv],
            stdin=slave,
            stdout=slave if stdout is None else stdout,
            stderr=slave,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def _read(self, deadline: float) -> bool:
        """Read what is there; False once the child has closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out; the terminal shows {self.output!r}")
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: every copy of the slave side is closed
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, pattern: bytes, timeout: float = 60, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.output, start)
            if match:
                return match
            if not self._read(deadline):
                raise AssertionError(f"{pattern!r} never appeared in {self.output!r}")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        os.close(self.master)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.fixture
def terminal_env(localvault: LocalVault, clean_env: Dict[str, str]) -> Dict[str, str]:
    return dict(clean_env, **localvault.environ(), TERM="xterm")


@pytest.fixture
def terminal(terminal_env: Dict[str, str]) -> Iterator[Terminal]:
    session = Terminal(terminal_env)
    try:
        yield session
    finally:
        session.close()


def test_enter_accepts_the_suggested_name(terminal: Terminal, key_client: KeyClient) -> None:
    prompt = terminal.expect(rb"Input a name for your key \[(quickstart-[0-9a-zA-Z-]+)\] > ")
    suggested = prompt.group(1).decode()
    terminal.type(b"\r")
    assert terminal.finish() == 0, terminal.text
    assert f"Creating a key in {key_client.vault_url} called '{suggested}' ..." in terminal.text
    assert f"Key with name '{suggested}' was found." in terminal.text
    assert b"\r\x1b[K" in terminal.output  # the terminal branch: the spinner line is cleared
    assert key_client.get_deleted_key(suggested).name == suggested


def test_typed_name_at_the_prompt(terminal: Terminal, key_client: KeyClient, unique_key_name: str) -> None:
    terminal.expect(rb"Input a name for your key \[quickstart-[0-9a-zA-Z-]+\] > ")
    terminal.type(unique_key_name.encode() + b"\r")
    assert terminal.finish() == 0, terminal.text
    assert unique_key_name in terminal.text  # echoed by the terminal, then used
    assert f"called '{unique_key_name}'" in terminal.text
    assert key_client.get_deleted_key(unique_key_name).name == unique_key_name


def test_ctrl_c_at_the_prompt(terminal: Terminal, key_client: KeyClient) -> None:
    # The whole prompt has been read from the terminal, so kv_keys.py has written it and is inside input().
    terminal.expect(rb"Input a name for your key \[(quickstart-[0-9a-zA-Z-]+)\] > ")
    # One ^C, which the terminal turns into a real SIGINT for the foreground process, then Enter. CPython's
    # input() writes the prompt and only then blocks in read(); a SIGINT that lands between the two (a window of
    # microseconds: a person cannot hit it, a loaded test machine does, a few percent of the time) is only noted,
    # and read() would then wait for input. The Enter ends that read(), and the noted interrupt is raised as
    # input() returns. When read() was already blocked (the usual case), the SIGINT interrupts it and the Enter
    # stays unread. Either way there is one interrupt and no timeout: if the script ignored ^C, the Enter would
    # accept the suggested name and the run would create a key and exit 0, which the checks below reject.
    terminal.type(b"\x03\r")
    assert terminal.finish() == 130, terminal.text
    assert "error: interrupted (Ctrl-C)\nhint: nothing was created\n" in terminal.text
    assert terminal.text.count("error: ") == 1
    assert "Traceback" not in terminal.text and "Creating" not in terminal.text
    assert list(key_client.list_properties_of_keys()) == []


PROMPT = rb"Input a name for your key \[(quickstart-[0-9a-zA-Z-]+)\] > "


def test_an_invalid_name_at_the_prompt_is_asked_for_again(terminal: Terminal, key_client: KeyClient) -> None:
    suggested = terminal.expect(PROMPT).group(1).decode()
    terminal.type(b"bad name\r")
    terminal.expect(
        re.escape(
            b"invalid key name 'bad name': use 1 to 127 letters (a-z, A-Z), digits and hyphens; try again, or "
            b"press Enter for " + suggested.encode()
        )
    )
    assert terminal.expect(PROMPT, start=terminal.output.index(b"try again")).group(1).decode() == suggested
    terminal.type(b"\r")
    assert terminal.finish() == 0, terminal.text
    assert f"called '{suggested}'" in terminal.text
    assert key_client.get_deleted_key(suggested).name == suggested


def test_a_fourth_invalid_name_at_the_prompt_ends_the_run(terminal: Terminal, key_client: KeyClient) -> None:
    suggested = terminal.expect(PROMPT).group(1).decode()
    for _ in range(4):  # the first answer, then asked again 3 times
        terminal.type(b"under_score\r")
    assert terminal.finish() == 2, terminal.text
    assert terminal.text.count("Input a name for your key") == 4
    assert terminal.text.count("try again") == 3
    assert terminal.text.endswith(
        "error: invalid key name 'under_score': use 1 to 127 letters (a-z, A-Z), digits and hyphens\n"
        f"hint: for example {suggested}\n"
    )
    assert list(key_client.list_properties_of_keys()) == []


def test_with_stdout_piped_the_prompt_shows_on_the_terminal(
    terminal_env: Dict[str, str], key_client: KeyClient
) -> None:
    session = Terminal(terminal_env, stdout=subprocess.PIPE)
    try:
        suggested = session.expect(PROMPT).group(1).decode()  # on the terminal (stderr), not in the pipe
        session.type(b"\r")
        assert session.finish() == 0, session.text
        assert session.process.stdout is not None
        piped = session.process.stdout.read().decode()
    finally:
        session.close()
    assert "Input a name" not in piped
    assert piped.startswith(f"Creating a key in {key_client.vault_url} called '{suggested}' ...")
