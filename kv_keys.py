#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = [
#     "azure-identity>=1.23.0",
#     "azure-keyvault-keys>=4.10.0",
#     "azure-core>=1.31.0",
#     # for the embedded localvault, when run from the clone:
#     "cryptography>=42.0.0",
#     "PyJWT>=2.8.0",
#     "isodate>=0.6.1",
# ]
# ///
"""Create, retrieve and delete a key in Azure Key Vault: Microsoft's keys quickstart, made safe.

main() reads the options and the key name; run_quickstart() then runs the quickstart's steps. After those
two functions the file follows the steps in this order:
    1. Build a client (choose_vault, ask_key_name, embedded_vault, make_client): KeyClient(vault_url,
       credential), with DefaultAzureCredential() for Azure and ManagedIdentityCredential() for localvault,
       which serves it.
    2. Make sure the name is free (check_name_is_free): KeyClient.get_key(name) and
       KeyClient.get_deleted_key(name) must both raise ResourceNotFoundError.
    3. Create the key (create_key): KeyClient.create_rsa_key(name, size=2048) (or create_ec_key(name,
       curve=...)), and check that it has no other version (check_ownership):
       KeyClient.list_properties_of_key_versions(name).
    4. Retrieve it (in run_quickstart): KeyClient.get_key(name); with --keep the run ends there (keep_key).
    5. Delete it and wait until the deletion has finished (wait_for_deletion):
       KeyClient.begin_delete_key(name).wait().
    6. With --purge, purge it so that the name can be used again (purge_key):
       KeyClient.purge_deleted_key(name).
Then a banner, and below it what matters only when something goes wrong: the cleanup, the errors and their
hints, the exit codes, Ctrl-C, the checks of the input, the log redaction.

With no vault configured it starts localvault, this repository's Key Vault emulator, in this process: nothing
leaves this machine. It never touches a key it did not create; after a failure or Ctrl-C it deletes the key
it created and says what is left; every error is one line with a hint and an exit code (see --help). Vault:
--vault-url or KEY_VAULT_URL (Azure, a Managed HSM, a standalone localvault with LOCALVAULT_CA_FILE,
IDENTITY_ENDPOINT and IDENTITY_HEADER), else KEY_VAULT_NAME (https://NAME.vault.azure.net). A vault in Azure
needs `az login` and the key permissions get, list, create, delete (and purge for --purge); see README.md.
Usage: python kv_keys.py [--name my-first-key] [--purge]   (without --name it asks; Enter takes the suggestion)
       KEY_VAULT_NAME=my-vault python kv_keys.py --type ec --curve P-384
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import importlib.util
import ipaddress
import itertools
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient, KeyVaultKey


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check every input, then run the quickstart. Every failure ends as `error:` and `hint:` on stderr."""
    vault: Optional[Vault] = None
    verbose = False
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        try:
            args = parse_args(argv)
            verbose = args.verbose
            vault = choose_vault(args, os.environ)
            name = args.name or ask_key_name()
            import_azure_sdk()  # every input is checked: now, and only now, the SDK is needed
            with sdk_logging(verbose), contextlib.ExitStack() as stack:
                if vault.kind == "embedded":
                    vault = stack.enter_context(embedded_vault(vault.source))
                client = make_client(vault)
                stack.callback(client.close)
                return run_quickstart(client, vault, name, args, ctrl_c)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        except (Exception, KeyboardInterrupt) as exc:
            return report_error(exc, vault, verbose, ctrl_c)


def run_quickstart(
    client: KeyClient, vault: Vault, name: str, args: argparse.Namespace, ctrl_c: CtrlC
) -> int:
    """Steps 2 to 6. The three requests that change the vault go through run.sending, which records how far the
    run has gone (for the cleanup after a failure or Ctrl-C) and lets a first Ctrl-C wait for the vault's answer."""
    run = Run(ctrl_c, last=Stage.KEPT if args.keep else Stage.PURGED if args.purge else Stage.DELETED)
    try:
        check_name_is_free(client, vault, name)

        print(f"Creating a key in {vault.label} called '{name}' ...")
        with run.sending("create", Stage.CREATE, Stage.CREATED):
            run.key = create_key(client, name, args, run)
        print(" done.")
        describe_key(run.key)
        # Someone may have created the name since step 2: then this run added a version to their key, and
        # deleting "the key" would delete theirs too. Only a key with no other version is this run's.
        check_ownership(client, vault, name, run)

        print(f"Retrieving your key from {vault.label}.")
        retrieved = client.get_key(name)
        print(f"Key with name '{retrieved.name}' was found.")
        if retrieved.properties.version != run.key.properties.version:
            raise someone_else_writes(name, run, f"returned version {retrieved.properties.version}")
        print(f"  same version as created: {retrieved.properties.version}")
        if args.keep:
            return keep_key(vault, name, run)
        if run.stage is not Stage.OWNED:
            raise not_owned_failure(vault, name, run)

        print(f"Deleting your key from {vault.label} ...")
        with run.sending("delete", Stage.DELETE, Stage.DELETING):
            poller = client.begin_delete_key(name)
        deleted = wait_for_deletion(poller, run)
        print(" done.")
        print_deletion(vault, name, deleted, args.purge)

        if args.purge:
            print(f"Purging your key from {vault.label} ...")
            with run.sending("purge", Stage.PURGE, Stage.PURGED):
                purge_key(client, vault, name, deleted)
            print(" done.")
            later = "" if vault.is_local else " (Azure may take a few seconds to finish)"
            print(f"  The name '{name}' can be used again{later}.")
        return ExitStatus.OK
    except (Exception, KeyboardInterrupt) as exc:
        after = functools.partial(cleanup, client, vault, name, run, exc, args.keep)
        return report_error(exc, vault, args.verbose, ctrl_c, after, name)


# --- Step 1. The vault, the key name, the SDK and the client ---


@dataclass
class Vault:
    """The vault to use. kind is "azure" (from KEY_VAULT_NAME), "url" or "embedded"."""

    kind: str
    url: str = ""
    label: str = ""  # how the progress lines name the vault
    ca_file: Optional[str] = None  # extra CA to trust, for a loopback vault only
    source: str = ""  # why the embedded localvault is used, for its first line

    @property
    def host(self) -> str:
        return host_of(self.url)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def is_local(self) -> bool:
        """localvault: on this machine, where az cannot go and no permission applies."""
        return self.kind == "embedded" or self.is_loopback

    @property
    def is_hsm(self) -> bool:
        return ".managedhsm." in self.host


