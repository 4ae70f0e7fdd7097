"""Injected faults (429, 500, 503, a dropped connection) and the delete delay, through the real SDK and on
the wire."""

from __future__ import annotations

import pytest
import requests
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import error_of
from test_localvault_crypto import ec_jwk

THROTTLED = (
    "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached"
)
CODES = {"429": "Throttled", "500": "InternalServerError", "503": "ServiceUnavailable"}
EC_BODY = {"kty": "EC", "crv": "P-256"}


def _log(vault, name, operation=None):
    """(operation, status, fault) of the logged requests about key ``name``, less the SDK's first, token-less
    request (a 401 challenge), which a client makes only when no earlier test has made it for this vault."""
    return [
        (r["operation"], r["status"], r["fault"])
        for r in vault.requests()
        if r["path"].split("/")[2:3] == [name] and operation in (None, r["operation"]) and r["status"] != 401
    ]


# -- each fault -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "503"])
def test_a_fault_answers_the_service_error_and_the_failed_create_leaves_no_key(
    localvault, raw, unique_key_name, fault
):
    localvault.fail_next(1, fault, ["CreateKey"])
    response = raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY)
    assert response.status_code == int(fault)
    error = error_of(response)
    assert error["code"] == CODES[fault]
    if fault == "429":
        assert error["message"] == THROTTLED
        assert response.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in response.headers
    missing = raw.request("GET", f"/keys/{unique_key_name}")
    assert missing.status_code == 404 and error_of(missing)["code"] == "KeyNotFound"
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200


def test_sdk_retries_a_throttled_create_after_retry_after_and_makes_one_version(
    localvault, key_client, unique_key_name
):
    localvault.fail_next(1, "429", ["CreateKey"])
    key = key_client.create_ec_key(unique_key_name)
    assert [v.version for v in key_client.list_properties_of_key_versions(unique_key_name)] == [
        key.properties.version
    ]
    assert _log(localvault, unique_key_name, "CreateKey")[-2:] == [
        ("CreateKey", 429, "429"),
        ("CreateKey", 200, None),
    ]


@pytest.mark.parametrize("fault", ["500", "503"])
def test_sdk_retries_server_errors_on_get_and_post(localvault, key_client, unique_key_name, fault):
    localvault.fail_next(1, fault, ["CreateKey"])
    key = key_client.create_ec_key(unique_key_name)
    localvault.fail_next(2, fault, ["GetKey"])
    assert key_client.get_key(unique_key_name).id == key.id
    assert len(list(key_client.list_properties_of_key_versions(unique_key_name))) == 1
    statuses = [status for _, status, _ in _log(localvault, unique_key_name)]
    assert statuses == [int(fault), 200, int(fault), int(fault), 200, 200]


def test_a_dropped_create_is_an_sdk_error_and_leaves_no_key(localvault, key_client, unique_key_name):
    localvault.fail_next(1, "drop", ["CreateKey"])
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        key_client.create_ec_key(unique_key_name)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)
    assert _log(localvault, unique_key_name, "CreateKey") == [("CreateKey", None, "drop")]


def test_a_dropped_get_is_retried_by_the_sdk(localvault, key_client, unique_key_name):
    key = key_client.create_ec_key(unique_key_name)
    localvault.fail_next(1, "drop", ["GetKey"])
    assert key_client.get_key(unique_key_name).id == key.id
    assert _log(localvault, unique_key_name, "GetKey") == [("GetKey", None, "drop"), ("GetKey", 200, None)]


def test_a_dropped_connection_gets_no_answer_at_all(localvault, raw):
    localvault.fail_next(1, "drop")
    with pytest.raises(requests.ConnectionError):
        raw.request("GET", "/keys")
    assert raw.request("GET", "/keys").status_code == 200


def test_an_unauthenticated_request_gets_401_and_leaves_the_fault_for_the_next(localvault, raw):
    localvault.fail_next(1, "503")
    assert (
        requests.get(f"{localvault.url}/keys?api-version=7.5", verify=localvault.ca_file).status_code == 401
    )
    assert raw.request("GET", "/keys").status_code == 503
    assert raw.request("GET", "/keys").status_code == 200


# -- rates, seeds and filters ---------------------------------------------------------------------


def _statuses(raw, count=40):
    return [raw.request("GET", "/keys").status_code for _ in range(count)]


def test_rates_with_a_seed_fail_the_same_requests_every_time(localvault, raw):
    localvault.set_faults({"503": 0.3, "429": 0.2}, seed=7)
    first = _statuses(raw)
    localvault.set_faults({"503": 0.3, "429": 0.2}, seed=7)  # the sequence starts again from the seed
    assert _statuses(raw) == first
    assert {200, 429, 503} == set(first)
    localvault.set_faults({"503": 0.3, "429": 0.2}, seed=8)
    assert _statuses(raw) != first


def test_rates_apply_only_to_the_chosen_operations(localvault, raw, unique_key_name):
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200
    localvault.set_faults({"503": 1.0}, operations=["getkey"])  # operationIds in any case
    assert localvault.faults.describe()["operations"] == ["GetKey"]
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 503
    assert raw.request("GET", "/keys").status_code == 200
    assert raw.request("PATCH", f"/keys/{unique_key_name}", json={"tags": {"a": "b"}}).status_code == 200
    localvault.set_faults({})
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 200


