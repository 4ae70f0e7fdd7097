"""Key rotation, rotation policies and the vault's clock, through the real KeyClient and raw REST."""

from __future__ import annotations

import datetime
import random

import isodate
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import (
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
    KeyType,
)
from helpers import error_of

from localvault import LocalVault
from localvault.models import MAX_CATCH_UP_ROTATIONS, TRIGGERS

DAY = datetime.timedelta(days=1)
ROTATE, NOTIFY = KeyRotationPolicyAction.rotate, KeyRotationPolicyAction.notify


def _actions(policy):
    return [(a.action, a.time_after_create, a.time_before_expiry) for a in policy.lifetime_actions]


def _set_policy(key_client, name, *actions, expires_in=None):
    return key_client.update_key_rotation_policy(
        name, KeyRotationPolicy(), lifetime_actions=list(actions), expires_in=expires_in
    )


def _set_rotate(key_client, name, expires_in=None, **trigger):
    action = KeyRotationLifetimeAction(ROTATE, **trigger)
    return _set_policy(key_client, name, action, expires_in=expires_in)


def _versions(key_client, name):
    return sorted(key_client.list_properties_of_key_versions(name), key=lambda p: p.created_on)


# -- manual rotation -------------------------------------------------------------------------------


def test_rotate_keeps_type_size_exponent_ops_and_tags(key_client, unique_key_name):
    key = key_client.create_rsa_key(
        unique_key_name,
        size=3072,
        public_exponent=3,
        hardware_protected=True,
        key_operations=["sign", "verify"],
        tags={"team": "keys"},
        enabled=False,
    )
    rotated = key_client.rotate_key(unique_key_name)
    assert rotated.properties.version != key.properties.version
    assert rotated.id == f"{key_client.vault_url}/keys/{unique_key_name}/{rotated.properties.version}"
    assert rotated.key.n != key.key.n
    assert rotated.key_type == KeyType.rsa_hsm
    assert len(rotated.key.n) * 8 == 3072 and rotated.key.e == b"\x03"
    assert rotated.key_operations == ["sign", "verify"]
    assert rotated.properties.tags == {"team": "keys"}
    assert rotated.properties.enabled is True
    assert rotated.properties.expires_on is None  # the default policy has no expiryTime
    assert key_client.get_key(unique_key_name).id == rotated.id
    assert len(_versions(key_client, unique_key_name)) == 2


def test_rotate_keeps_the_curve(key_client, unique_key_name):
    key = key_client.create_ec_key(unique_key_name, curve="P-384")
    rotated = key_client.rotate_key(unique_key_name)
    assert rotated.key_type == KeyType.ec and rotated.key.crv == "P-384"
    assert rotated.key.x != key.key.x
    assert rotated.key_operations == ["sign", "verify"] and rotated.properties.tags is None


@pytest.mark.parametrize("expiry", ["P90D", "P3M", "P1Y10D"])
def test_rotated_version_expires_as_the_policy_says(key_client, unique_key_name, expiry):
    key_client.create_ec_key(unique_key_name)
    _set_policy(key_client, unique_key_name, expires_in=expiry)
    rotated = key_client.rotate_key(unique_key_name).properties
    assert rotated.expires_on == rotated.created_on + isodate.parse_duration(expiry)


def test_rotate_missing_or_deleted_key(key_client, unique_key_name):
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.rotate_key(unique_key_name)
    assert info.value.error.code == "KeyNotFound"
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    with pytest.raises(ResourceNotFoundError):
        key_client.rotate_key(unique_key_name)


# -- policies --------------------------------------------------------------------------------------


def test_new_key_has_the_default_policy(key_client, unique_key_name):
    key_client.create_rsa_key(unique_key_name)
    policy = key_client.get_key_rotation_policy(unique_key_name)
    assert policy.id == f"{key_client.vault_url}/keys/{unique_key_name}/rotationpolicy"
    assert _actions(policy) == [(NOTIFY, None, "P30D")]
    # never set: no expiryTime and no stamps
    assert policy.expires_in is None and policy.created_on is None and policy.updated_on is None