def choose_vault(args: argparse.Namespace, environ: Any) -> Vault:
    """Pick the vault: --vault-url or KEY_VAULT_URL, then KEY_VAULT_NAME, else the embedded localvault."""
    if args.vault_url is not None and not args.vault_url.strip():
        raise Failure(ExitStatus.USAGE, "--vault-url is empty", f"{URL_HINT}, or drop --vault-url")
    url = "" if args.local else args.vault_url or environ.get("KEY_VAULT_URL", "").strip()
    name = "" if args.local else environ.get("KEY_VAULT_NAME", "").strip()
    if url:
        source = "--vault-url" if args.vault_url else "KEY_VAULT_URL"
        url = check_vault_url(url, source)
        vault = Vault(kind="url", url=url, label=url)
        if vault.is_loopback:  # localvault's CA and identity endpoint serve a loopback vault only
            vault.ca_file = check_local_ca_file(environ)
            check_identity_variables(vault, environ, source)
        else:
            check_ca_bundles(environ)
        return vault
    if name:
        check_vault_name(name)
        check_ca_bundles(environ)
        return Vault(kind="azure", url=f"https://{name.lower()}.vault.azure.net", label=name)
    if importlib.util.find_spec("localvault") is None:
        raise Failure(
            ExitStatus.USAGE,
            "no vault configured, and the localvault package is not here to start one",
            "run kv_keys.py from a clone of its repository, or with localvault beside it: "
            "`uv run --with PATH_TO_CLONE kv_keys.py`, or `pip install PATH_TO_CLONE` first; "
            "or set KEY_VAULT_NAME (or KEY_VAULT_URL) to use a vault in Azure",
        )
    return Vault(kind="embedded", source="--local" if args.local else "no KEY_VAULT_URL or KEY_VAULT_NAME")


def suggest_key_name() -> str:
    return f"quickstart-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


ASK_AGAIN = 3  # at a terminal, an invalid name is asked for again at most this many times


def ask_key_name() -> str:
    """Ask for the key name; Enter accepts a fresh suggested name. At a terminal an invalid name is asked for
    again; a piped one, or the end of input, is an error."""
    default = suggest_key_name()
    prompt = f"Input a name for your key [{default}] > "
    at_terminal = sys.stdin.isatty()
    # At a terminal the prompt goes where it shows: with stdout piped (`| head -1`), to stderr.
    to = sys.stdout if sys.stdout.isatty() or not at_terminal else sys.stderr
    tries_left = ASK_AGAIN
    while True:
        try:
            if at_terminal:
                print(prompt, end="", file=to, flush=True)
                answer = input()
            else:
                answer = input(prompt)
        except EOFError:
            print(file=to)
            raise Failure(
                ExitStatus.USAGE,
                "no key name: the input ended before a name was given",
                "give one with --name NAME, or pipe it in: echo my-key | python kv_keys.py",
            ) from None
        if not at_terminal:
            print()  # the typed name is not echoed when piped, so end the prompt's line here
        name = answer.strip() or default
        try:
            check_key_name(name, example=default)
            return name
        except Failure as failure:
            if not at_terminal or not tries_left:
                raise
            tries_left -= 1
            print(f"{failure.message}; try again, or press Enter for {default}", file=to)


def import_azure_sdk() -> None:
    """Import the Azure SDK, once every input has been checked: --help and input errors need none of it.
    Without it, say which Python lacks it: the likeliest first mistake is a terminal without the venv."""
    global ClientAuthenticationError, HttpResponseError, IncompleteReadError, ResourceExistsError
    global ResourceNotFoundError, ServiceRequestError, ServiceResponseError, RequestsTransport
    global DefaultAzureCredential, ManagedIdentityCredential, KeyClient
    try:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            IncompleteReadError,
            ResourceExistsError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )
        from azure.core.pipeline.transport import RequestsTransport
        from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
        from azure.keyvault.keys import KeyClient
    except ModuleNotFoundError as exc:
        raise Failure(
            ExitStatus.USAGE,
            f"the Azure SDK is not installed in this Python, {sys.executable} (no module named {exc.name!r})",
            "activate the virtual environment that has it (. .venv/bin/activate), or install it here: "
            "pip install -r requirements.txt",
        ) from None


@contextlib.contextmanager
def embedded_vault(why: str) -> Iterator[Vault]:
    """Start localvault in this process; its managed-identity variables are set while it runs."""
    from localvault import LocalVault

    with LocalVault() as local:
        print(
            f"Using localvault, a Key Vault emulator started in this process on 127.0.0.1 ({why}): nothing leaves this machine."
        )
        saved = dict(os.environ)
        os.environ.update(local.environ())  # azure-identity (msal) reads IDENTITY_* from os.environ
        try:
            yield Vault(
                kind="embedded", url=local.url, label=f"localvault at {local.url}", ca_file=local.ca_file
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)


RETRIES = 5  # per request, for a vault that throttles (429) or is unavailable (5xx); see make_client


def make_client(vault: Vault) -> KeyClient:
    """Step 1: a KeyClient with the right credential and TLS trust for this vault.

    azure-core retries a request answered 429 (after Retry-After), 500, 502, 503 or 504 (after 0, 1.6, 3.2 s ...);
    RETRIES instead of its 3 follows Microsoft's advice for a throttled Key Vault (back off 1, 2, 4, 8, 16 s)."""
    if not vault.is_loopback:
        # Azure: the default trust store, and the SDK checks that the challenge names a Key Vault resource.
        return KeyClient(vault.url, DefaultAzureCredential(), retry_status=RETRIES)

    def transport() -> RequestsTransport:
        # use_env_settings=False: no HTTP(S)_PROXY, so loopback traffic stays on this machine.
        # connection_verify: localvault's CA, for this client only; None keeps the default trust store.
        return RequestsTransport(
            use_env_settings=False, **({"connection_verify": vault.ca_file} if vault.ca_file else {})
        )

    # retry_connect=0: a refused loopback port, or an untrusted CA, stays so: failing at once beats 5 s of retries.
    credential = LocalTokenSource(ManagedIdentityCredential(transport=transport(), retry_connect=0))
    # No challenge check for a loopback URL only: localvault's challenge names https://vault.azure.net, which
    # does not match 127.0.0.1, so the SDK would refuse to send the token.
    return KeyClient(
        vault.url,
        credential,
        verify_challenge_resource=False,
        transport=transport(),
        retry_connect=0,
        retry_status=RETRIES,
    )


class LocalTokenSource:
    """localvault's ManagedIdentityCredential; a failure to get a token is reported as that, not as the vault's
    (a refused IDENTITY_ENDPOINT would surface like a refused vault). A Failure is no AzureError: no retries."""

    def __init__(self, credential: Any) -> None:
        self.credential = credential

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._explained(self.credential.get_token, *scopes, **kwargs)

    def get_token_info(self, *scopes: str, **kwargs: Any) -> Any:
        return self._explained(self.credential.get_token_info, *scopes, **kwargs)

    def close(self) -> None:
        self.credential.close()

    @staticmethod
    def _explained(get: Callable[..., Any], *scopes: str, **kwargs: Any) -> Any:
        try:
            return get(*scopes, **kwargs)
        except Exception as exc:
            raise no_local_token(exc) from exc


# --- Step 2. The name must be free ---


def check_name_is_free(client: KeyClient, vault: Vault, name: str) -> None:
    """Step 2. A taken name raises a Failure. A lookup that is not permitted is no reason to stop: create's
    409 and the version check still protect someone else's key."""
    try:
        existing = client.get_key(name)
    except ResourceNotFoundError:
        pass
    except HttpResponseError as exc:
        if exc.status_code != 403:
            raise
    else:
        raise Failure(
            ExitStatus.CONFLICT,
            f"a key named '{name}' already exists in {vault.label} (version {existing.properties.version}); "
            "it was left exactly as it was",
            "choose another name: this script only deletes keys that it created itself",
        )
    try:
        deleted = client.get_deleted_key(name)
    except HttpResponseError:  # 404: free; anything else: let create and its 409 decide
        return
    raise soft_deleted_failure(vault, name, deleted.scheduled_purge_date)


