"""The real service's recordings (tests/recordings), replayed against localvault: each must match, except
those known-differences.json lists with a reason, and each of those must still differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from localvault import replay

CORPUS = Path(__file__).parent / "recordings"
KNOWN = replay.known_differences(CORPUS)
NAMES = [path.relative_to(CORPUS).as_posix() for path in replay.recordings(CORPUS)]


def test_the_corpus_is_there_with_its_notice() -> None:
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "Licence: MIT, Copyright (c) Microsoft Corporation" in readme
    assert len(NAMES) >= 69
    for name in NAMES:  # every recording is in the README's index
        assert f"| {name} |" in readme, name


def test_every_known_difference_names_a_recording_and_a_reason() -> None:
    for name, reason in KNOWN.items():
        assert name in NAMES, f"known-differences.json names {name}, which is not a recording"
        assert isinstance(reason, str) and len(reason) > 20, name


@pytest.mark.parametrize("name", NAMES)
def test_recording_replays(name: str) -> None:
    recording = json.loads((CORPUS / name).read_text(encoding="utf-8"))
    differences = replay.Replayer().replay(recording)
    if name in KNOWN:
        assert differences, f"{name} now matches: remove it from known-differences.json"
    else:
        assert not differences, "\n".join(differences)


def _corpus_of(tmp_path: Path, *names: str) -> Path:
    for name in names:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / name, target)
    return tmp_path


def test_the_command_prints_a_line_per_recording_and_the_count(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory = _corpus_of(tmp_path, "js/get-missing-key-404.json", "net/get-missing-key-404-7.0.json")
    recording = json.loads((directory / "net/get-missing-key-404-7.0.json").read_text())
    recording["entries"][0]["status"] = 410  # what localvault does not answer
    (directory / "net/get-missing-key-404-7.0.json").write_text(json.dumps(recording))

    assert replay.main([str(directory)]) == 1

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "match    js/get-missing-key-404.json"
    assert lines[1].startswith(
        "DIFFERS  net/get-missing-key-404-7.0.json: #0 GET /keys/526083110/: status 404, recorded 410"
    )
    assert lines[-1] == "1/2 recordings match"


def test_a_changed_value_is_a_difference(tmp_path: Path) -> None:
    """An error code that localvault does not give is a difference."""
    recording = json.loads((CORPUS / "js/get-missing-key-404.json").read_text())
    assert replay.Replayer().replay(recording) == []
    recording["entries"][-1]["response_body"]["error"]["code"] = "KeyGone"
    assert replay.Replayer().replay(recording) == [
        f"#{len(recording['entries']) - 1} GET {recording['entries'][-1]['path']}: "
        "error code 'KeyNotFound', recorded 'KeyGone'"
    ]


def test_polls_count_once_as_their_last_attempt() -> None:
    poll = {
        "method": "GET",
        "path": "/deletedkeys/k",
        "query": {},
        "request_body": None,
        "response_headers": {},
    }
    challenge = dict(poll, status=401, response_headers={"www-authenticate": "Bearer"})
    entries = [
        dict(poll, status=404),
        challenge,
        dict(poll, status=404),
        dict(poll, status=200),
        dict(poll, status=200),
    ]
    assert replay.polls(entries) == {0, 2}
