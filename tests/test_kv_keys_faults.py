"""kv_keys.py under the failures a real vault produces, end to end: `python kv_keys.py` as a subprocess against an
in-process localvault that throttles, fails, drops connections, deletes slowly, withholds key permissions, has
purge protection or is a standard vault.

After each run, once the vault has finished every request (wait_idle), its keys and deleted keys are read
through the vault with the controls off: they must be exactly what the script reported, so that no key is left
that the script did not name. The vault's request log shows what the script and the SDK really sent.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from helpers import KV_KEYS, REPO, error_lines

import kv_keys
from localvault import LocalVault

THROTTLED = "(Throttled) Request was not processed because too many requests were received."
# The operations of a run with --purge, besides CreateKey, in their order.
OTHER_OPERATIONS = ["GetKey", "GetDeletedKey", "GetKeyVersions", "DeleteKey", "PurgeDeletedKey"]


@pytest.fixture
def run_script(clean_env: Dict[str, str]) -> Any:
    """run_script(vault, *argv): run kv_keys.py against vault, as a user of `python -m localvault` would."""

    def start(vault: LocalVault, *argv: str) -> subprocess.Popen:
        env = dict(clean_env, **vault.environ())
        del env["AZURE_TOKEN_CREDENTIALS"]  # the identity variables are set: managed identity is localvault
        return subprocess.Popen(
            [sys.executable, KV_KEYS, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )

    def run(vault: LocalVault, *argv: str) -> subprocess.CompletedProcess:
        return finish(start(vault, *argv))

    run.start = start
    return run


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def final_state(vault: LocalVault) -> Tuple[List[str], List[str]]:
    """The names of the vault's keys and deleted keys once no request is in flight, read with no fault and every
    permission; a deletion still pending counts as finished (the vault's clock is moved past it)."""
    assert vault.wait_idle(30)
    vault.clear_faults()
    vault.set_key_permissions(None)
    vault.clock.advance(hours=1)
    with vault.key_client() as client:
        keys = sorted(k.name for k in client.list_properties_of_keys())
        deleted = sorted(k.name for k in client.list_deleted_keys())
    return keys, deleted


def log(vault: LocalVault, *operations: str) -> List[Tuple[str, Any, Any]]:
    """(operation, status, fault) of the requests served, without the SDK's unauthenticated first request."""
    return [
        (r["operation"], r["status"], r["fault"])
        for r in vault.requests()
        if r["status"] != 401 and (not operations or r["operation"] in operations)
    ]


def failed(result: subprocess.CompletedProcess, code: int) -> List[str]:
    assert result.returncode == code, (result.stdout, result.stderr)
    return error_lines(result.stderr)


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result.stdout


@contextlib.contextmanager
def vaults(**controls: Any) -> Iterator[LocalVault]:
    with LocalVault(**controls) as vault:
        yield vault


# A vault of the test's own at https://NAME.vault.azure.net, with these options (the plugin's vault_at_url).
A_PROTECTED_VAULT = pytest.mark.parametrize("localvault_options", [{"purge_protection": True}], ids=["protected"])
A_STANDARD_VAULT = pytest.mark.parametrize("localvault_options", [{"sku": "standard"}], ids=["standard"])


# --------------------------------------------------------------------------------------------------------
# Throttling and transient failures
# --------------------------------------------------------------------------------------------------------


def test_thirty_percent_429_and_503_the_run_completes_and_leaves_no_key(run_script: Any) -> None:
    # Three vaults, each failing 30% of the requests with its own seed; the runs go in parallel. The seeds
    # make the create itself fail too (429 and 503), which the script tries again; the rest is azure-core's.
    seeds = (2, 8, 22)
    with contextlib.ExitStack() as stack:
        busy = [stack.enter_context(vaults(faults={"429": 0.15, "503": 0.15}, fault_seed=s)) for s in seeds]
        runs = [run_script.start(vault, "--name", "busy-key", "--purge") for vault in busy]
        results = [finish(process) for process in runs]
        for vault, result in zip(busy, results):
            succeeded(result)
            assert "The name 'busy-key' can be used again." in result.stdout
            creates = log(vault, "CreateKey")
            assert creates[-1] == ("CreateKey", 200, None) and len(creates) >= 2  # one version, after faults
            retried = [line for line in result.stdout.splitlines() if "trying the create again" in line]
            assert len(retried) == len(creates) - 1
            assert final_state(vault) == ([], [])
    faults = {(operation, fault) for vault in busy for operation, _, fault in log(vault) if fault}
    assert {fault for _, fault in faults} == {"429", "503"}
    assert {operation for operation, _ in faults} > {"CreateKey"}  # azure-core retried the others


def test_a_throttled_or_unavailable_create_is_tried_again_and_says_so(
    localvault: LocalVault, run_script: Any, unique_key_name: str
) -> None:
    localvault.fail_next(1, "503", ["CreateKey"])
    localvault.fail_next(1, "429", ["CreateKey"])
    result = run_script(localvault, "--name", unique_key_name)
    succeeded(result)
    lines = result.stdout.splitlines()
    start = lines.index(f"Creating a key in {localvault.url} called '{unique_key_name}' ...")
    assert lines[start + 1 : start + 4] == [
        "  the vault is unavailable (HTTP 503): trying the create again in 1 s (retry 1 of 5)",
        "  the vault is throttling requests (HTTP 429): trying the create again in 1 s (retry 2 of 5)",
        " done.",
    ]
    assert log(localvault, "CreateKey") == [
        ("CreateKey", 503, "503"),
        ("CreateKey", 429, "429"),
        ("CreateKey", 200, None),
    ]
    assert final_state(localvault) == ([], [unique_key_name])


def test_persistent_throttling_stops_with_the_vaults_limits(
    localvault: LocalVault, run_script: Any, unique_key_name: str
) -> None:
    localvault.fail_next(100, "429", ["CreateKey"])
    lines = failed(run_script(localvault, "--name", unique_key_name), kv_keys.ExitStatus.BUSY)
    assert lines == [
        f"error: {localvault.url} is throttling requests (HTTP 429), still after 5 retries: {THROTTLED} "
        "Reason: VaultRequestTypeLimitReached",
        "hint: Key Vault allows, per vault and region, every 10 seconds 20 creates of RSA-2048 or EC keys (10 of "
        "HSM keys) and 4,000 other operations (fewer on RSA 3072 and 4096 keys): wait a few seconds and run "
        "again, and check what else uses this vault (this localvault injects these answers: see its --faults)",
    ]
    assert log(localvault, "CreateKey") == [("CreateKey", 429, "429")] * 6
    assert final_state(localvault) == ([], [])


@pytest.mark.parametrize("fault", ["500", "503", "drop"])
def test_a_fault_on_every_other_request_is_retried_by_the_sdk(
    localvault: LocalVault, run_script: Any, unique_key_name: str, fault: str
) -> None:
    for operation in OTHER_OPERATIONS:
        localvault.fail_next(1, fault, [operation])
    succeeded(run_script(localvault, "--name", unique_key_name, "--purge"))
    assert len([1 for _, _, injected in log(localvault) if injected == fault]) == len(OTHER_OPERATIONS)
    assert final_state(localvault) == ([], [])


@pytest.mark.parametrize(
    ("fault", "code", "error"),
    [
        ("drop", kv_keys.ExitStatus.UNREACHABLE, "the connection was lost after the request was sent"),
        ("500", kv_keys.ExitStatus.SERVICE, "answered HTTP 500"),
    ],
)
def test_a_create_whose_outcome_is_unknown_is_not_retried_and_may_exist(
    localvault: LocalVault, run_script: Any, unique_key_name: str, fault: str, code: int, error: str
) -> None:
    # A dropped connection, or a 500, may come after the vault created the key: neither the SDK nor the script
    # sends the create again, and the script does not claim that nothing was created.
    localvault.fail_next(1, fault, ["CreateKey"])
    result = run_script(localvault, "--name", unique_key_name)
    lines = failed(result, code)
    assert error in lines[0]
    assert lines[2:] == [
        "cleanup: not attempted, since this run cannot know whether the key exists; to check: "
        f"KeyClient.get_key('{unique_key_name}') on {localvault.url}",
        f"cleanup: if it exists, delete it: KeyClient.begin_delete_key('{unique_key_name}') on {localvault.url}",
    ]
    assert "nothing was created" not in result.stderr
    assert log(localvault, "CreateKey") == [("CreateKey", None if fault == "drop" else 500, fault)]
    assert final_state(localvault) == ([], [])  # localvault decides a fault before it creates anything


def test_every_request_failing_after_the_create_names_the_key_left(
    localvault: LocalVault, run_script: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decide = localvault.faults.decide

    def decide(operation: str) -> None:
        real_decide(operation)
        if operation == "CreateKey":  # this create goes through; every request after it is throttled
            localvault.fail_next(1_000_000, "429")

    monkeypatch.setattr(localvault.faults, "decide", decide)
    result = run_script(localvault, "--name", unique_key_name)
    lines = failed(result, kv_keys.ExitStatus.BUSY)
    assert lines[0].startswith(
        f"error: {localvault.url} is throttling requests (HTTP 429), still after 5 retries"
    )
    [key_id] = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("  id:")]
    assert lines[2] == (
        f"cleanup: nothing deleted, since the vault did not answer the version check ({THROTTLED} Reason: "
        f"VaultRequestTypeLimitReached), so the name '{unique_key_name}' may hold versions that this run did not "
        f"create; this run created {key_id}"
    )
    assert lines[3] == (
        f"cleanup: if the key is yours alone, delete it: KeyClient.begin_delete_key('{unique_key_name}') on "
        f"{localvault.url}"
    )
    assert (
        log(localvault, "GetKeyVersions") == [("GetKeyVersions", 429, "429")] * 6
    )  # and the cleanup asked no more
    assert final_state(localvault) == ([unique_key_name], [])


# --------------------------------------------------------------------------------------------------------
# Key permissions, purge protection, the SKU
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("permission", ["get", "list", "create", "delete", "purge", "recover"])
def test_each_key_permission_withheld(
    localvault: LocalVault, run_script: Any, unique_key_name: str, permission: str
) -> None:
    name, url = unique_key_name, localvault.url
    localvault.set_key_permissions(
        [p for p in ("get", "list", "create", "delete", "purge", "recover") if p != permission]
    )
    result = run_script(localvault, "--name", name, "--purge")
    keys, deleted = final_state(localvault)
    if permission == "recover":  # the script never recovers a key
        succeeded(result)
        assert (keys, deleted) == ([], [])
        return
    lines = failed(result, kv_keys.ExitStatus.PERMISSION)
    hint = (
        f"hint: this localvault runs without the key permission {permission} (--key-permissions, or its control "
        "API): allow get, list, create, delete and purge, or restart it without --key-permissions"
    )
    assert lines[1] == hint
    if permission != "list":
        assert f"does not have keys {permission} permission" in lines[0]
    key_id = next((line.split()[-1] for line in result.stdout.splitlines() if line.startswith("  id:")), "")
    expected = {
        "get": ([], [name], [f"cleanup: done, the key '{name}' created by this run is deleted."]),
        "list": (
            [name],
            [],
            [
                "cleanup: nothing deleted, since this identity may not list the key's versions, so the name "
                f"'{name}' may hold versions that this run did not create; this run created {key_id}",
                f"cleanup: if the key is yours alone, delete it: KeyClient.begin_delete_key('{name}') on {url}",
            ],
        ),
        "create": ([], [], []),
        "delete": (
            [name],
            [],
            [
                f"cleanup: the vault refused the deletion: the key {key_id} is still in {url}",
                f"cleanup: delete it yourself: KeyClient.begin_delete_key('{name}') on {url}",
            ],
        ),
        "purge": (
            [],
            [name],
            [
                f"cleanup: the key '{name}' that this run created is deleted, not purged; to purge it: "
                f"KeyClient.purge_deleted_key('{name}') on {url}"
            ],
        ),
    }[permission]
    assert (keys, deleted, lines[2:]) == expected
    if permission == "list":
        assert lines[0] == (
            f"error: not deleting '{name}': this identity may not list the key's versions, so this run cannot "
            "tell whether the key holds versions that it did not create"
        )


@A_PROTECTED_VAULT
def test_purge_protection_refuses_the_purge_and_the_key_stays_recoverable(
    vault_at_url: LocalVault, run_script: Any, unique_key_name: str
) -> None:
    protected_vault = vault_at_url
    lines = failed(
        run_script(protected_vault, "--name", unique_key_name, "--purge"), kv_keys.ExitStatus.PERMISSION
    )
    assert lines[0] == (
        f"error: the key '{unique_key_name}' was deleted but cannot be purged: purge protection is on for "
        f"{protected_vault.url}"
    )
    assert lines[1].startswith("hint: it can be recovered until ")
    # At a vault's real address the hint is the Azure CLI's, which works in a shell with the export lines.
    name = protected_vault.url.split("//")[1].split(".")[0]
    assert f"az keyvault key recover --vault-name {name} --name {unique_key_name} " in lines[1]
    assert lines[2:] == []
    assert log(protected_vault, "PurgeDeletedKey") == [("PurgeDeletedKey", 403, None)]
    assert final_state(protected_vault) == ([], [unique_key_name])
    with protected_vault.key_client() as client:
        client.begin_recover_deleted_key(unique_key_name).wait()
        assert client.get_key(unique_key_name).name == unique_key_name


@A_STANDARD_VAULT
def test_hsm_key_on_a_standard_vault(vault_at_url: LocalVault, run_script: Any, unique_key_name: str) -> None:
    standard_vault = vault_at_url
    lines = failed(run_script(standard_vault, "--name", unique_key_name, "--hsm"), kv_keys.ExitStatus.PERMISSION)
    assert lines == [
        f"error: {standard_vault.url} is a standard vault, which holds no HSM-protected keys (--hsm): "
        "(Forbidden) Hardware key operation not allowed on standard vault",
        # At a vault's real address the script cannot tell localvault from Azure: Azure's hint.
        "hint: drop --hsm, or use a Premium vault (az keyvault create ... --sku premium) or a Managed HSM",
    ]
    assert final_state(standard_vault) == ([], [])


def test_hsm_key_on_a_standard_localvault_at_its_own_url(run_script: Any, unique_key_name: str) -> None:
    with vaults(sku="standard") as standard_vault:
        lines = failed(run_script(standard_vault, "--name", unique_key_name, "--hsm"), kv_keys.ExitStatus.PERMISSION)
        assert lines[1] == "hint: drop --hsm, or start localvault with --sku premium (its default)"
        assert final_state(standard_vault) == ([], [])


# --------------------------------------------------------------------------------------------------------
# A deletion that takes time
# --------------------------------------------------------------------------------------------------------


def test_with_a_delete_delay_the_script_waits_for_the_deletion_then_purges(
    localvault: LocalVault, run_script: Any, unique_key_name: str
) -> None:
    localvault.set_delete_delay(1)
    succeeded(run_script(localvault, "--name", unique_key_name, "--purge"))
    after_delete = log(localvault)[[op for op, _, _ in log(localvault)].index("DeleteKey") :]
    assert after_delete == [
        ("DeleteKey", 200, None),
        ("GetDeletedKey", 404, None),  # the deletion is still running: the poller waits, then asks again
        ("GetDeletedKey", 200, None),
        ("PurgeDeletedKey", 204, None),
    ]
    assert final_state(localvault) == ([], [])


def test_a_name_still_being_deleted_gets_retry_in_a_few_seconds(
    localvault: LocalVault, run_script: Any, unique_key_name: str
) -> None:
    localvault.set_delete_delay(600)
    with localvault.key_client() as client:
        client.create_ec_key(unique_key_name)
        client.begin_delete_key(unique_key_name)  # not waited for: the deletion is pending
    result = run_script(localvault, "--name", unique_key_name)
    lines = failed(result, kv_keys.ExitStatus.CONFLICT)
    assert lines[0] == (
        f"error: the name '{unique_key_name}' is not free yet: {localvault.url} is still deleting a key of that "
        f"name ((Conflict) Key {unique_key_name} is currently being deleted and cannot be re-created; retry later.)"
    )
    assert lines[1].startswith("hint: run again in a few seconds, once the vault has finished; ")
    assert "choose another name" not in result.stderr
    assert log(localvault, "CreateKey")[-1] == ("CreateKey", 409, None)
    assert final_state(localvault) == ([], [unique_key_name])  # the other key's deletion, untouched