# --- Step 3. Create the key, and make sure that it is this run's alone ---


def create_key(client: KeyClient, name: str, args: argparse.Namespace, run: Run) -> KeyVaultKey:
    """Step 3: an RSA key, or an EC key with --type ec. A create answered 429 or 503 was not carried out: the
    script sends it again itself, after the vault's Retry-After, and says so (azure-core would retry in silence:
    retry_status=0 turns that off for the create). A create whose answer was lost, or that failed otherwise, may
    have worked: never sent again."""
    options: dict = {"hardware_protected": True} if args.hsm else {}
    if args.type == "ec":
        create = functools.partial(client.create_ec_key, name, curve=args.curve or "P-256", **options)
    else:
        create = functools.partial(client.create_rsa_key, name, size=args.size or 2048, **options)
    retry = 0
    while True:
        try:
            return create(retry_status=0)
        except HttpResponseError as exc:
            retry += 1
            if exc.status_code not in BUSY_STATUSES or retry > RETRIES:
                raise
            wait, why = retry_after(exc, retry), busy_reason(exc)
        with run.waiting_to_retry():
            print(f"  {why}: trying the create again in {wait} s (retry {retry} of {RETRIES})")
            time.sleep(wait)


def describe_key(key: KeyVaultKey) -> None:
    material = key.key
    if str(enum_text(key.key_type)).startswith("EC"):
        shape = f"curve {enum_text(getattr(material, 'crv', None))}"
    else:
        modulus = getattr(material, "n", None)
        shape = f"{len(modulus) * 8} bits" if modulus else "size not reported"
    operations = ", ".join(enum_text(op) for op in (key.key_operations or [])) or "none listed"
    print(f"  id:         {key.id}")
    print(f"  type:       {enum_text(key.key_type)}, {shape}")
    print(f"  enabled:    {key.properties.enabled}")
    print(f"  created:    {key.properties.created_on}")
    print(f"  operations: {operations}")


def enum_text(value: Any) -> str:
    return str(getattr(value, "value", value))


CANNOT_LIST = "this identity may not list the key's versions"


def check_ownership(client: KeyClient, vault: Vault, name: str, run: Run) -> None:
    """Step 3, end: Stage.OWNED if the key has just the version created here; a Failure if it has others."""
    assert run.key is not None
    version = run.key.properties.version
    try:
        versions = [v.version for v in client.list_properties_of_key_versions(name)]
    except ResourceNotFoundError:
        versions = []
    except Exception as exc:  # the cleanup then asks no more: it names the key instead
        if getattr(exc, "status_code", None) == 403:
            run.doubt = CANNOT_LIST
            return
        run.doubt = f"the vault did not answer the version check ({first_line(exc)})"
        raise
    if versions == [version]:
        run.stage = Stage.OWNED
    elif not versions:
        run.doubt = f"the vault does not list the key's versions yet (not even {version})"
    elif version not in versions:
        raise someone_else_writes(name, run, f"lists version(s) {', '.join(versions)}")
    else:
        run.stage = Stage.FOREIGN
        raise Failure(
            ExitStatus.CONFLICT,
            f"a key named '{name}' already existed in {vault.label}, or someone else created it after the name "
            f"check: it has {len(versions) - 1} other version(s). This run added version {version} to it and "
            "deleted nothing",
            "disable just that version if you do not want it: "
            f"{az_command(vault, 'set-attributes', name, version)} (a single version cannot be deleted)",
        )


# --- Step 4. Retrieve it (run_quickstart does); --keep ends the run there ---


def keep_key(vault: Vault, name: str, run: Run) -> int:
    """Step 4, end, with --keep: the run has nothing left to send."""
    run.reach(Stage.KEPT)
    print(f"Keeping your key in {vault.label} (--keep).")
    if vault.kind == "embedded":
        print("  (this embedded localvault goes away when the script ends)")
    else:
        print(f"  to delete it later: {az_command(vault, 'delete', name)}")
    return ExitStatus.OK


# --- Step 5. Delete it, and wait until the deletion has finished ---


def wait_for_deletion(poller: Any, run: Run) -> Any:
    """Step 5: poller.wait() returns once the deleted key is listed, i.e. the deletion has really finished.

    wait() is called once: each call of KeyVaultOperationPoller.wait starts a polling thread of its own.
    On a terminal a spinner turns meanwhile. Returns the deleted key."""
    if not sys.stdout.isatty():
        print("  waiting until the deletion has finished ...")
        poller.wait()
        run.reach(Stage.DELETED)
        return poller.result()
    done = threading.Event()

    def spin() -> None:
        start = time.monotonic()
        for frame in itertools.cycle("|/-\\"):
            if done.wait(0.1):
                return
            elapsed = time.monotonic() - start
            print(f"\r  waiting until the deletion has finished {frame} {elapsed:.1f}s", end="", flush=True)

    spinner = threading.Thread(target=spin, name="spinner", daemon=True)
    spinner.start()
    try:
        poller.wait()
    finally:
        done.set()
        spinner.join()
        print("\r\033[K", end="", flush=True)
    run.reach(Stage.DELETED)
    return poller.result()


def print_deletion(vault: Vault, name: str, deleted: Any, purge: bool) -> None:
    if deleted is None or not deleted.recovery_id:
        print("  This vault does not keep deleted keys: the key is gone.")
        return
    print(f"  recovery id: {deleted.recovery_id}")
    until = "--purge: purged next" if purge else f"until then the name '{name}' stays taken"
    print(f"  purge date:  {deleted.scheduled_purge_date} ({until})")
    if not purge:
        print(f"  to recover:  {az_command(vault, 'recover', name)}{needs(vault, 'recover')}")
        print(f"  to purge:    {az_command(vault, 'purge', name)}   (or run this script with --purge)")
    if vault.kind == "embedded":
        print("  (this embedded localvault, with its deleted keys, goes away when the script ends)")


def az_command(vault: Vault, verb: str, name: str, version: str = "") -> str:
    """The Azure CLI command for verb on key name; for localvault, which az cannot reach, the SDK call."""
    if vault.is_local:
        calls = {
            "recover": f"KeyClient.begin_recover_deleted_key('{name}')",
            "purge": f"KeyClient.purge_deleted_key('{name}')",
            "delete": f"KeyClient.begin_delete_key('{name}')",
            "show": f"KeyClient.get_key('{name}')",
            "set-attributes": f"KeyClient.update_key_properties('{name}', '{version}', enabled=False)",
        }
        return f"{calls[verb]} on {vault.url or 'localvault'}"
    option = "--hsm-name" if vault.is_hsm else "--vault-name"
    command = f"az keyvault key {verb} {option} {az_vault_name(vault)} --name {name}"
    return command + (f" --version {version} --enabled false" if verb == "set-attributes" else "")


def az_vault_name(vault: Vault) -> str:
    if vault.kind == "azure":
        return vault.label
    return vault.host.split(".")[0] if vault.host and not vault.is_loopback else "VAULT_NAME"


