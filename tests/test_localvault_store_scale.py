"""The store under load: due rotations made outside its lock, catch-up and listing costs that do not grow
with the vault, and a rotate that acts on the key it started on."""

from __future__ import annotations

import builtins
import datetime
import threading
from typing import Any, List

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyRotationLifetimeAction, KeyRotationPolicy, KeyRotationPolicyAction

from localvault import models
from localvault.jwk import generate_key
from localvault.models import MAX_CATCH_UP_ROTATIONS, ROTATE, TIME_AFTER_CREATE, KeyStore

DAY = datetime.timedelta(days=1)


def _set_rotate(key_client: Any, name: str, **trigger: str) -> None:
    action = KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, **trigger)
    key_client.update_key_rotation_policy(name, KeyRotationPolicy(), lifetime_actions=[action])


def _versions(key_client: Any, name: str) -> List[Any]:
    return sorted(key_client.list_properties_of_key_versions(name), key=lambda p: p.created_on)


def _lock_is_free(store: KeyStore) -> bool:
    """Whether another thread could take the store's lock now."""
    free: List[bool] = []

    def probe() -> None:
        free.append(store._lock.acquire(blocking=False))
        if free[-1]:
            store._lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free[0]


def test_due_versions_are_generated_outside_the_store_lock(
    key_client: Any, localvault: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_client.create_ec_key(unique_key_name)
    _set_rotate(key_client, unique_key_name, time_after_create="P7D")
    real = models.regenerate_key
    lock_free: List[bool] = []

    def observed(*args: Any) -> Any:
        lock_free.append(_lock_is_free(localvault.store))
        return real(*args)

    monkeypatch.setattr(models, "regenerate_key", observed)
    localvault.clock.advance(days=15)
    assert len(_versions(key_client, unique_key_name)) == 3
    assert lock_free == [True, True]


def test_a_far_clock_makes_the_latest_due_versions_at_once(
    key_client: Any, localvault: Any, unique_key_name: str
) -> None:
    key = key_client.create_ec_key(unique_key_name)
    _set_rotate(key_client, unique_key_name, time_after_create="P7D")
    created = key.properties.created_on
    target = datetime.datetime(8999, 1, 1, tzinfo=datetime.timezone.utc)
    localvault.clock.advance(target - created)
    versions = _versions(key_client, unique_key_name)
    assert len(versions) == 1 + MAX_CATCH_UP_ROTATIONS
    # the latest due ones, a week apart, the last less than a week before the clock
    latest = versions[-1].created_on
    assert datetime.timedelta() <= target - latest < 7 * DAY
    assert (latest - created) % (7 * DAY) == datetime.timedelta()
    assert [b.created_on - a.created_on for a, b in zip(versions[1:], versions[2:])] == [7 * DAY] * 31
    # more requests make nothing more until the next one is due
    for _ in range(3):
        key_client.get_key(unique_key_name)
    assert len(_versions(key_client, unique_key_name)) == 1 + MAX_CATCH_UP_ROTATIONS


def test_a_request_does_not_look_at_keys_that_are_not_due(
    localvault: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: KeyStore = localvault.store
    for i in range(50):
        name = f"{unique_key_name}-{i}"
        store.add_version(name, "EC", generate_key("EC", None, None, None))
        store.set_rotation_policy(name, [models.LifetimeAction(ROTATE, TIME_AFTER_CREATE, "P30D")], None)
    looked: List[int] = []
    real = KeyStore._rotation_due

    def counted(*args: Any) -> Any:
        looked.append(1)
        return real(*args)

    monkeypatch.setattr(KeyStore, "_rotation_due", staticmethod(counted))
    store.get(f"{unique_key_name}-7")
    assert looked == []


def test_listing_sorts_nothing_per_page(
    localvault: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: KeyStore = localvault.store
    for i in range(60):
        store.add_version(f"{unique_key_name}-{i:03}", "EC", generate_key("EC", None, None, None))
    sorted_items: List[int] = []

    def counting_sorted(items: Any, **kwargs: Any) -> Any:
        result = builtins.sorted(items, **kwargs)
        sorted_items.append(len(result))
        return result

    monkeypatch.setattr(models, "sorted", counting_sorted, raising=False)
    names, marker = [], ""
    while marker is not None:
        page, marker = store.list_keys(marker, 25)
        names += [k.name for k in page]
    assert names == [f"{unique_key_name}-{i:03}" for i in range(60)]
    assert sum(sorted_items) == 0


def test_a_rotate_acts_on_the_key_it_started_on(
    key_client: Any, localvault: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_client.create_rsa_key(unique_key_name, tags={"old": "1"})
    real = models.regenerate_key

    def raced(*args: Any) -> Any:
        # while the rotation generates, the key is deleted, purged and made again as another key
        key_client.begin_delete_key(unique_key_name).result()
        key_client.purge_deleted_key(unique_key_name)
        key_client.create_ec_key(unique_key_name)
        return real(*args)

    monkeypatch.setattr(models, "regenerate_key", raced)
    with pytest.raises(HttpResponseError) as caught:
        key_client.rotate_key(unique_key_name)
    assert caught.value.status_code in (404, 409)
    monkeypatch.setattr(models, "regenerate_key", real)
    latest = key_client.get_key(unique_key_name)
    assert latest.key_type == "EC" and latest.properties.tags is None
    assert len(_versions(key_client, unique_key_name)) == 1