def test_policy_round_trip(key_client, localvault, unique_key_name):
    key_client.create_rsa_key(unique_key_name)
    # no actions: the default Notify comes back
    empty = key_client.update_key_rotation_policy(unique_key_name, KeyRotationPolicy())
    assert _actions(empty) == [(NOTIFY, None, "P30D")] and empty.expires_in is None
    created = empty.created_on
    assert created is not None

    localvault.clock.advance(hours=1)
    updated = _set_policy(
        key_client, unique_key_name, KeyRotationLifetimeAction(ROTATE, time_after_create="P2M")
    )
    assert _actions(updated) == [(ROTATE, "P2M", None), (NOTIFY, None, "P30D")]
    assert updated.expires_in is None
    assert updated.created_on == created and updated.updated_on - created >= datetime.timedelta(hours=1)
    fetched = key_client.get_key_rotation_policy(unique_key_name)
    assert vars(fetched) | {"lifetime_actions": None} == vars(updated) | {"lifetime_actions": None}
    assert _actions(fetched) == _actions(updated)

    # a round-tripped policy with a new expiry keeps its actions
    with_expiry = key_client.update_key_rotation_policy(unique_key_name, fetched, expires_in="P90D")
    assert with_expiry.expires_in == "P90D"
    assert _actions(with_expiry) == _actions(updated)

    # the given Notify replaces the default one; PUT replaces the actions
    notify = key_client.update_key_rotation_policy(
        unique_key_name,
        with_expiry,
        lifetime_actions=[KeyRotationLifetimeAction(NOTIFY, time_before_expiry="P60D")],
    )
    assert _actions(notify) == [(NOTIFY, None, "P60D")] and notify.expires_in == "P90D"
    assert _actions(key_client.get_key_rotation_policy(unique_key_name)) == [(NOTIFY, None, "P60D")]


def test_policy_on_the_wire(raw, unique_key_name):
    raw.request("POST", f"/keys/{unique_key_name}/create", json={"kty": "EC"})
    body = {
        "lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "rotate"}},
            {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "NOTIFY"}},
        ],
        "attributes": {"expiryTime": "P2Y"},
    }
    response = raw.request("PUT", f"/keys/{unique_key_name}/rotationpolicy", json=body)
    assert response.status_code == 200, response.text
    policy = response.json()
    assert set(policy) == {"id", "lifetimeActions", "attributes"}
    assert policy["id"] == f"{raw.vault.url}/keys/{unique_key_name}/rotationpolicy"
    # action types are compared case-insensitively and come back in the service's spelling
    assert policy["lifetimeActions"] == [
        {"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "Rotate"}},
        {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}},
    ]
    assert set(policy["attributes"]) == {"expiryTime", "created", "updated"}
    assert policy["attributes"]["expiryTime"] == "P2Y"
    assert raw.request("GET", f"/keys/{unique_key_name}/rotationpolicy").json() == policy


def _action(trigger, kind="Rotate"):
    return {"trigger": trigger, "action": {"type": kind}}