def needs(vault: Vault, operation: str) -> str:
    """What recovering or purging a deleted key needs: "Managed HSM Crypto User" can do neither."""
    if vault.is_local:
        return ""
    if vault.is_hsm:
        return ' (needs the role "Managed HSM Crypto Officer")'
    return f' (needs the key permission {operation}, or the role "Key Vault Crypto Officer")'


# --- Step 6. With --purge, purge it ---


def purge_key(client: KeyClient, vault: Vault, name: str, deleted: Any) -> None:
    """Step 6 (--purge)."""
    try:
        client.purge_deleted_key(name)
    except HttpResponseError as exc:
        refused = purge_refused(exc, vault, name, deleted)
        if refused is None:
            raise
        raise refused from exc


# ==========================================================================================================
# Below: what runs only when something goes wrong, and the checks and plumbing behind the steps.
# ==========================================================================================================


# --- The cleanup after a failure: delete the key if it is certainly this run's alone; say what is left ---


@dataclass
class Outcome:
    """What became of the key: the hint after an interruption, the `cleanup:` lines, and whether nothing of this
    run is left in the vault (clean)."""

    hint: str
    lines: List[str] = field(default_factory=list)
    clean: bool = False


def cleanup(client: KeyClient, vault: Vault, name: str, run: Run, exc: BaseException, keep: bool) -> Outcome:
    try:
        return _cleanup(client, vault, name, run, exc, keep)
    except KeyboardInterrupt:  # Ctrl-C during the cleanup: stop at once
        return still_there(vault, name, run, "stopped (Ctrl-C)")


def _cleanup(client: KeyClient, vault: Vault, name: str, run: Run, exc: BaseException, keep: bool) -> Outcome:
    stop = run.ctrl_c.count >= 2  # Ctrl-C twice: no more requests
    stage, status = run.stage, getattr(exc, "status_code", None) or 0
    if stage is Stage.CHECK:
        return Outcome("nothing was created", clean=True)
    if stage is Stage.CREATE:
        # refused (4xx), not carried out (503), or never sent; a 500, 502 or 504 may come after the work is done
        refused = 400 <= status < 500 or status == 503 or isinstance(exc, (ServiceRequestError, Failure))
        if refused and not stop:
            return Outcome("nothing was created", clean=True)
        return may_exist(vault, name, "create", 0 if stop else status)
    if stage is Stage.DELETING:
        return Outcome(
            "the key that this run created is deleted; the vault finishes the deletion by itself",
            [f"cleanup: the deletion of '{name}' was requested; the vault completes it."],
            clean=True,
        )
    if stage is Stage.DELETED:
        return Outcome("the key that this run created is deleted", clean=True)
    if stage is Stage.PURGED:
        return Outcome("the key that this run created is deleted, and purged", clean=True)
    if stage is Stage.PURGE:
        purge = f"to purge it: {az_command(vault, 'purge', name)}"
        refused = [
            f"cleanup: the key '{name}' that this run created is deleted, not purged; {purge}{needs(vault, 'purge')}"
        ]
        return Outcome(
            f"the key that this run created is deleted, but perhaps not purged; {purge}",
            refused if isinstance(exc, HttpResponseError) else [],
            clean=True,
        )
    if stage is Stage.DELETE and stop:
        return may_exist(vault, name, "delete")
    assert run.key is not None
    if stage is Stage.DELETE and status == 403:  # asking again would change nothing
        return still_there(vault, name, run, "the vault refused the deletion")
    if keep:
        return Outcome(
            f"nothing was deleted (--keep): this run left {run.key.id} in {vault.label}",
            [
                f"cleanup: skipped (--keep): {run.key.id} stays in {vault.label}; to delete it: {az_command(vault, 'delete', name)}"
            ],
        )
    if stop:
        return still_there(vault, name, run, "stopped (Ctrl-C twice)")
    if stage is Stage.CREATED and not run.doubt:  # the failure came before the version check
        with contextlib.suppress(Exception):  # a failed check leaves a doubt, or Stage.FOREIGN
            check_ownership(client, vault, name, run)
    if run.stage is Stage.FOREIGN:
        return Outcome(
            f"nothing was deleted: the key '{name}' holds versions that this run did not create (see below)",
            [
                f"cleanup: nothing deleted, since the name '{name}' holds versions that this run did not create; "
                f"this run created {run.key.id}"
            ],
        )
    if run.stage is Stage.CREATED:
        return Outcome(
            f"nothing was deleted: this run cannot tell whether the key '{name}' holds versions that it did not "
            "create (see below)",
            [
                f"cleanup: nothing deleted, since {run.doubt}, so the name '{name}' may hold versions that this run "
                f"did not create; this run created {run.key.id}",
                f"cleanup: if the key is yours alone, delete it: {az_command(vault, 'delete', name)}",
            ],
        )
    return delete_own_key(client, vault, name, run)


def delete_own_key(client: KeyClient, vault: Vault, name: str, run: Run) -> Outcome:
    """The cleanup's delete. "Not found" means deleted already, e.g. by a delete request whose answer was lost."""
    try:
        with run.ctrl_c.finishing("delete", then_stop=False):
            client.begin_delete_key(name)
    except ResourceNotFoundError:
        try:
            deleted = client.get_deleted_key(name)
        except (Exception, KeyboardInterrupt):
            deleted = None
        line = f"cleanup: nothing left to delete: {vault.label} answered that '{name}' is not there, it was already deleted"
        if getattr(deleted, "recovery_id", None):
            line += (
                f"; it is kept as the deleted key {deleted.recovery_id} until {deleted.scheduled_purge_date}"
            )
        return Outcome(
            "the key that this run created is deleted: its deletion had gone through (see below)",
            [line + "."],
            clean=True,
        )
    except (Exception, KeyboardInterrupt) as error:
        why = "stopped (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else f"failed ({first_line(error)})"
        return still_there(vault, name, run, why, error)
    return Outcome(
        "the key that this run created was deleted (see below)",
        [f"cleanup: done, the key '{name}' created by this run is deleted."],
        clean=True,
    )


def still_there(
    vault: Vault, name: str, run: Run, why: str, error: Optional[BaseException] = None
) -> Outcome:
    """The key this run created is (or, after a delete request that was cut off, may be) still in the vault."""
    assert run.key is not None
    where = (
        "may still be in" if isinstance(error, (KeyboardInterrupt, ServiceResponseError)) else "is still in"
    )
    return Outcome(
        f"the key that this run created {where} {vault.label}: delete it yourself (see below)",
        [
            f"cleanup: {why}: the key {run.key.id} {where} {vault.label}",
            f"cleanup: delete it yourself: {az_command(vault, 'delete', name)}",
        ],
    )


def may_exist(vault: Vault, name: str, request: str, status: int = 0) -> Outcome:
    """This run cannot know whether its key exists: never say that nothing was created. The request may still
    be running in the vault (cut off), or have done its work before failing (HTTP 5xx): a lookup proves nothing."""
    why = (
        f"the vault answered the {request} with HTTP {status}"
        if status >= 500
        else f"the {request} request was cut off before its answer came"
    )
    return Outcome(
        f"the key '{name}' may exist in {vault.label}, or may still appear: {why} (see below)",
        [
            f"cleanup: not attempted, since this run cannot know whether the key exists; to check: {az_command(vault, 'show', name)}",
            f"cleanup: if it exists, delete it: {az_command(vault, 'delete', name)}",
        ],
    )


