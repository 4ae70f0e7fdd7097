"""Every ```python block of README.md and localvault/README.md runs, so that neither can drift from the code.

A block runs in this process against the session's vault, whose environment (proxy, trust, identity) the
plugin has applied, so ``KeyClient("https://NAME.vault.azure.net", DefaultAzureCredential())`` works as
written; the name ``vault`` is that vault (the controls' examples use it), reset for each block, and the
block runs in a temporary directory with os.environ put back afterwards. A block that defines ``test_``
functions is a test file: it is run by pytest in a process of its own, and each test must pass.

README.md's blocks are samples for a reader: each must assert what it shows, and they run with only the
key permissions that README tells the reader to grant.

A block that cannot run says so just before it, in the Markdown: ``<!-- not run: the reason -->``. Those
are counted against NOT_RUN below, so that a README cannot skip its blocks silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional

import pytest
from helpers import REPO, pytest_with_localvault

from localvault import LocalVault

READMES = ("README.md", "localvault/README.md")
# How many Python blocks each README marks as not run; change it only with the marker.
NOT_RUN: Dict[str, int] = {"README.md": 0, "localvault/README.md": 0}
# How many each has at least (README.md: its Next steps); fewer means the extraction broke.
AT_LEAST: Dict[str, int] = {"README.md": 4, "localvault/README.md": 9}
# The README whose blocks are samples for a reader, each checking what it shows with an assert, and run
# with only the key permissions it tells the reader to grant, at the address its blocks use.
ASSERTING = "README.md"
SAMPLES_VAULT = "contoso.vault.azure.net"
_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*\Z")


class Block(NamedTuple):
    readme: str
    line: int  # of the opening fence
    code: str
    not_run: Optional[str]  # the reason, if it is marked


def blocks(readme: str) -> List[Block]:
    text = (REPO / readme).read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        marker = _NOT_RUN.search(text[: match.start()])
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(readme, line, match.group(1), marker["reason"] if marker else None))
    return found


ALL = [block for readme in READMES for block in blocks(readme)]
RUN = [block for block in ALL if block.not_run is None]


@pytest.fixture
def block_scope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A temporary working directory, and os.environ as it was once the block is done."""
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("block", RUN, ids=[f"{b.readme}:{b.line}" for b in RUN])
def test_the_block_runs(block: Block, localvault: LocalVault, block_scope: None, tmp_path: Path) -> None:
    code = compile(block.code, f"{block.readme}:{block.line}", "exec")
    if re.search(r"^def test_", block.code, re.M):
        return run_as_tests(block, tmp_path)
    if block.readme != ASSERTING:
        exec(code, {"__name__": "readme_block", "vault": localvault})
        return
    samples = localvault.vault(SAMPLES_VAULT)
    samples.set_key_permissions(granted_permissions())
    try:
        exec(code, {"__name__": "readme_block"})
    finally:
        samples.set_key_permissions(None)


def granted_permissions() -> List[str]:
    """The access-policy key permissions README.md grants: the quickstart's, plus those its Next steps add."""
    text = (REPO / ASSERTING).read_text(encoding="utf-8")
    quickstart = re.search(r"--key-permissions ([a-z ]+)`", text)
    next_steps = re.search(r"these blocks add to the quickstart's: ([a-z, ]+)\)", text)
    assert quickstart and next_steps, "README.md no longer says which key permissions to grant"
    return quickstart[1].split() + next_steps[1].split(", ")


def run_as_tests(block: Block, tmp_path: Path) -> None:
    tests = len(re.findall(r"^def test_", block.code, re.M))
    (tmp_path / "test_readme_block.py").write_text(block.code, encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    done = pytest_with_localvault(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(f"{tests} passed"), done.stdout


def test_blocks_are_found_and_those_not_run_say_why() -> None:
    for readme in READMES:
        assert len([block for block in RUN if block.readme == readme]) >= AT_LEAST[readme], readme
        skipped = [block for block in ALL if block.readme == readme and block.not_run is not None]
        assert all(block.not_run for block in skipped), [b.line for b in skipped if not b.not_run]
        assert len(skipped) == NOT_RUN[readme], [(b.line, b.not_run) for b in skipped]


def test_the_samples_assert_what_they_show() -> None:
    samples = [block for block in RUN if block.readme == ASSERTING]
    assert samples
    assert [b.line for b in samples if not re.search(r"^\s*assert ", b.code, re.M)] == []


def test_a_marker_applies_only_to_the_block_just_after_it(tmp_path: Path) -> None:
    text = "<!-- not run: needs Azure -->\n```python\nA\n```\n\ntext\n\n```python\nB\n```\n"
    (tmp_path / "x.md").write_text(text)
    found = [(b.code, b.not_run) for b in blocks(str(tmp_path / "x.md"))]
    assert found == [("A\n", "needs Azure"), ("B\n", None)]
