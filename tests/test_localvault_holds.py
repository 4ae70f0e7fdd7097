"""hold_next: the next request of an operation held before or after the vault acts on it, until released;
in-process and over the control API (/_localvault/holds, /_localvault/wait-held)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
from azure.core.exceptions import ResourceNotFoundError
from helpers import control

from localvault import LocalVault


@pytest.fixture
def background() -> Iterator[Callable[..., Future]]:
    """background(fn, *args): run a blocking SDK call on another thread; its Future."""
    with ThreadPoolExecutor(4) as pool:
        yield pool.submit


def names(key_client: Any) -> list:
    return [key.name for key in key_client.list_properties_of_keys()]


def test_held_before_the_vault_acts_nothing_has_changed_and_others_go_on(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    with localvault.hold_next("createkey") as hold:  # any case, as fail_next takes it
        assert hold.describe() == {"id": hold.id, "operation": "CreateKey", "when": "before", "held": False}
        created = background(key_client.create_ec_key, unique_key_name)
        assert hold.wait(60) and hold.held
        assert names(key_client) == []  # other requests are served meanwhile, and the key is not there yet
        assert not created.done()
    assert created.result(60).name == unique_key_name
    assert not hold.held and names(key_client) == [unique_key_name]


def test_held_after_the_vault_acts_the_change_is_made_and_the_answer_waits(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    key_client.create_ec_key(unique_key_name)
    with localvault.hold_next("DeleteKey", when="after") as hold:
        deleting = background(key_client.begin_delete_key, unique_key_name)
        assert hold.wait(60)
        assert names(key_client) == []
        assert [k.name for k in key_client.list_deleted_keys()] == [unique_key_name]
        assert not deleting.done()
    deleting.result(60).wait()
    assert [r["operation"] for r in localvault.requests() if r["status"] == 200][-1] == "GetDeletedKey"


def test_an_error_answer_is_held_too(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    with localvault.hold_next("GetKey", "after") as hold:
        missing = background(key_client.get_key, unique_key_name)
        assert hold.wait(60) and not missing.done()
    with pytest.raises(ResourceNotFoundError):
        missing.result(60)


def test_only_the_next_request_is_held_and_each_hold_takes_one(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    with localvault.hold_next("CreateKey") as first, localvault.hold_next("CreateKey") as second:
        one = background(key_client.create_ec_key, unique_key_name + "-1")
        assert first.wait(60)
        two = background(key_client.create_ec_key, unique_key_name + "-2")
        assert second.wait(60)  # the second hold takes the second request, while the first is held
        assert [h["held"] for h in localvault.controls.holds.describe()] == [True, True]
        first.release()
        assert one.result(60).name == unique_key_name + "-1" and not two.done()
    assert two.result(60).name == unique_key_name + "-2"
    key_client.create_ec_key(unique_key_name + "-3")  # no hold is left: not held
    assert localvault.controls.holds.describe() == []


def test_a_hold_released_before_any_request_came_is_cancelled(
    localvault: LocalVault, key_client: Any, unique_key_name: str
) -> None:
    hold = localvault.hold_next("CreateKey")
    hold.release()
    key_client.create_ec_key(unique_key_name)
    assert not hold.reached and localvault.controls.holds.describe() == []


def test_a_held_request_goes_on_by_itself_after_its_timeout(
    localvault: LocalVault, key_client: Any, unique_key_name: str
) -> None:
    hold = localvault.hold_next("GetKeyVersions", timeout=0.05)
    assert list(key_client.list_properties_of_key_versions(unique_key_name)) == []
    assert hold.reached


def test_reset_and_stop_release_every_hold(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    held = localvault.hold_next("CreateKey")
    pending = localvault.hold_next("GetKey")
    created = background(key_client.create_ec_key, unique_key_name)
    assert held.wait(60)
    localvault.reset()
    assert created.result(60).name == unique_key_name
    assert localvault.controls.holds.describe() == []
    key_client.get_key(unique_key_name)
    assert not pending.reached

    with LocalVault() as vault, vault.key_client() as client:
        hold = vault.hold_next("GetKey")
        getting = background(client.get_key, unique_key_name)
        assert hold.wait(60)
        stopper = threading.Thread(target=vault.stop)
        stopper.start()
        stopper.join(120)
        assert not stopper.is_alive() and not hold.held
        assert getting.exception(60) is not None  # its connection is closed: the SDK call fails


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("NoSuchOperation",), "unknown operation 'NoSuchOperation'"),
        (("GetKey", "during"), "'when' must be before or after"),
        (("GetKey", "before", 0), "the timeout must be a number of seconds above 0 and at most 3600"),
        (("GetKey", "before", True), "the timeout must be a number of seconds"),
    ],
)
def test_hold_next_refuses_what_it_cannot_do(localvault: LocalVault, arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        localvault.hold_next(*arguments)
    assert localvault.controls.holds.describe() == []


def test_the_control_api_sets_waits_for_and_releases_a_hold(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    response = control(localvault, "POST", "holds", json={"operation": "createkey", "when": "after"})
    assert response.status_code == 200, response.text
    hold = response.json()
    assert hold == {"id": hold["id"], "operation": "CreateKey", "when": "after", "held": False}
    created = background(key_client.create_ec_key, unique_key_name)
    waited = control(localvault, "POST", "wait-held", json={"id": hold["id"], "timeout": 60})
    assert waited.status_code == 200 and waited.json() == dict(hold, held=True)
    assert control(localvault, "GET", "holds").json() == {"holds": [dict(hold, held=True)]}
    assert not created.done()
    released = control(localvault, "DELETE", "holds", json={"id": hold["id"]})
    assert released.status_code == 200 and released.json() == {"holds": []}
    assert created.result(60).name == unique_key_name
    gone = control(localvault, "POST", "wait-held", json={"id": hold["id"]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "NotFound"


def test_the_control_api_releases_every_hold_and_refuses_a_bad_one(
    localvault: LocalVault, key_client: Any, unique_key_name: str, background: Callable[..., Future]
) -> None:
    bad = ({"operation": "Nope"}, {"operation": "GetKey", "when": 1}, {"operation": "GetKey", "timeout": -1}, {})
    for body in bad:
        refused = control(localvault, "POST", "holds", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "BadParameter", body
        assert refused.json()["error"]["message"].startswith("Invalid hold: ")
    hold = control(localvault, "POST", "holds", json={"operation": "GetKey"}).json()
    assert len(control(localvault, "GET", "holds").json()["holds"]) == 1
    key_client.create_ec_key(unique_key_name)
    getting = background(key_client.get_key, unique_key_name)
    assert control(localvault, "POST", "wait-held", json={"id": hold["id"], "timeout": 60}).json()["held"]
    assert control(localvault, "DELETE", "holds").json() == {"holds": []}
    assert getting.result(60).name == unique_key_name