# --- Errors: one line, one hint, one exit code ---


class Failure(Exception):
    """An error to report as one line on stderr, a hint line, and an exit code."""

    def __init__(self, code: int, message: str, hint: str) -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def report_error(
    exc: BaseException,
    vault: Optional[Vault],
    verbose: bool,
    ctrl_c: CtrlC,
    after: Optional[Callable[[], Outcome]] = None,
    name: str = "",
) -> int:
    """Print `error:`, run the cleanup (after) if any, then `hint:` and the cleanup's lines. After Ctrl-C the hint
    is what the cleanup found or did, so that the two never contradict each other. When stdout's reader has
    gone (BrokenPipeError) the run stops quietly, unless the cleanup leaves something to say."""
    if verbose and (not isinstance(exc, Failure) or exc.__cause__ is not None):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)  # a Failure's SDK error comes first
    closed = isinstance(exc, BrokenPipeError)
    if closed:
        silence_stdout()
        failure = Failure(ExitStatus.STDOUT_CLOSED, "stdout was closed before the run ended", "")
    elif isinstance(exc, KeyboardInterrupt):
        print(file=sys.stderr)
        failure = Failure(ExitStatus.INTERRUPTED, "interrupted (Ctrl-C)", "")
    else:
        failure = exc if isinstance(exc, Failure) else explain(exc, vault, name)
    if not closed:
        print(f"error: {failure.message}", file=sys.stderr, flush=True)
    outcome = after() if after is not None else Outcome("nothing was created", clean=True)
    ctrl_c.settled = True  # what is left is printing what happened: a late Ctrl-C must not cut it short
    if closed:
        if outcome.clean:
            return failure.code
        print(f"error: {failure.message}", file=sys.stderr)
    print(f"hint: {failure.hint or outcome.hint}", file=sys.stderr)
    for line in outcome.lines:
        print(line, file=sys.stderr)
    return ExitStatus.INTERRUPTED if ctrl_c.count else failure.code


def explain(exc: BaseException, vault: Optional[Vault], name: str = "") -> Failure:
    """Turn an exception from the SDK into a Failure with a message, a hint and an exit code."""
    unexpected = Failure(
        ExitStatus.SERVICE,
        f"unexpected {type(exc).__name__}: {first_line(exc)}",
        "run again with --verbose for details",
    )
    if vault is None or not type(exc).__module__.startswith("azure"):
        return unexpected  # and the Azure SDK may not even be imported
    if isinstance(exc, ClientAuthenticationError):
        return authentication_failure(exc, vault)
    if isinstance(exc, ResourceExistsError):  # 409 from create: the name belongs to a soft-deleted key
        if name and "deleted but recoverable" in str(exc):
            return soft_deleted_failure(vault, name, None)
        if name and "being deleted" in str(exc):  # ObjectIsBeingDeleted: a deletion or purge still running
            return Failure(
                ExitStatus.CONFLICT,
                f"the name '{name}' is not free yet: {vault.label} is still deleting a key of that name "
                f"({first_line(exc)})",
                "run again in a few seconds, once the vault has finished; if that key was deleted but not "
                f"purged, its name then stays with the deleted key until it is purged: {az_command(vault, 'purge', name)}",
            )
        return Failure(
            ExitStatus.CONFLICT, f"name conflict in {vault.label}: {first_line(exc)}", "choose another name"
        )
    if isinstance(exc, HttpResponseError) and exc.status_code in BUSY_STATUSES:
        hint = (
            "Key Vault allows, per vault and region, every 10 seconds 20 creates of RSA-2048 or EC keys (10 of "
            "HSM keys) and 4,000 other operations (fewer on RSA 3072 and 4096 keys): wait a few seconds and run "
            "again, and check what else uses this vault"
            if exc.status_code == 429
            else "the service has a passing problem: wait a minute and run again"
        )
        local = " (this localvault injects these answers: see its --faults)" if vault.is_local else ""
        return Failure(
            ExitStatus.BUSY,
            f"{busy_reason(exc, vault.label)}, still after {RETRIES} retries: {first_line(exc)}",
            hint + local,
        )
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        text = str(exc)
        if "ForbiddenByFirewall" in text or "Client address is not authorized" in text:
            return Failure(
                ExitStatus.PERMISSION,
                f"{vault.label} refused this machine's network address (vault firewall): {first_line(exc)}",
                f"allow your public address: az keyvault network-rule add --name {az_vault_name(vault)} "
                "--ip-address YOUR_PUBLIC_IP",
            )
        if "Hardware key operation not allowed" in text:  # --hsm on a standard vault
            premium = (
                "start localvault with --sku premium (its default)"
                if vault.is_local
                else ("use a Premium vault (az keyvault create ... --sku premium) or a Managed HSM")
            )
            return Failure(
                ExitStatus.PERMISSION,
                f"{vault.label} is a standard vault, which holds no HSM-protected keys (--hsm): {first_line(exc)}",
                f"drop --hsm, or {premium}",
            )
        missing = re.search(r"does not have keys (\w+) permission", text)
        return Failure(
            ExitStatus.PERMISSION,
            f"permission denied by {vault.label}: {first_line(exc)}",
            permission_hint(vault, missing.group(1) if missing else ""),
        )
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, IncompleteReadError)):
        return connection_failure(exc, vault)
    if isinstance(exc, HttpResponseError):
        return Failure(
            ExitStatus.SERVICE,
            f"{vault.label} answered HTTP {exc.status_code}: {first_line(exc)}",
            "run again with --verbose to see the HTTP exchange",
        )
    return unexpected


def authentication_failure(exc: ClientAuthenticationError, vault: Vault) -> Failure:
    if exc.status_code == 401:  # the vault itself rejected the token
        if vault.is_loopback:
            hint = (
                "the token came from another localvault's identity endpoint, or this localvault has restarted "
                f"since IDENTITY_ENDPOINT and IDENTITY_HEADER were set: {LOCALVAULT_HINT}"
            )
        elif is_loopback_host(host_of(os.environ.get("IDENTITY_ENDPOINT", ""))):
            hint = "IDENTITY_ENDPOINT and IDENTITY_HEADER point at this machine (a localvault?): unset them, then az login"
        else:
            hint = "sign in to the vault's tenant: az login --tenant TENANT_ID"
        return Failure(
            ExitStatus.AUTH, f"{vault.label} rejected the credential (HTTP 401): {first_line(exc)}", hint
        )
    if vault.is_loopback:
        return no_local_token(exc)
    return Failure(
        ExitStatus.AUTH,
        f"authentication failed: {summarise_credentials(str(exc))}",
        "sign in with `az login` (or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET), then run again",
    )


def no_local_token(exc: BaseException) -> Failure:
    refused = any(isinstance(e, ConnectionRefusedError) for e in exception_chain(exc))
    endpoint = os.environ.get("IDENTITY_ENDPOINT", "IDENTITY_ENDPOINT")
    return Failure(
        ExitStatus.AUTH,
        f"no token from localvault's identity endpoint {endpoint} (IDENTITY_ENDPOINT): "
        + ("connection refused" if refused else first_line(exc)),
        "is localvault still running? If not, restart `python -m localvault` and run here the latest export "
        "lines it printed",
    )


