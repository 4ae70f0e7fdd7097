"""kv_keys.py with a KeyClient double: the cleanup after a failure or Ctrl-C, and waiting for the deletion.

kv_keys.make_client is patched (fixture `fake_client` in conftest.py), so no test here sends anything anywhere.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
from typing import Any
from unittest import mock

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    IncompleteReadError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from helpers import (
    NAME,
    VAULT,
    FakePoller,
    error_lines,
    fake_deleted,
    fake_key,
    forbidden,
    http_error,
    not_found,
    run,
)

import kv_keys

pytestmark = pytest.mark.usefixtures("azure_vault_env")

# --------------------------------------------------------------------------------------------------------
# Cleanup guarantee: after create and before delete, a failure or Ctrl-C deletes the key and says so
# --------------------------------------------------------------------------------------------------------


def test_cleanup_when_get_fails_after_create(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [not_found(), forbidden()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    error_lines(err)
    fake_client.begin_delete_key.assert_called_once_with(NAME)
    assert f"cleanup: done, the key '{NAME}' created by this run is deleted." in err


def test_keep_means_no_cleanup_after_a_failure(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [not_found(), forbidden()]
    code, _, err = run(capsys, "--name", NAME, "--keep")
    assert code == kv_keys.ExitStatus.PERMISSION
    error_lines(err)
    fake_client.begin_delete_key.assert_not_called()
    assert (
        f"cleanup: skipped (--keep): https://{VAULT}.vault.azure.net/keys/{NAME}/v1 stays in {VAULT}; "
        f"to delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}"
    ) in err


def test_cleanup_when_delete_fails(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.begin_delete_key.side_effect = forbidden("delete")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    error_lines(err)
    fake_client.begin_delete_key.assert_called_once_with(NAME)  # refused: asking again would change nothing
    assert (
        f"cleanup: the vault refused the deletion: the key https://{VAULT}.vault.azure.net/keys/{NAME}/v1 "
        f"is still in {VAULT}"
    ) in err
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in err


def test_failure_while_waiting_for_deletion(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.begin_delete_key.return_value = FakePoller(
        wait_error=http_error(HttpResponseError, 500, "Oops", "Oops.")
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.SERVICE
    error_lines(err)
    fake_client.begin_delete_key.assert_called_once()
    assert "deletion of 'unit-key' was requested" in err


def test_ctrl_c_between_create_and_delete(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    lines = error_lines(err)
    assert lines[:2] == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created was deleted (see below)",
    ]
    fake_client.begin_delete_key.assert_called_once_with(NAME)
    assert lines[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]


def test_second_ctrl_c_during_cleanup_is_reported(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    fake_client.begin_delete_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    lines = error_lines(err)
    assert (
        lines[1]
        == f"hint: the key that this run created may still be in {VAULT}: delete it yourself (see below)"
    )
    assert (
        f"cleanup: stopped (Ctrl-C): the key https://{VAULT}.vault.azure.net/keys/{NAME}/v1 may still be in"
        in err
    )
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in err


def test_ctrl_c_during_the_delete_request_is_not_reported_as_a_failed_cleanup(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C while DELETE was in flight: the vault deleted the key, so cleanup's own delete answers 404.
    fake_client.begin_delete_key.side_effect = [KeyboardInterrupt(), not_found()]
    fake_client.get_deleted_key.side_effect = [
        not_found(),
        fake_deleted(),
    ]  # the name check, then the confirmation
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    lines = error_lines(err)
    assert (
        lines[1]
        == "hint: the key that this run created is deleted: its deletion had gone through (see below)"
    )
    assert lines[2:] == [
        f"cleanup: nothing left to delete: {VAULT} answered that '{NAME}' is not there, it was already deleted; "
        f"it is kept as the deleted key https://{VAULT}.vault.azure.net/deletedkeys/{NAME} "
        "until 2025-04-02 00:00:00+00:00."
    ]
    assert "cleanup failed" not in err and "still in" not in err
    assert fake_client.begin_delete_key.call_count == 2
    assert fake_client.get_deleted_key.call_args_list == [mock.call(NAME), mock.call(NAME)]


def test_already_deleted_without_a_deleted_key_to_show(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [not_found(), http_error(HttpResponseError, 500, "Oops", "Oops.")]
    fake_client.begin_delete_key.side_effect = not_found()  # e.g. someone else deleted it meanwhile
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.SERVICE
    lines = error_lines(err)
    assert lines[2:] == [
        f"cleanup: nothing left to delete: {VAULT} answered that '{NAME}' is not there, it was already deleted."
    ]


# Ctrl-C or a lost answer while the create request was in flight: the vault may have created the key.


def ctrl_c() -> None:
    """Press Ctrl-C: call the SIGINT handler that kv_keys.main installed, as the signal would."""
    handler = signal.getsignal(signal.SIGINT)
    assert isinstance(handler, kv_keys.CtrlC)
    handler(signal.SIGINT, None)


def test_first_ctrl_c_during_create_lets_it_finish_then_deletes_the_key(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    def create(name: str, size: int, **kwargs: Any) -> Any:
        ctrl_c()  # while the request is in flight: the vault still answers it
        return fake_key()

    fake_client.create_rsa_key.side_effect = create
    code, out, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert err.startswith("\nfinishing the create request, then cleaning up; Ctrl-C again to stop now\n")
    lines = error_lines(err)
    assert lines[:2] == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created was deleted (see below)",
    ]
    assert lines[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]
    fake_client.list_properties_of_key_versions.assert_called_once_with(NAME)  # ours alone, then deleted
    fake_client.begin_delete_key.assert_called_once_with(NAME)
    assert "Creating a key" in out and " done." not in out  # the run stopped once the create was answered


@pytest.mark.parametrize("how", ["second Ctrl-C", "KeyboardInterrupt in the request"])
def test_ctrl_c_that_cuts_the_create_off_says_the_key_may_exist(
    how: str, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    def create(name: str, size: int, **kwargs: Any) -> Any:
        if how == "second Ctrl-C":
            ctrl_c()  # the first lets the request finish ...
            ctrl_c()  # ... the second stops the run at once (raises KeyboardInterrupt)
        raise KeyboardInterrupt  # Python's own handler, where kv_keys cannot install its own

    fake_client.create_rsa_key.side_effect = create
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    lines = error_lines(err)
    assert lines[1] == (
        f"hint: the key '{NAME}' may exist in {VAULT}, or may still appear: the create request was cut off "
        "before its answer came (see below)"
    )
    assert lines[2:] == [
        "cleanup: not attempted, since this run cannot know whether the key exists; to check: "
        f"az keyvault key show --vault-name {VAULT} --name {NAME}",
        f"cleanup: if it exists, delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}",
    ]
    assert "nothing was created" not in err
    assert fake_client.get_key.call_count == 1  # the name check only: a lookup now would prove nothing
    fake_client.begin_delete_key.assert_not_called()


@pytest.mark.parametrize(
    "lost",
    [
        ServiceResponseError("Connection aborted."),  # the connection dropped: no answer at all
        ServiceResponseTimeoutError("Read timed out."),  # no answer in time
        IncompleteReadError("Connection broken: IncompleteRead"),  # an answer cut off in its body
    ],
)
def test_lost_answer_to_the_create_says_the_key_may_exist(
    lost: Exception, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Azure: azure-core retries no create (a POST) whose answer was lost; the key may exist.
    fake_client.create_rsa_key.side_effect = lost
    code, _, err = run(capsys, "--name", NAME)
    lines = error_lines(err)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    assert lines[0].startswith(
        f"error: no answer from https://{VAULT}.vault.azure.net: the connection was lost"
    )
    assert (
        lines[1] == "hint: run again; if it keeps happening, check your network and any proxy (HTTPS_PROXY)"
    )
    assert str(lost) in lines[0]
    assert lines[2].endswith(f"to check: az keyvault key show --vault-name {VAULT} --name {NAME}")
    assert lines[3].endswith(f"delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}")
    assert fake_client.get_key.call_count == 1
    fake_client.begin_delete_key.assert_not_called()


def test_second_ctrl_c_during_the_create_stops_at_once_even_with_keep(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    def create(name: str, size: int, **kwargs: Any) -> Any:
        ctrl_c()
        ctrl_c()
        raise AssertionError("the second Ctrl-C must stop the run")

    fake_client.create_rsa_key.side_effect = create
    code, _, err = run(capsys, "--name", NAME, "--keep")
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert "may exist" in error_lines(err)[1]


def test_first_ctrl_c_during_the_delete_request_lets_it_finish(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    def delete(name: str) -> FakePoller:
        ctrl_c()
        return FakePoller()

    fake_client.begin_delete_key.side_effect = delete
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert "finishing the delete request, then cleaning up; Ctrl-C again to stop now" in err
    assert error_lines(err)[1:] == [
        "hint: the key that this run created is deleted; the vault finishes the deletion by itself",
        f"cleanup: the deletion of '{NAME}' was requested; the vault completes it.",
    ]
    fake_client.begin_delete_key.assert_called_once_with(NAME)
    assert fake_client.begin_delete_key.return_value.waited == 0  # stopped before waiting


def test_first_ctrl_c_during_the_purge_request_lets_it_finish(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.purge_deleted_key.side_effect = lambda name: ctrl_c()
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err)[1:] == ["hint: the key that this run created is deleted, and purged"]


def test_first_ctrl_c_during_the_cleanups_delete_lets_it_finish(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # A failure after the create; during the cleanup's delete, Ctrl-C: the delete still finishes, and says so.
    fake_client.get_key.side_effect = [not_found(), http_error(HttpResponseError, 500, "Oops", "Oops.")]
    fake_client.begin_delete_key.side_effect = lambda name: ctrl_c()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert "finishing the delete request; Ctrl-C again to stop now" in err
    assert error_lines(err)[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]


def test_refused_create_needs_no_lookup(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.create_rsa_key.side_effect = forbidden("create")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    assert len(error_lines(err)) == 2
    assert fake_client.get_key.call_count == 1  # the name check only


def test_ctrl_c_after_create_with_unknown_ownership_deletes_nothing_and_says_so(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.list_properties_of_key_versions.side_effect = forbidden("list")
    fake_client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    lines = error_lines(err)
    assert lines[1] == (
        f"hint: nothing was deleted: this run cannot tell whether the key '{NAME}' holds versions that it did "
        "not create (see below)"
    )
    assert lines[2].startswith(
        "cleanup: nothing deleted, since this identity may not list the key's versions"
    )
    assert f"this run created https://{VAULT}.vault.azure.net/keys/{NAME}/v1" in lines[2]
    assert (
        lines[3]
        == f"cleanup: if the key is yours alone, delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}"
    )
    assert "deleted now" not in err and "cleanup: done" not in err
    fake_client.begin_delete_key.assert_not_called()


def test_ctrl_c_during_purge(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.purge_deleted_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err) == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created is deleted, but perhaps not purged; to purge it: "
        f"az keyvault key purge --vault-name {VAULT} --name {NAME}",
    ]
    fake_client.begin_delete_key.assert_called_once()


def test_ctrl_c_while_waiting_for_the_deletion(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.begin_delete_key.return_value = FakePoller(wait_error=KeyboardInterrupt())
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err)[1:] == [
        "hint: the key that this run created is deleted; the vault finishes the deletion by itself",
        f"cleanup: the deletion of '{NAME}' was requested; the vault completes it.",
    ]
    fake_client.begin_delete_key.assert_called_once()


def test_ctrl_c_before_create_created_nothing(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_deleted_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err) == ["error: interrupted (Ctrl-C)", "hint: nothing was created"]
    fake_client.create_rsa_key.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# Waiting for the deletion: a spinner on a terminal, plain lines otherwise
# --------------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and signals once the spinner has drawn a frame."""

    def __init__(self) -> None:
        super().__init__()
        self.spun = threading.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "waiting until the deletion has finished" in text and text.endswith("s"):
            self.spun.set()
        return super().write(text)


def test_spinner_on_a_terminal(fake_client: mock.NonCallableMagicMock, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    poller = FakePoller()
    poller.wait = lambda timeout=None: terminal.spun.wait(30)  # type: ignore[method-assign]
    fake_client.begin_delete_key.return_value = poller
    assert kv_keys.main(["--name", NAME]) == 0
    out = terminal.getvalue()
    assert "\r  waiting until the deletion has finished | 0." in out
    assert "\r\033[K" in out


def test_plain_lines_when_not_a_terminal(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "--name", NAME)
    assert "  waiting until the deletion has finished ...\n done.\n" in out
    assert "\r" not in out