def test_fail_next_counts_only_its_operations_and_comes_before_rates(localvault, raw, unique_key_name):
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200
    localvault.set_faults({"429": 1.0}, operations=["GetKeys"])
    localvault.fail_next(2, "500", ["GetKey"])
    assert raw.request("GET", "/keys").status_code == 429
    assert [raw.request("GET", f"/keys/{unique_key_name}").status_code for _ in range(3)] == [500, 500, 200]
    localvault.clear_faults()
    assert raw.request("GET", "/keys").status_code == 200


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.set_faults({"429": 1.5}),
        lambda v: v.set_faults({"429": 0.6, "503": 0.6}),
        lambda v: v.set_faults({"404": 0.1}),
        lambda v: v.set_faults({"503": 0.1}, seed="7"),
        lambda v: v.set_faults({"503": 0.1}, operations=["NoSuchOperation"]),
        lambda v: v.fail_next(0, "503"),
        lambda v: v.fail_next(1, "418"),
        lambda v: v.set_delete_delay(-1),
    ],
)
def test_invalid_fault_settings_are_refused(localvault, call):
    with pytest.raises(ValueError):
        call(localvault)
    assert localvault.faults.describe() == {"rates": {}, "seed": None, "operations": None, "next": []}


# -- the delete delay -------------------------------------------------------------------------------


def test_delete_poller_really_waits_for_a_pending_deletion(localvault, key_client, unique_key_name):
    localvault.set_delete_delay(0.5)
    key_client.create_ec_key(unique_key_name)
    poller = key_client.begin_delete_key(unique_key_name)
    poller.wait()
    assert poller.done()
    polls = _log(localvault, unique_key_name, "GetDeletedKey")
    assert len(polls) >= 2 and polls[0][1] == 404 and polls[-1][1] == 200
    assert key_client.get_deleted_key(unique_key_name).name == unique_key_name
    key_client.purge_deleted_key(unique_key_name)


def test_recover_poller_really_waits_for_a_pending_recovery(localvault, key_client, unique_key_name):
    key = key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    localvault.set_delete_delay(0.5)
    poller = key_client.begin_recover_deleted_key(unique_key_name)
    poller.wait()
    polls = _log(localvault, unique_key_name, "GetKey")
    assert len(polls) >= 2 and polls[0][1] == 404 and polls[-1][1] == 200
    assert key_client.get_key(unique_key_name).id == key.id


def test_while_a_deletion_is_pending_the_name_is_neither_found_nor_reusable(
    localvault, raw, key_client, unique_key_name
):
    key_client.create_ec_key(unique_key_name)
    backup = key_client.backup_key(unique_key_name)
    localvault.set_delete_delay(3600)
    key_client.begin_delete_key(unique_key_name)
    name = unique_key_name
    for path in (f"/keys/{name}", f"/deletedkeys/{name}"):
        response = raw.request("GET", path)
        assert response.status_code == 404 and error_of(response)["code"] == "KeyNotFound"
    assert error_of(raw.request("GET", f"/deletedkeys/{name}"))["message"] == f"Deleted Key not found: {name}"
    assert name not in [d.name for d in key_client.list_deleted_keys()]
    recreate = f"Key {name} is currently being deleted and cannot be re-created; retry later."
    response = raw.request("POST", f"/keys/{name}/create", json=EC_BODY)
    assert response.status_code == 409
    assert error_of(response) == {
        "code": "Conflict",
        "message": recreate,
        "innererror": {"code": "ObjectIsBeingDeleted"},
    }
    jwk = ec_jwk(ec.generate_private_key(ec.SECP256R1()), "EC", "P-256")
    for attempt in (lambda: key_client.import_key(name, jwk), lambda: key_client.restore_key_backup(backup)):
        with pytest.raises(ResourceExistsError) as conflict:
            attempt()
        assert conflict.value.message.startswith(f"(Conflict) {recreate}")
    for method, path in (("DELETE", f"/deletedkeys/{name}"), ("POST", f"/deletedkeys/{name}/recover")):
        response = raw.request(method, path)
        assert response.status_code == 409
        assert error_of(response) == {
            "code": "Conflict",
            "message": "Key is currently being deleted.",
            "innererror": {"code": "ObjectIsBeingDeleted"},
        }
    localvault.clock.advance(seconds=3600)  # moving the vault's clock completes it
    assert key_client.get_deleted_key(name).name == name


def test_while_a_recovery_is_pending_the_key_is_not_found(localvault, raw, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    localvault.set_delete_delay(60)
    key_client.begin_recover_deleted_key(unique_key_name)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_deleted_key(unique_key_name)
    response = raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY)
    assert response.status_code == 409
    assert error_of(response)["message"] == (
        f"Key {unique_key_name} is currently being recovered and cannot be re-created; retry later."
    )
    localvault.clock.advance(minutes=1)
    assert key_client.get_key(unique_key_name).name == unique_key_name


def test_a_pending_deletion_past_its_purge_date_is_purged(localvault, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    localvault.set_delete_delay(3600)
    key_client.begin_delete_key(unique_key_name)
    localvault.clock.advance(days=91)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_deleted_key(unique_key_name)
    assert key_client.create_ec_key(unique_key_name).name == unique_key_name


def test_without_delay_deletion_completes_at_once(key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).result()
    assert key_client.get_deleted_key(unique_key_name).name == unique_key_name
    with pytest.raises(HttpResponseError) as conflict:
        key_client.create_ec_key(unique_key_name)
    assert "deleted but recoverable" in conflict.value.message