def summarise_credentials(text: str) -> str:
    """One line from DefaultAzureCredential's report: which credentials it tried and why each failed."""
    reasons = (
        ("not installed", ("not installed", "not found", "could not be found", "requires the")),
        ("not signed in", ("az login", "login", "no accounts", "sign in", "expired")),
        ("not configured", ("not configured", "not fully configured", "unavailable", "not set")),
    )
    tried = []
    for credential, why in re.findall(r"^\s*(\w+Credential): (.*)$", text, flags=re.MULTILINE):
        summary = next((label for label, words in reasons if any(w in why.lower() for w in words)), "failed")
        tried.append(f"{credential.replace('Credential', '')} ({summary})")
    if not tried:
        return first_line(text)
    return "DefaultAzureCredential tried " + ", ".join(tried) + ", and none gave a token"


def connection_failure(exc: BaseException, vault: Vault) -> Failure:
    """The cause by type (gaierror, SSLError, ConnectionRefusedError); the error text only as a fallback."""
    causes = list(exception_chain(exc))
    text = " ".join(str(e) for e in causes)

    def caused_by(kind: type, pattern: str) -> bool:
        return any(isinstance(e, kind) for e in causes) or re.search(pattern, text) is not None

    where = vault.host or vault.url
    if caused_by(socket.gaierror, DNS_ERROR_TEXT):
        problem = f"cannot find the vault: the name {where} does not resolve"
        hint = (
            f"check the vault name: is '{vault.label}' listed by `az keyvault list --output table`?"
            if vault.kind == "azure"
            else "check the host name in the vault URL, and your DNS or network"
        )
    elif caused_by(ssl.SSLError, r"CERTIFICATE_VERIFY_FAILED|SSLError"):
        problem = f"TLS failed with {where}: {first_line(exc)}"
        hint = (
            "trust the localvault that serves this URL: set LOCALVAULT_CA_FILE from its `python -m localvault` output"
            if vault.is_loopback
            else "a proxy or antivirus may be intercepting TLS; this script never turns verification off"
        )
    elif caused_by(ConnectionRefusedError, r"(?i)refused"):
        problem = f"cannot connect to {vault.url}: connection refused"
        hint = (
            "is localvault still running there? Start it again with the same --port (and --data, which keeps its CA "
            "and secrets), or use the export lines of the localvault that is running"
            if vault.is_loopback
            else "check the vault URL and your network"
        )
    elif isinstance(exc, (ServiceResponseError, IncompleteReadError)):  # the request went out, no answer came
        problem = f"no answer from {vault.url}: the connection was lost after the request was sent ({first_line(exc)})"
        hint = "run again; if it keeps happening, check your network and any proxy (HTTPS_PROXY)"
    else:
        problem = f"cannot reach {vault.url}: {first_line(exc)}"
        hint = "check the vault URL, your network and any proxy (HTTPS_PROXY)"
    return Failure(ExitStatus.UNREACHABLE, problem, hint)


DNS_ERROR_TEXT = (
    r"NameResolution|Name or service not known|nodename nor servname|getaddrinfo failed|"
    r"Temporary failure in name resolution|No address associated"
)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything it wraps: inner_exception, __cause__, __context__, urllib3's reason, args."""
    seen = set()
    todo: List[Any] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "inner_exception", None), current.__cause__, current.__context__]
        todo += [getattr(current, "reason", None), *getattr(current, "args", ())]


def soft_deleted_failure(vault: Vault, name: str, purge_date: Any) -> Failure:
    until = f" until {purge_date}" if purge_date else ""
    return Failure(
        ExitStatus.CONFLICT,
        f"the name '{name}' belongs to a deleted key that {vault.label} keeps{until} (soft-delete), "
        "so it cannot be used for a new key yet",
        f"recover it: {az_command(vault, 'recover', name)}{needs(vault, 'recover')}   or purge it for good: "
        f"{az_command(vault, 'purge', name)}{needs(vault, 'purge')}   or choose another name",
    )


def someone_else_writes(name: str, run: Run, seen: str) -> Failure:
    assert run.key is not None
    run.stage = Stage.FOREIGN
    return Failure(
        ExitStatus.CONFLICT,
        f"the vault {seen} of '{name}', not the version {run.key.properties.version} created here: "
        "something else is writing to this key",
        "this script leaves the key alone; choose another name",
    )


def not_owned_failure(vault: Vault, name: str, run: Run) -> Failure:
    hint = (
        permission_hint(vault, "list")
        if run.doubt == CANNOT_LIST
        else f"look at the key ({az_command(vault, 'show', name)}) and delete it if it is yours alone: "
        f"{az_command(vault, 'delete', name)}"
    )
    return Failure(
        ExitStatus.PERMISSION,
        f"not deleting '{name}': {run.doubt}, so this run cannot tell whether the key holds versions that it "
        "did not create",
        hint,
    )


def purge_refused(exc: HttpResponseError, vault: Vault, name: str, deleted: Any) -> Optional[Failure]:
    """Why a purge was refused, when the reason is one that a user can act on."""
    if exc.status_code == 403 and "protection" in first_line(exc).lower():
        until = getattr(deleted, "scheduled_purge_date", None) or "its scheduled purge date"
        return Failure(
            ExitStatus.PERMISSION,
            f"the key '{name}' was deleted but cannot be purged: purge protection is on for {vault.label}",
            f"it can be recovered until {until}, when the vault purges it; use another name until then, "
            f"or get it back: {az_command(vault, 'recover', name)}{needs(vault, 'recover')}",
        )
    if exc.status_code == 409:  # Azure: "Key is currently being deleted." (ObjectIsBeingDeleted)
        return Failure(
            ExitStatus.SERVICE,
            f"the key '{name}' is deleted, but {vault.label} refused to purge it yet: the deletion is still "
            f"in progress ({first_line(exc)})",
            f"purge it in a few seconds: {az_command(vault, 'purge', name)}",
        )
    return None


BUSY_STATUSES = (429, 503)


def busy_reason(exc: HttpResponseError, who: str = "the vault") -> str:
    what = "is throttling requests" if exc.status_code == 429 else "is unavailable"
    return f"{who} {what} (HTTP {exc.status_code})"


def retry_after(exc: HttpResponseError, retry: int) -> int:
    """The vault's Retry-After in seconds, at most 30; without one 1, 2, 4, 8, 16 s, as Microsoft advises."""
    value = str(getattr(exc.response, "headers", {}).get("Retry-After", "")).strip()
    return min(int(value), 30) if value.isdigit() else 2 ** (retry - 1)