@pytest.mark.parametrize(
    "body",
    [
        # durations that are not ISO 8601, or too large to add to a date
        {"lifetimeActions": [_action({"timeAfterCreate": "90 days"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "P1X"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": ""})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "P99999999999Y"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "P" + "9" * 5000 + "D"})]},
        {"attributes": {"expiryTime": "two years"}},
        # both triggers in one action, or none
        {"lifetimeActions": [_action({"timeAfterCreate": "P30D", "timeBeforeExpiry": "P30D"})]},
        {"lifetimeActions": [_action({})]},
        # unknown action type
        {"lifetimeActions": [_action({"timeAfterCreate": "P30D"}, "Delete")]},
        # rotate before expiry with no expiryTime to count from
        {"lifetimeActions": [_action({"timeBeforeExpiry": "P30D"})]},
        # notify only before expiry
        {"lifetimeActions": [_action({"timeAfterCreate": "P30D"}, "Notify")]},
        # expiryTime under 28 days; triggers under 7 days, or within 7 days of expiry
        {"attributes": {"expiryTime": "P27D"}},
        {"lifetimeActions": [_action({"timeAfterCreate": "P6D"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "-P30D"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "P84D"})], "attributes": {"expiryTime": "P90D"}},
        {"lifetimeActions": [_action({"timeBeforeExpiry": "P84D"})], "attributes": {"expiryTime": "P90D"}},
        # at most one Rotate and one Notify
        {"lifetimeActions": [_action({"timeAfterCreate": "P30D"}), _action({"timeAfterCreate": "P60D"})]},
        {"lifetimeActions": [_action({"timeAfterCreate": "P30D"})] * 3},
        # shapes
        {"lifetimeActions": "Rotate"},
        {"lifetimeActions": ["Rotate"]},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}}]},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": 30}, "action": {"type": "Rotate"}}]},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": 1}}]},
        {"attributes": {"expiryTime": 90}},
        {"attributes": []},
    ],
)
def test_invalid_policies_are_400_and_change_nothing(raw, unique_key_name, body):
    raw.request("POST", f"/keys/{unique_key_name}/create", json={"kty": "EC"})
    before = raw.request("GET", f"/keys/{unique_key_name}/rotationpolicy").json()
    response = raw.request("PUT", f"/keys/{unique_key_name}/rotationpolicy", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "BadParameter"
    assert raw.request("GET", f"/keys/{unique_key_name}/rotationpolicy").json() == before


def _random_policy_part(rng, depth=0):
    words = ["lifetimeActions", "trigger", "action", "type", "attributes", "expiryTime", *TRIGGERS]
    values = ["Rotate", "notify", "P30D", "P1Y", "PT48H", "-P7D", "P", "", "P1M2D", 7, None, True, 1.5]
    if depth > 3 or rng.random() < 0.4:
        return rng.choice(values)
    if rng.random() < 0.3:
        return [_random_policy_part(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(words): _random_policy_part(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_random_policies_never_crash_the_server(raw, unique_key_name):
    rng = random.Random(20261129)  # fixed seed: the same requests every run
    raw.request("POST", f"/keys/{unique_key_name}/create", json={"kty": "EC"})
    statuses = set()
    for _ in range(300):
        body = _random_policy_part(rng)
        response = raw.request("PUT", f"/keys/{unique_key_name}/rotationpolicy", json=body)
        assert response.status_code in (200, 400), (body, response.text)
        if response.status_code == 400:
            error_of(response)
        statuses.add(response.status_code)
    assert statuses == {200, 400}
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 200


def test_invalid_policy_through_the_sdk(key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    with pytest.raises(HttpResponseError) as info:
        _set_rotate(key_client, unique_key_name, time_after_create="P1X")
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"
    assert "timeAfterCreate" in info.value.error.message


def test_policy_of_a_missing_key(key_client, raw, unique_key_name):
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.get_key_rotation_policy(unique_key_name)
    assert info.value.error.code == "KeyNotFound"
    response = raw.request("PUT", f"/keys/{unique_key_name}/rotationpolicy", json={})
    assert response.status_code == 404 and error_of(response)["code"] == "KeyNotFound"


def test_policy_survives_delete_and_recover(key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    _set_rotate(key_client, unique_key_name, "P60D", time_after_create="P30D")
    key_client.begin_delete_key(unique_key_name).wait()
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key_rotation_policy(unique_key_name)
    key_client.begin_recover_deleted_key(unique_key_name).wait()
    policy = key_client.get_key_rotation_policy(unique_key_name)
    assert _actions(policy) == [(ROTATE, "P30D", None), (NOTIFY, None, "P30D")]
    assert policy.expires_in == "P60D"


def test_backup_carries_the_policy(key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    set_policy = _set_policy(key_client, unique_key_name, expires_in="P60D")
    blob = key_client.backup_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    key_client.purge_deleted_key(unique_key_name)
    key_client.restore_key_backup(blob)
    restored = key_client.get_key_rotation_policy(unique_key_name)
    assert restored.expires_in == "P60D" and restored.created_on == set_policy.created_on
    assert key_client.rotate_key(unique_key_name).properties.expires_on is not None


# -- the clock -------------------------------------------------------------------------------------


def test_due_rotations_happen_when_the_clock_moves(key_client, localvault, unique_key_name):
    key = key_client.create_ec_key(unique_key_name, tags={"a": "1"}, key_operations=["sign"])
    created = key.properties.created_on
    _set_rotate(key_client, unique_key_name, "P60D", time_after_create="P30D")
    localvault.clock.advance(days=29)
    assert key_client.get_key(unique_key_name).id == key.id

    localvault.clock.advance(days=2)
    latest = key_client.get_key(unique_key_name)
    assert latest.id != key.id
    # made as of its due time, with the policy's expiry, the same curve, ops and tags
    assert latest.properties.created_on == created + 30 * DAY
    assert latest.properties.expires_on == created + 90 * DAY
    assert latest.key.crv == "P-256" and latest.key_operations == ["sign"]
    assert latest.properties.tags == {"a": "1"}

    # two more fall due (days 60 and 90); the list paths see them too
    localvault.clock.advance(days=61)
    listed = next(p for p in key_client.list_properties_of_keys() if p.name == unique_key_name)
    assert listed.created_on == created + 90 * DAY
    assert [v.created_on - created for v in _versions(key_client, unique_key_name)] == [
        0 * DAY,
        30 * DAY,
        60 * DAY,
        90 * DAY,
    ]


def test_a_policy_set_late_rotates_from_when_it_was_set(key_client, localvault, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    localvault.clock.advance(days=100)
    policy = _set_rotate(key_client, unique_key_name, time_after_create="P30D")
    # overdue since day 30: one rotation as of the policy's setting, not three back-dated ones
    versions = _versions(key_client, unique_key_name)
    assert len(versions) == 2 and versions[1].created_on == policy.updated_on


def test_rotation_before_expiry(key_client, localvault, unique_key_name):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    key = key_client.create_ec_key(unique_key_name, expires_on=now + 20 * DAY)
    _set_rotate(key_client, unique_key_name, "P60D", time_before_expiry="P10D")
    localvault.clock.advance(days=9)
    assert len(_versions(key_client, unique_key_name)) == 1
    localvault.clock.advance(days=2)
    latest = key_client.get_key(unique_key_name).properties
    assert latest.version != key.properties.version
    assert latest.created_on == now + 10 * DAY
    assert latest.expires_on == now + 70 * DAY  # next due at day 60


def test_notify_does_nothing_observable(key_client, localvault, unique_key_name):
    now = datetime.datetime.now(datetime.timezone.utc)
    key = key_client.create_ec_key(unique_key_name, expires_on=now + 40 * DAY)
    localvault.clock.advance(days=365)
    assert [v.version for v in _versions(key_client, unique_key_name)] == [key.properties.version]


def test_many_due_rotations_are_bounded(key_client, localvault, unique_key_name):
    key = key_client.create_ec_key(unique_key_name)
    _set_rotate(key_client, unique_key_name, time_after_create="P7D")
    localvault.clock.advance(days=3650)  # 521 due
    versions = _versions(key_client, unique_key_name)
    # only the latest due ones are made, each as of its due time
    assert len(versions) == 1 + MAX_CATCH_UP_ROTATIONS
    assert versions[-1].created_on == key.properties.created_on + 521 * 7 * DAY
    assert versions[1].created_on == key.properties.created_on + (522 - MAX_CATCH_UP_ROTATIONS) * 7 * DAY
    # nothing more is due until the next week
    assert len(_versions(key_client, unique_key_name)) == 1 + MAX_CATCH_UP_ROTATIONS


def test_deleted_keys_are_purged_when_their_date_passes(key_client, localvault, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    deleted = key_client.begin_delete_key(unique_key_name).result()
    assert deleted.scheduled_purge_date - deleted.deleted_date == 90 * DAY
    localvault.clock.advance(days=89)
    assert key_client.get_deleted_key(unique_key_name).name == unique_key_name
    localvault.clock.advance(days=2)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_deleted_key(unique_key_name)
    assert unique_key_name not in {d.name for d in key_client.list_deleted_keys()}
    # the name is free again
    assert key_client.create_ec_key(unique_key_name).name == unique_key_name


# -- Managed HSM -----------------------------------------------------------------------------------


def test_managed_hsm_policies_have_no_notify_and_oct_keys_rotate():
    with LocalVault(managed_hsm=True) as hsm:
        client = hsm.key_client()
        try:
            client.create_oct_key("mhsm", size=128, hardware_protected=True)
            policy = client.get_key_rotation_policy("mhsm")
            assert policy.lifetime_actions == [] and policy.created_on is None
            # a policy with no actions stays empty; Notify is Key Vault only
            assert client.update_key_rotation_policy("mhsm", KeyRotationPolicy()).lifetime_actions == []
            notify = KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P30D")
            with pytest.raises(HttpResponseError, match="Key Vault only"):
                client.update_key_rotation_policy(
                    "mhsm", KeyRotationPolicy(lifetime_actions=[notify], expires_in="P90D")
                )
            rotate = KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D")
            updated = client.update_key_rotation_policy(
                "mhsm", KeyRotationPolicy(lifetime_actions=[rotate], expires_in="P90D")
            )
            assert [(a.action, a.time_after_create) for a in updated.lifetime_actions] == [("Rotate", "P30D")]
            rotated = client.rotate_key("mhsm")
            assert rotated.key_type == "oct-HSM" and rotated.properties.version
            assert (rotated.properties.expires_on - rotated.properties.created_on).days == 90
            versions = [v.version for v in client.list_properties_of_key_versions("mhsm")]
            assert len(versions) == 2 and rotated.properties.version in versions
        finally:
            client.close()