def permission_hint(vault: Vault, missing: str = "") -> str:
    """How to grant the key permissions this script uses; missing: the one the vault named."""
    if vault.is_local:
        without = f" without the key permission {missing}" if missing else ""
        return (
            f"this localvault runs{without} (--key-permissions, or its control API): allow get, list, create, "
            "delete and purge, or restart it without --key-permissions"
        )
    name, me = az_vault_name(vault), '"$(az ad signed-in-user show --query id --output tsv)"'
    grant = f"the key permission {missing}" if missing else "key permissions"
    if vault.is_hsm:
        return (
            f'grant the role "Managed HSM Crypto User" (create, get, list, delete) and, for --purge, "Managed HSM '
            f'Crypto Officer": az keyvault role assignment create --hsm-name {name} --role "Managed HSM Crypto User" '
            f"--assignee {me} --scope /keys"
        )
    return (
        f"grant {grant}, either with an access policy: az keyvault set-policy --name {name} "
        f"--object-id {me} --key-permissions get list create delete purge   or, on a vault that uses Azure RBAC, "
        f'the role "Key Vault Crypto Officer": az role assignment create --role "Key Vault Crypto Officer" '
        f'--assignee {me} --scope "$(az keyvault show --name {name} --query id --output tsv)"'
    )


def first_line(value: Any) -> str:
    """The first line of an error's message, or of a text; at most 300 characters."""
    if isinstance(value, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(getattr(value, "message", None) or value).strip()
    line = text.splitlines()[0] if text else type(value).__name__
    return line if len(line) <= 300 else line[:300] + "..."


# --- The exit statuses ---


class ExitStatus(enum.IntEnum):
    """The exit statuses; --help lists them from here."""

    def __new__(cls, value: int, meaning: str) -> ExitStatus:
        status = int.__new__(cls, value)
        status._value_, status.meaning = value, meaning
        return status

    OK = 0, "success"
    SERVICE = 1, "unexpected service error, or a purge refused while the vault still finishes the deletion"
    USAGE = (
        2,
        "usage or input: bad option, name or URL, end of input, no Azure SDK or localvault, a remote "
        "IDENTITY_ENDPOINT",
    )
    AUTH = 3, "authentication failed: no token (try `az login`, or localvault's latest export lines)"
    PERMISSION = (
        4,
        "permission denied (also: versions not listable, so not deleted), purge protection, or --hsm on a "
        "standard vault",
    )
    UNREACHABLE = 5, "vault not found or unreachable (DNS, connection, TLS, a missing LOCALVAULT_CA_FILE or CA bundle)"
    CONFLICT = 6, "name conflict: a key or a deleted key has this name, or the key got another version"
    BUSY = 7, "the vault kept throttling (429) or was unavailable (503), retries included: try again later"
    INTERRUPTED = 130, "interrupted (Ctrl-C): the key this run created is deleted, or the output names it"
    STDOUT_CLOSED = 141, "stdout closed early (e.g. `| head -1`): stopped quietly after the same cleanup"


# --- How far the run has gone, and Ctrl-C ---


class Stage(enum.Enum):
    """How far the run has gone: what a failure leaves behind, and what the cleanup may do about it."""

    CHECK = "nothing created yet"
    CREATE = "create request sent, no answer yet"
    CREATED = "key created; not (yet) known to hold only this run's version"
    FOREIGN = "key holds versions that this run did not create: never deleted"
    OWNED = "key holds only this run's version: the cleanup deletes it"
    DELETE = "delete request sent, no answer yet"
    DELETING = "delete request accepted; the vault finishes the deletion"
    DELETED = "deletion finished"
    PURGE = "purge request sent"
    PURGED = "purged"
    KEPT = "kept (--keep): the run sends nothing more"


@dataclass
class Run:
    """How far this run has gone, and the key it created: what the cleanup works from."""

    ctrl_c: CtrlC
    last: Stage  # once there only printing is left: a Ctrl-C changes nothing then, and is ignored
    stage: Stage = Stage.CHECK
    key: Optional[KeyVaultKey] = None  # the key version that this run created
    doubt: str = ""  # at Stage.CREATED: why the run cannot tell whether the key is its alone
    before: Stage = Stage.CHECK  # the stage before the request in flight

    def reach(self, stage: Stage) -> None:
        self.stage = stage
        if stage is self.last:
            self.ctrl_c.settled = True

    @contextlib.contextmanager
    def sending(self, request: str, sent: Stage, done: Stage) -> Iterator[None]:
        """Around a request that changes the vault: the stage is `sent` while it is in flight and `done` once it
        is answered. A first Ctrl-C meanwhile lets the vault answer, so that the run knows what exists, then
        stops the run."""
        self.before = self.stage
        with self.ctrl_c.finishing(request):
            self.reach(sent)
            yield
            self.reach(done)

    @contextlib.contextmanager
    def waiting_to_retry(self) -> Iterator[None]:
        """Inside sending, between a request that the vault refused, doing nothing, and its retry: the stage is
        back to what it was, and a Ctrl-C, even one during the refused request, stops the run at once."""
        sent, request = self.stage, self.ctrl_c.request
        self.stage, self.ctrl_c.request = self.before, ""
        if self.ctrl_c.count:
            raise KeyboardInterrupt
        yield
        self.stage, self.ctrl_c.request = sent, request


class CtrlC:
    """SIGINT. The first Ctrl-C while a request that changes the vault is in flight lets the vault answer it
    (so that the run knows what exists), then stops the run; any other Ctrl-C stops the run at once. Once the
    run is over (settled), Ctrl-C is ignored: only printing what happened is left."""

    def __init__(self) -> None:
        self.count = 0
        self.request = ""  # the request in flight that a first Ctrl-C lets finish
        self.pending = False
        self.settled = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.settled:
            return
        self.count += 1
        if self.count > 1 or not self.request:
            raise KeyboardInterrupt
        self.pending = True
        say_now(f"\n{self.request}; Ctrl-C again to stop now")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; elsewhere Ctrl-C is Python's default
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def finishing(self, request: str, then_stop: bool = True) -> Iterator[None]:
        """Around a request that changes the vault; with then_stop, a Ctrl-C during it is raised once it is done."""
        self.request = f"finishing the {request} request" + (", then cleaning up" if then_stop else "")
        try:
            yield
        finally:
            self.request, pending, self.pending = "", self.pending, False
        if pending and then_stop:
            raise KeyboardInterrupt


def say_now(text: str) -> None:
    """Write to stderr from a signal handler: os.write, which no half-written line of the main thread blocks."""
    try:
        os.write(sys.stderr.fileno(), (text + "\n").encode())
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        print(text, file=sys.stderr, flush=True)


# --- The options, the name and the vault: all checked before the Azure SDK is imported ---


KEY_NAME_RE = re.compile(r"[0-9a-zA-Z-]{1,127}")
VAULT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]")
URL_HINT = "give the vault's URL, like https://my-vault.vault.azure.net"
LOCALVAULT_HINT = "run here the latest export lines that `python -m localvault` printed"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Failure(ExitStatus.USAGE, message, "run `python kv_keys.py --help` for the options")


def build_parser() -> argparse.ArgumentParser:
    codes = "".join(
        "\n" + textwrap.fill(s.meaning, 104, initial_indent=f"  {s.value:<4} ", subsequent_indent=" " * 7)
        for s in ExitStatus
    )
    parser = _Parser(
        prog="kv_keys.py",
        description="Create an RSA or EC key in Azure Key Vault, retrieve it and delete it. With no vault "
        "configured it uses localvault, an emulator started in this process: nothing leaves this machine.",
        epilog=f"exit codes:{codes}\n\n"
        "vault, in this order: --vault-url or KEY_VAULT_URL; KEY_VAULT_NAME; else the embedded localvault.\n"
        "A key that this script did not create is never deleted; if another writer creates the same name\n"
        "at the same moment, the version that this run added to it is reported, and left alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--vault-url", metavar="URL", help="full vault URL (default: $KEY_VAULT_URL)")
    where.add_argument("--local", action="store_true", help="the embedded localvault, even with KEY_VAULT_*")
    parser.add_argument("--name", help="key name, 1-127 letters, digits and hyphens (default: ask)")
    parser.add_argument("--type", choices=["rsa", "ec"], default="rsa", help="key type (default: rsa)")
    parser.add_argument("--size", type=int, choices=[2048, 3072, 4096], help="RSA key size (default: 2048)")
    parser.add_argument(
        "--curve", choices=["P-256", "P-384", "P-521", "P-256K"], help="EC curve (default: P-256)"
    )
    parser.add_argument("--hsm", action="store_true", help="HSM-protected key (Premium vault or Managed HSM)")
    after = parser.add_mutually_exclusive_group()
    after.add_argument("--purge", action="store_true", help="purge the key after deleting it: frees its name")
    after.add_argument("--keep", action="store_true", help="keep the key: skip the deletion")
    parser.add_argument("-v", "--verbose", action="store_true", help="HTTP log (tokens redacted), tracebacks")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.type == "rsa" and args.curve:
        raise Failure(ExitStatus.USAGE, "--curve applies to EC keys only", "add --type ec, or drop --curve")
    if args.type == "ec" and args.size:
        raise Failure(
            ExitStatus.USAGE, "--size applies to RSA keys only", "use --curve for EC keys, or drop --size"
        )
    if args.name is not None:
        check_key_name(args.name)
    return args


def check_key_name(name: str, example: str = "") -> None:
    if not KEY_NAME_RE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise Failure(
            ExitStatus.USAGE,
            f"invalid key name {shown!r}: use 1 to 127 letters (a-z, A-Z), digits and hyphens",
            f"for example {example or suggest_key_name()}",
        )


def check_vault_url(url: str, source: str) -> str:
    """Return the URL normalised to https://host[:port], or raise a usage Failure."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme.lower() != "https" or not parts.hostname:
            problem = "it must start with https://"
        elif port == 0 or parts.netloc.endswith(":"):
            problem = "the port is empty or 0"
        elif parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
            problem = "it must be only https://host[:port]"
        else:
            return f"https://{parts.netloc.lower()}"
    raise Failure(ExitStatus.USAGE, f"invalid vault URL {url!r} in {source}: {problem}", URL_HINT)


def check_vault_name(name: str) -> None:
    if not VAULT_NAME_RE.fullmatch(name) or "--" in name:
        raise Failure(
            ExitStatus.USAGE,
            f"invalid vault name {name!r} in KEY_VAULT_NAME: a vault name has 3 to 24 letters, digits and "
            "hyphens, starts with a letter, ends with a letter or digit, and has no '--'",
            "set KEY_VAULT_NAME to the name shown by `az keyvault list --output table`, "
            "or set KEY_VAULT_URL to the vault's full URL",
        )


def check_local_ca_file(environ: Any) -> Optional[str]:
    """LOCALVAULT_CA_FILE, if set, must name a file: a stopped localvault removes its CA file."""
    ca_file = environ.get("LOCALVAULT_CA_FILE", "").strip()
    if ca_file and not os.path.isfile(ca_file):
        raise Failure(
            ExitStatus.UNREACHABLE,
            f"cannot set up TLS: LOCALVAULT_CA_FILE names {ca_file}, which is not a file "
            "(a localvault that has stopped removes its CA file)",
            f"is localvault still running? Each start makes a new CA: {LOCALVAULT_HINT}",
        )
    return ca_file or None


def check_ca_bundles(environ: Any) -> None:
    """The CA bundles that requests reads for a vault in Azure, if set, must exist: a localvault that has stopped
    removes the one its export lines named."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        bundle = environ.get(variable, "").strip()
        if bundle and not os.path.exists(bundle):
            raise Failure(
                ExitStatus.UNREACHABLE,
                f"cannot set up TLS: {variable} names {bundle}, which does not exist "
                "(a localvault that has stopped removes the CA bundle its export lines named)",
                "if it came from localvault, run the `unset` line it printed when it stopped, or start it again "
                f"and run its new export lines; otherwise `unset {variable}` or point it at a CA bundle",
            )


def check_identity_variables(vault: Vault, environ: Any, source: str) -> None:
    """A loopback vault gets its tokens from localvault's IDENTITY_ENDPOINT, which must be on this machine too:
    a real managed identity (an Azure VM, App Service) must never hand its token to a local port. Without the
    variables ManagedIdentityCredential would probe the Azure VM metadata address."""
    missing = [var for var in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER") if not environ.get(var, "").strip()]
    if missing:
        raise Failure(
            ExitStatus.AUTH,
            f"no credential for {vault.url}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
            "start `python -m localvault` in another terminal and run here the export lines it prints, "
            f"or {unset(source)} to use the embedded localvault",
        )
    endpoint = environ["IDENTITY_ENDPOINT"].strip()
    if not is_loopback_host(host_of(endpoint)):
        raise Failure(
            ExitStatus.USAGE,
            f"IDENTITY_ENDPOINT is {endpoint}, not on this machine, but the vault {vault.url} is: "
            "refusing to send a managed-identity token from there to a local port",
            "run here the export lines that `python -m localvault` prints (IDENTITY_ENDPOINT=http://127.0.0.1:...), "
            f"or {unset(source)} to use the embedded localvault",
        )


def unset(source: str) -> str:
    """How to stop giving the vault URL: the option, or the variable."""
    return "drop --vault-url" if source.startswith("--") else f"unset {source}"


def host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts that get localvault's relaxations."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# --- Logging (--verbose), tokens redacted; a closed stdout ---


class _Redact(logging.Filter):
    """Belt and braces: the SDK's HttpLoggingPolicy already prints the Authorization header as REDACTED."""

    PATTERNS = (
        (re.compile(r"(?i)(bearer\s+)[\w\-.~+/]+=*(?![\w\"=])"), r"\1REDACTED"),
        (re.compile(r'(?i)("?access_token"?\s*[:=]\s*"?)[^",\s]+'), r"\1REDACTED"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for pattern, replacement in self.PATTERNS:
            text = pattern.sub(replacement, text)
        record.msg, record.args = text, None
        return True


@contextlib.contextmanager
def sdk_logging(verbose: bool) -> Iterator[None]:
    """--verbose: the SDK's HTTP log on stderr, tokens redacted. Otherwise silence it (azure.identity warns)."""
    loggers = [logging.getLogger("azure"), logging.getLogger("localvault")]
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if verbose else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    handler.addFilter(_Redact())
    saved = [(logger, logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        if verbose:
            # INFO is the level of azure.core's HttpLoggingPolicy, which redacts headers such as Authorization.
            # (logging_enable=True would add the network trace, which prints the Authorization header as is.)
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def silence_stdout() -> None:
    """stdout's reader has gone: send the rest of the output to os.devnull, so that exiting raises nothing."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows at once, even piped
    # main() handles Ctrl-C while it runs. After it the run is over, and a late Ctrl-C must not turn the exit
    # (where urllib3 closes its connections) into a traceback: ignored from the start, under main's handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main())
