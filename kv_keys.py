#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = [
#     "azure-identity>=1.23.0",
#     "azure-keyvault-keys>=4.10.0",
#     # for the embedded localvault, when run from the clone:
#     "cryptography>=42.0.0",
#     "PyJWT>=2.8.0",
#     "isodate>=0.6.1",
# ]
# ///
"""Create, retrieve and delete a key in Azure Key Vault: Microsoft's keys quickstart, made safe.

It follows the flow of the quickstart (create an RSA 2048 key, get it, delete it) and adds what a new
user needs: it runs without an Azure subscription on localvault, the Key Vault emulator in this
repository; it never touches a key it did not create; it waits until the deletion has finished; and
every error is one line with a hint, not a traceback.

Prerequisites:
    * Python 3.9 or later and the packages in requirements.txt (azure-identity, azure-keyvault-keys).
    * Nothing else for a first run: with no vault configured, the script starts localvault in this
      process on 127.0.0.1, and nothing leaves this machine.
    * For a vault in Azure: the vault, a sign-in (`az login`) and key permissions get, list, create,
      delete and purge on the vault (access policy or the RBAC role "Key Vault Crypto Officer"). README.md
      shows the commands. Without list it creates and retrieves the key but does not delete it.

Environment variables (a command-line option wins over its variable):
    KEY_VAULT_URL       full URL of the vault, e.g. https://my-vault.vault.azure.net, a Managed HSM,
                        a sovereign cloud, or a standalone localvault (same as --vault-url)
    KEY_VAULT_NAME      name of a vault in the Azure public cloud: https://NAME.vault.azure.net
    LOCALVAULT_CA_FILE  CA certificate of a standalone localvault, trusted for a loopback vault URL only
    IDENTITY_ENDPOINT, IDENTITY_HEADER
                        managed-identity endpoint of a standalone localvault; `python -m localvault`
                        prints all four of its variables as `export` lines

Steps:
    1. Build a client: KeyClient(vault_url, credential), where credential is DefaultAzureCredential()
       for Azure and ManagedIdentityCredential() (served by localvault) for localvault.
    2. Make sure the name is free: KeyClient.get_key(name) and KeyClient.get_deleted_key(name) must
       both answer "not found" (ResourceNotFoundError).
    3. Create the key: KeyClient.create_rsa_key(name, size=2048), or KeyClient.create_ec_key(name, curve=...);
       then make sure the key has no other version: KeyClient.list_properties_of_key_versions(name) must list
       just the version created (someone else may have created the name since step 2).
    4. Retrieve it: KeyClient.get_key(name).
    5. Delete it and wait until the deletion has finished: KeyClient.begin_delete_key(name).wait().
    6. With --purge, purge it so that the name can be used again: KeyClient.purge_deleted_key(name).

Usage:
    python kv_keys.py                      # asks for a key name; Enter accepts the suggested one
    python kv_keys.py --name my-first-key --purge
    KEY_VAULT_NAME=my-vault python kv_keys.py --type ec --curve P-384
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import ipaddress
import itertools
import logging
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the Azure SDK is imported only once it is needed, so --help and input errors are fast
    from azure.keyvault.keys import KeyClient, KeyVaultKey

EXIT_OK = 0
EXIT_SERVICE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_PERMISSION = 4
EXIT_UNREACHABLE = 5
EXIT_CONFLICT = 6
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    unexpected service error, or a purge refused while the vault still finishes the deletion
  2    usage or input error (bad option, invalid name or URL, end of input, a non-local IDENTITY_ENDPOINT
       for a local vault)
  3    authentication failed: no credential could get a token (try `az login`, or restart localvault)
  4    permission denied (also: not permitted to list the key's versions, so not deleted), or purge
       refused by purge protection
  5    vault not found or unreachable (DNS, connection, TLS, a missing LOCALVAULT_CA_FILE)
  6    name conflict: a key or a deleted key already has this name, or the key got another version
  130  interrupted (Ctrl-C)
"""

KEY_NAME_RE = re.compile(r"[0-9a-zA-Z-]{1,127}")
VAULT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]")
PROMPT = "Input a name for your key"
PERMISSIONS = "get list create delete purge"
RBAC_ROLE = "Key Vault Crypto Officer"
ME = '"$(az ad signed-in-user show --query id --output tsv)"'


class Failure(Exception):
    """An error to report as one line on stderr, a hint line, and an exit code."""

    def __init__(self, code: int, message: str, hint: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass
class Vault:
    """The vault to use. kind is "azure" (from KEY_VAULT_NAME), "url" or "embedded"."""

    kind: str
    url: str = ""
    label: str = ""  # how the progress lines name the vault
    ca_file: Optional[str] = None  # extra CA to trust, for a loopback vault only
    source: str = ""  # where the vault came from, for messages

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


# ---------------------------------------------------------------------------------------------------------
# Command line and input, all checked before the Azure SDK is imported
# ---------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Failure(EXIT_USAGE, message, "run `python kv_keys.py --help` for the options")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kv_keys.py",
        description="Create an RSA or EC key in Azure Key Vault, retrieve it and delete it. "
        "With no vault configured it uses localvault, an emulator started in this process: "
        "nothing leaves this machine.",
        epilog=EXIT_CODES_HELP
        + "\nvault, in this order: --vault-url or KEY_VAULT_URL; KEY_VAULT_NAME; else the embedded localvault."
        "\nA key that this script did not create is never deleted; if another writer creates the same name"
        "\nat the same moment, the version that this run added to it is reported, and left alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--vault-url", metavar="URL", help="full vault URL (default: $KEY_VAULT_URL)")
    where.add_argument(
        "--local",
        action="store_true",
        help="use the embedded localvault even if KEY_VAULT_* variables are set",
    )
    parser.add_argument("--name", help="key name, 1-127 letters, digits and hyphens (default: ask)")
    parser.add_argument("--type", choices=["rsa", "ec"], default="rsa", help="key type (default: rsa)")
    parser.add_argument("--size", type=int, choices=[2048, 3072, 4096], help="RSA key size (default: 2048)")
    parser.add_argument(
        "--curve", choices=["P-256", "P-384", "P-521", "P-256K"], help="EC curve (default: P-256)"
    )
    parser.add_argument(
        "--hsm", action="store_true", help="HSM-protected key (Premium vaults and Managed HSM only)"
    )
    after = parser.add_mutually_exclusive_group()
    after.add_argument(
        "--purge", action="store_true", help="purge the key after deleting it, freeing its name"
    )
    after.add_argument("--keep", action="store_true", help="keep the key: skip the deletion")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log HTTP requests (tokens redacted) and show tracebacks"
    )
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.type == "rsa" and args.curve:
        raise Failure(EXIT_USAGE, "--curve applies to EC keys only", "add --type ec, or drop --curve")
    if args.type == "ec" and args.size:
        raise Failure(
            EXIT_USAGE, "--size applies to RSA keys only", "use --curve for EC keys, or drop --size"
        )
    if args.type == "rsa":
        args.size = args.size or 2048
    else:
        args.curve = args.curve or "P-256"
    if args.name is not None:
        check_key_name(args.name)
    return args


def check_key_name(name: str) -> None:
    if not KEY_NAME_RE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise Failure(
            EXIT_USAGE,
            f"invalid key name {shown!r}: use 1 to 127 letters (a-z, A-Z), digits and hyphens",
            f"for example {suggest_key_name()}",
        )


def check_vault_name(name: str) -> None:
    if not VAULT_NAME_RE.fullmatch(name) or "--" in name:
        raise Failure(
            EXIT_USAGE,
            f"invalid vault name {name!r} in KEY_VAULT_NAME: a vault name has 3 to 24 letters, digits and "
            "hyphens, starts with a letter, ends with a letter or digit, and has no '--'",
            "set KEY_VAULT_NAME to the name shown by `az keyvault list --output table`, "
            "or set KEY_VAULT_URL to the vault's full URL",
        )


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts that get localvault's relaxations."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_vault_url(url: str, source: str) -> str:
    """Return the URL normalised to https://host[:port], or raise a usage Failure."""
    hint = "give the vault's URL, like https://my-vault.vault.azure.net"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise Failure(EXIT_USAGE, f"invalid vault URL {url!r} in {source}: {exc}", hint) from None
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise Failure(EXIT_USAGE, f"invalid vault URL {url!r} in {source}: it must start with https://", hint)
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise Failure(
            EXIT_USAGE, f"invalid vault URL {url!r} in {source}: it must be only https://host[:port]", hint
        )
    return f"https://{parts.netloc.lower()}"


def choose_vault(args: argparse.Namespace, environ: Any) -> Vault:
    """Pick the vault: --vault-url or KEY_VAULT_URL, then KEY_VAULT_NAME, else the embedded localvault."""
    if args.local:
        return Vault(kind="embedded", source="--local")
    if args.vault_url is not None and not args.vault_url.strip():
        raise Failure(
            EXIT_USAGE,
            "--vault-url is empty",
            "give the vault's URL, like https://my-vault.vault.azure.net, or drop --vault-url",
        )
    url = args.vault_url or environ.get("KEY_VAULT_URL", "").strip()
    if url:
        source = "--vault-url" if args.vault_url else "KEY_VAULT_URL"
        url = check_vault_url(url, source)
        vault = Vault(kind="url", url=url, label=url, source=source)
        if vault.is_loopback:  # localvault's CA is trusted for a loopback vault only
            vault.ca_file = check_local_ca_file(environ)
            check_identity_endpoint(vault, environ)
        return vault
    name = environ.get("KEY_VAULT_NAME", "").strip()
    if name:
        check_vault_name(name)
        return Vault(
            kind="azure", url=f"https://{name.lower()}.vault.azure.net", label=name, source="KEY_VAULT_NAME"
        )
    return Vault(kind="embedded", source="no KEY_VAULT_URL or KEY_VAULT_NAME")


def check_local_ca_file(environ: Any) -> Optional[str]:
    """LOCALVAULT_CA_FILE, if set, must name a file: a stopped localvault removes its CA file."""
    ca_file = environ.get("LOCALVAULT_CA_FILE", "").strip()
    if not ca_file:
        return None
    if not os.path.isfile(ca_file):
        raise Failure(
            EXIT_UNREACHABLE,
            f"cannot set up TLS: LOCALVAULT_CA_FILE names {ca_file}, which is not a file "
            "(a localvault that has stopped removes its CA file)",
            "is localvault still running? Each start makes a new CA: run here the latest export lines "
            "that `python -m localvault` printed",
        )
    return ca_file


def check_identity_endpoint(vault: Vault, environ: Any) -> None:
    """A loopback vault gets tokens from IDENTITY_ENDPOINT: it must be on this machine too.

    Otherwise a real managed identity (an Azure VM or App Service) would hand its token to a local port.
    """
    endpoint = environ.get("IDENTITY_ENDPOINT", "").strip()
    if not endpoint:
        return  # make_client says that the variables are missing
    try:
        host = urlsplit(endpoint).hostname or ""
    except ValueError:
        host = ""
    if not is_loopback_host(host):
        raise Failure(
            EXIT_USAGE,
            f"IDENTITY_ENDPOINT is {endpoint}, not on this machine, but the vault {vault.url} is: "
            "refusing to send a managed-identity token from there to a local port",
            "run here the export lines that `python -m localvault` prints (IDENTITY_ENDPOINT=http://127.0.0.1:...), "
            "or unset KEY_VAULT_URL to use the embedded localvault",
        )


def suggest_key_name() -> str:
    return f"quickstart-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def ask_key_name() -> str:
    """Ask for the key name. Enter accepts a fresh suggested name; end of input is an error."""
    default = suggest_key_name()
    try:
        answer = input(f"{PROMPT} [{default}] > ")
    except EOFError:
        print()
        raise Failure(
            EXIT_USAGE,
            "no key name: the input ended before a name was given",
            "give one with --name NAME, or pipe it in: echo my-key | python kv_keys.py",
        ) from None
    if not sys.stdin.isatty():
        print()  # the typed name is not echoed when piped, so end the prompt's line here
    name = answer.strip() or default
    check_key_name(name)
    return name


# ---------------------------------------------------------------------------------------------------------
# Talking to the vault
# ---------------------------------------------------------------------------------------------------------


def make_client(vault: Vault) -> KeyClient:
    """Step 1: a KeyClient with the right credential and TLS trust for this vault."""
    from azure.keyvault.keys import KeyClient

    if not vault.is_loopback:
        from azure.identity import DefaultAzureCredential

        # Azure: default trust store, and the SDK checks that the vault's challenge names a Key Vault resource.
        return KeyClient(vault.url, DefaultAzureCredential())

    # localvault on this machine: tokens come from its managed-identity endpoint, read from IDENTITY_ENDPOINT
    # and IDENTITY_HEADER. Without them ManagedIdentityCredential would probe the Azure VM metadata address.
    if not (os.environ.get("IDENTITY_ENDPOINT") and os.environ.get("IDENTITY_HEADER")):
        raise Failure(
            EXIT_AUTH,
            f"no credential for {vault.url}: IDENTITY_ENDPOINT and IDENTITY_HEADER are not set",
            "start `python -m localvault` in another terminal and run here the export lines it prints, "
            "or unset KEY_VAULT_URL to use the embedded localvault",
        )
    from azure.core.pipeline.transport import RequestsTransport
    from azure.identity import ManagedIdentityCredential

    def transport() -> RequestsTransport:
        # use_env_settings=False: no HTTP(S)_PROXY for loopback traffic, so it stays on this machine.
        # connection_verify: localvault's CA, for this client only; None keeps the default trust store.
        options: dict = {"use_env_settings": False}
        if vault.ca_file:
            options["connection_verify"] = vault.ca_file
        return RequestsTransport(**options)

    # retry_connect=0: a refused loopback port stays refused; failing at once beats 5 s of retries.
    credential = LocalTokenSource(ManagedIdentityCredential(transport=transport(), retry_connect=0))
    # The challenge check is off for loopback URLs only: localvault's challenge names the resource
    # https://vault.azure.net, which does not match 127.0.0.1, so the SDK would refuse to send the token.
    return KeyClient(vault.url, credential, verify_challenge_resource=False, transport=transport())


class LocalTokenSource:
    """localvault's ManagedIdentityCredential; a failure to get a token is reported as that, not as the vault's.

    Without this, a refused IDENTITY_ENDPOINT surfaces from the KeyClient as a ServiceRequestError, just like a
    refused vault, and would be blamed on the vault URL. A Failure is not an AzureError, so the KeyClient does
    not retry it either.
    """

    def __init__(self, credential: Any) -> None:
        self.credential = credential

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        with self._explained():
            return self.credential.get_token(*scopes, **kwargs)

    def get_token_info(self, *scopes: str, **kwargs: Any) -> Any:
        with self._explained():
            return self.credential.get_token_info(*scopes, **kwargs)

    def close(self) -> None:
        self.credential.close()

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            raise token_failure(exc) from exc


def token_failure(exc: BaseException) -> Failure:
    endpoint = os.environ.get("IDENTITY_ENDPOINT", "IDENTITY_ENDPOINT")
    causes = list(exception_chain(exc))
    refused = any(isinstance(e, ConnectionRefusedError) for e in causes) or any(
        "connection refused" in str(e).lower() for e in causes
    )
    why = "connection refused" if refused else first_line(exc)
    return Failure(
        EXIT_AUTH,
        f"no token from localvault's identity endpoint {endpoint} (IDENTITY_ENDPOINT): {why}",
        "is localvault still running? Each start gets new ports and a new secret: restart `python -m localvault` "
        "if needed and run here the latest export lines it printed",
    )


def check_name_is_free(client: KeyClient, vault: Vault, name: str) -> Optional[bool]:
    """Step 2. True: the name is free. None: the lookup was not permitted. A taken name raises Failure."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        existing = client.get_key(name)
    except ResourceNotFoundError:
        pass
    except HttpResponseError as exc:
        if exc.status_code != 403:
            raise
        return None  # not allowed to look: create anyway, the 409 handling and a version check still protect
    else:
        raise Failure(
            EXIT_CONFLICT,
            f"a key named '{name}' already exists in {vault.label} (version {existing.properties.version}); "
            "it was left exactly as it was",
            "choose another name: this script only deletes keys that it created itself",
        )
    try:
        deleted = client.get_deleted_key(name)
    except HttpResponseError:  # 404: free; anything else: let create and its 409 handling decide
        return True
    raise soft_deleted_failure(vault, name, deleted.scheduled_purge_date)


def create_key(client: KeyClient, vault: Vault, name: str, args: argparse.Namespace) -> KeyVaultKey:
    """Step 3. With the default options this is exactly the original's create_rsa_key(name, size=2048)."""
    from azure.core.exceptions import ResourceExistsError

    options: dict = {"hardware_protected": True} if args.hsm else {}
    try:
        if args.type == "ec":
            return client.create_ec_key(name, curve=args.curve, **options)
        return client.create_rsa_key(name, size=args.size, **options)
    except ResourceExistsError as exc:  # 409: the name belongs to a soft-deleted key
        if "deleted but recoverable" in str(exc):
            raise soft_deleted_failure(vault, name, None) from exc
        raise


def list_versions(client: KeyClient, name: str) -> Optional[List[str]]:
    """The versions of key name; None if this identity may not list them (403)."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        return [v.version for v in client.list_properties_of_key_versions(name)]
    except ResourceNotFoundError:
        return []
    except HttpResponseError as exc:
        if exc.status_code != 403:
            raise
        return None


def ownership(versions: Optional[List[str]], version: str) -> Tuple[Optional[bool], str]:
    """(owned, doubt): True when the key has just this run's version; False when it has others; else None."""
    if versions is None:
        return None, "this identity may not list the key's versions"
    if not versions:
        return None, f"the vault does not list the key's versions yet (not even {version})"
    if versions == [version]:
        return True, ""
    return False, ""


def foreign_versions_failure(vault: Vault, name: str, version: str, versions: List[str]) -> Failure:
    """Step 3 found other versions: someone else created or changed the key since the name check."""
    if version not in versions:
        return Failure(
            EXIT_CONFLICT,
            f"the vault lists version(s) {', '.join(versions)} of '{name}', not the version {version} created "
            "here: something else is writing to this key; nothing was deleted",
            "this script leaves the key alone; choose another name",
        )
    others = len(versions) - 1
    return Failure(
        EXIT_CONFLICT,
        f"a key named '{name}' already existed in {vault.label}, or someone else created it after the name "
        f"check: it has {others} other version(s). This run added version {version} to it and deleted nothing",
        f"disable just that version if you do not want it: {az_command(vault, 'set-attributes', name, version)}"
        " (a single version cannot be deleted)",
    )


def describe_key(key: KeyVaultKey) -> None:
    """Print what the vault says about the key it created."""
    material = key.key
    if key.key_type and str(enum_text(key.key_type)).startswith("EC"):
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


def wait_for_deletion(poller: Any) -> None:
    """Step 5: poller.wait() returns once the deleted key is listed, i.e. the deletion has really finished."""
    if not stdout_is_tty():
        print("  waiting until the deletion has finished ...")
        poller.wait()
        return
    finished = threading.Event()
    errors: List[BaseException] = []

    def wait() -> None:
        try:
            poller.wait()
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    threading.Thread(target=wait, name="wait-for-deletion", daemon=True).start()
    start = time.monotonic()
    for frame in itertools.cycle("|/-\\"):
        if finished.wait(0.1):
            break
        print(
            f"\r  waiting until the deletion has finished {frame} {time.monotonic() - start:.1f}s",
            end="",
            flush=True,
        )
    print("\r\033[K", end="", flush=True)
    if errors:
        raise errors[0]


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def purge_key(client: KeyClient, vault: Vault, name: str, purge_date: Any) -> None:
    """Step 6 (--purge)."""
    from azure.core.exceptions import HttpResponseError

    print(f"Purging your key from {vault.label} ...")
    try:
        client.purge_deleted_key(name)
    except HttpResponseError as exc:
        if exc.status_code == 403 and "protection" in first_line(exc).lower():
            raise Failure(
                EXIT_PERMISSION,
                f"the key '{name}' was deleted but cannot be purged: purge protection is on for {vault.label}",
                f"it can be recovered until {purge_date or 'its scheduled purge date'}, when the vault purges it; "
                f"use another name until then ({az_command(vault, 'recover', name)} to get it back)",
            ) from exc
        if exc.status_code == 409:  # Azure: "Key is currently being deleted." (ObjectIsBeingDeleted)
            raise Failure(
                EXIT_SERVICE,
                f"the key '{name}' is deleted, but {vault.label} refused to purge it yet: the deletion is still "
                f"in progress ({first_line(exc)})",
                f"purge it in a few seconds: {az_command(vault, 'purge', name)}",
            ) from exc
        raise
    print(" done.")
    later = (
        "" if vault.is_loopback or vault.kind == "embedded" else " (Azure may take a few seconds to finish)"
    )
    print(f"  The name '{name}' can be used again{later}.")


def print_deletion(vault: Vault, name: str, deleted: Any, purge: bool) -> None:
    if deleted is None or not deleted.recovery_id:
        print("  This vault does not keep deleted keys: the key is gone.")
        return
    print(f"  recovery id: {deleted.recovery_id}")
    print(f"  purge date:  {deleted.scheduled_purge_date} (until then the name '{name}' stays taken)")
    if not purge:
        print(f"  to recover:  {az_command(vault, 'recover', name)}")
        print(f"  to purge:    {az_command(vault, 'purge', name)}   (or run this script with --purge)")
    if vault.kind == "embedded":
        print("  (this embedded localvault, with its deleted keys, goes away when the script ends)")


# ---------------------------------------------------------------------------------------------------------
# The quickstart
# ---------------------------------------------------------------------------------------------------------


class Progress:
    """What this run has done to the vault, so that a failure can be cleaned up and reported."""

    def __init__(self) -> None:
        self.name_free: Optional[bool] = None  # True: get_key and get_deleted_key answered "not found"
        self.creating = False  # the create request was sent
        self.key: Optional[KeyVaultKey] = None  # the key version this run created
        self.owned: Optional[bool] = None  # True: the key has only that version: this run's to delete
        self.doubt = ""  # why owned is None
        self.delete_requested = False  # the vault accepted the delete request
        self.deleted = False  # ... and the deletion has finished
        self.purging = False  # the purge request was sent
        self.keep = False  # --keep: the user wants the key kept, also after a failure


@dataclass
class Outcome:
    """After a failure, what became of the key: the hint for an interruption, and the lines that tell it."""

    hint: str
    lines: List[str] = field(default_factory=list)


def run_quickstart(client: KeyClient, vault: Vault, name: str, args: argparse.Namespace) -> int:
    progress = Progress()
    progress.keep = args.keep
    try:
        progress.name_free = check_name_is_free(client, vault, name)

        print(f"Creating a key in {vault.label} called '{name}' ...")
        progress.creating = True
        progress.key = create_key(client, vault, name, args)
        print(" done.")
        describe_key(progress.key)
        version = progress.key.properties.version
        # The name was free a moment ago, but someone may have created it since: then create added this version
        # on top of theirs, and deleting "the key" would delete theirs too. Only a key with no other version is ours.
        versions = list_versions(client, name)
        progress.owned, progress.doubt = ownership(versions, version)
        if progress.owned is False:
            raise foreign_versions_failure(vault, name, version, versions or [])

        print(f"Retrieving your key from {vault.label}.")
        retrieved = client.get_key(name)
        print(f"Key with name '{retrieved.name}' was found.")
        if retrieved.properties.version != version:
            progress.owned = False
            raise Failure(
                EXIT_CONFLICT,
                f"the vault returned version {retrieved.properties.version} of '{name}', not the version "
                f"{version} created here: something else is writing to this key",
                "this script leaves the key alone; choose another name",
            )
        print(f"  same version as created: {retrieved.properties.version}")

        if args.keep:
            print(f"Keeping your key in {vault.label} (--keep).")
            if vault.kind == "embedded":
                print("  (this embedded localvault goes away when the script ends)")
            else:
                print(f"  to delete it later: {az_command(vault, 'delete', name)}")
            return EXIT_OK
        if not progress.owned:
            raise Failure(
                EXIT_PERMISSION,
                f"not deleting '{name}': {progress.doubt}, so this run cannot tell whether the key holds "
                "versions that it did not create",
                permission_hint(vault)
                if versions is None
                else f"look at the key ({az_command(vault, 'show', name)}) and delete it if it is yours alone: "
                f"{az_command(vault, 'delete', name)}",
            )

        print(f"Deleting your key from {vault.label} ...")
        poller = client.begin_delete_key(name)
        progress.delete_requested = True
        wait_for_deletion(poller)
        progress.deleted = True
        print(" done.")
        deleted = poller.result()
        print_deletion(vault, name, deleted, args.purge)

        if args.purge:
            progress.purging = True
            purge_key(client, vault, name, getattr(deleted, "scheduled_purge_date", None))
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:
        cleanup = functools.partial(clean_up, client, vault, name, progress, exc)
        return report_error(exc, vault, args.verbose, cleanup)


def clean_up(client: KeyClient, vault: Vault, name: str, progress: Progress, exc: BaseException) -> Outcome:
    """After a failure: delete the key this run created, if it is certainly this run's alone, and say so."""
    try:
        return _clean_up(client, vault, name, progress, exc)
    except KeyboardInterrupt:
        return Outcome(
            f"the cleanup was interrupted too: the key '{name}' may be in {vault.label}",
            [f"cleanup: interrupted; to check: {az_command(vault, 'show', name)}"],
        )


def _clean_up(client: KeyClient, vault: Vault, name: str, progress: Progress, exc: BaseException) -> Outcome:
    from azure.core.exceptions import ServiceResponseError

    if progress.deleted:
        if progress.purging:
            return Outcome(
                "the key that this run created is deleted, but perhaps not purged; to purge it: "
                + az_command(vault, "purge", name)
            )
        return Outcome("the key that this run created is deleted")
    if progress.delete_requested:
        return Outcome(
            "the key that this run created is deleted; the vault finishes the deletion by itself",
            [f"cleanup: the deletion of '{name}' was requested; the vault completes it."],
        )
    if progress.keep and progress.creating:  # no cleanup with --keep: say what may be left
        where = progress.key.id if progress.key else f"perhaps a key '{name}' (the create was cut off)"
        return Outcome(
            f"nothing was deleted (--keep): this run may have left {where} in {vault.label}",
            [
                f"cleanup: skipped (--keep): {where} stays in {vault.label}; "
                f"to delete it: {az_command(vault, 'delete', name)}"
            ],
        )
    if progress.key is None:
        if progress.creating and isinstance(exc, (KeyboardInterrupt, ServiceResponseError)):
            return clean_up_cut_off_create(client, vault, name, progress)
        return Outcome("nothing was created")  # before the create, or the vault answered it with an error

    key_id = progress.key.id
    if progress.owned is None:  # the failure came before the version check, or the check could not tell
        try:
            progress.owned, progress.doubt = ownership(
                list_versions(client, name), progress.key.properties.version
            )
        except Exception as error:
            progress.doubt = f"listing the key's versions failed ({first_line(error)})"
    if progress.owned is False:
        return Outcome(
            f"nothing was deleted: the key '{name}' holds versions that this run did not create (see below)",
            [
                f"cleanup: nothing deleted, since the name '{name}' holds versions that this run did not "
                f"create; this run created {key_id}"
            ],
        )
    if progress.owned is None:
        return Outcome(
            f"nothing was deleted: this run cannot tell whether the key '{name}' holds versions that it did "
            "not create (see below)",
            [
                f"cleanup: nothing deleted, since {progress.doubt}, so the name '{name}' may hold versions "
                f"that this run did not create; this run created {key_id}",
                f"cleanup: if the key is yours alone, delete it: {az_command(vault, 'delete', name)}",
            ],
        )
    return delete_own_key(client, vault, name, key_id, "the key that this run created")


def clean_up_cut_off_create(client: KeyClient, vault: Vault, name: str, progress: Progress) -> Outcome:
    """The create request was sent but its answer never came: the vault may have created the key."""
    from azure.core.exceptions import ResourceNotFoundError

    check = az_command(vault, "show", name)

    def maybe(why: str) -> Outcome:
        return Outcome(
            f"the key '{name}' may have been created before the create request was cut off; to check: {check}",
            [f"cleanup: nothing deleted, since {why}; to check: {check}"],
        )

    if not progress.name_free:
        return maybe(
            "the name could not be checked before the create, so a key by this name may not be this run's"
        )
    try:
        found = client.get_key(name)
        versions = list_versions(client, name)
    except ResourceNotFoundError:
        return Outcome(
            "nothing was created: the vault has no key by this name",
            [f"cleanup: {vault.label} has no key '{name}': the cut-off create request created nothing"],
        )
    except (Exception, KeyboardInterrupt) as error:
        return maybe(f"looking the key up failed ({reason(error)})")
    owned, doubt = ownership(versions, found.properties.version)
    if not owned:
        return maybe(
            doubt or f"the key '{name}' has {len(versions or [])} versions, so it is not this run's alone"
        )
    return delete_own_key(client, vault, name, found.id, "the key that the cut-off create request made")


def delete_own_key(client: KeyClient, vault: Vault, name: str, key_id: str, subject: str) -> Outcome:
    """Cleanup's delete. "Not found" means deleted already, e.g. by a delete request that Ctrl-C cut off."""
    from azure.core.exceptions import ResourceNotFoundError, ServiceResponseError

    try:
        client.begin_delete_key(name)
    except ResourceNotFoundError:
        return already_deleted(client, vault, name, subject)
    except (Exception, KeyboardInterrupt) as error:
        where = (
            "may still be in"
            if isinstance(error, (KeyboardInterrupt, ServiceResponseError))
            else "is still in"
        )
        return Outcome(
            f"{subject} {where} {vault.label}: delete it yourself (see below)",
            [
                f"cleanup failed ({reason(error)}): the key {key_id} {where} {vault.label}",
                f"cleanup: delete it yourself: {az_command(vault, 'delete', name)}",
            ],
        )
    return Outcome(
        f"{subject} was deleted (see below)",
        [f"cleanup: done, the key '{name}' created by this run is deleted."],
    )


def already_deleted(client: KeyClient, vault: Vault, name: str, subject: str) -> Outcome:
    try:
        deleted = client.get_deleted_key(name)
    except (Exception, KeyboardInterrupt):
        deleted = None
    line = f"cleanup: nothing left to delete: {vault.label} answered that '{name}' is not there, it was already deleted"
    if deleted is not None and getattr(deleted, "recovery_id", None):
        line += f"; it is kept as the deleted key {deleted.recovery_id} until {deleted.scheduled_purge_date}"
    return Outcome(f"{subject} is deleted: its deletion had gone through (see below)", [line + "."])


def reason(error: BaseException) -> str:
    return "interrupted" if isinstance(error, KeyboardInterrupt) else first_line(error)


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, one hint, one exit code
# ---------------------------------------------------------------------------------------------------------


def report_error(
    exc: BaseException,
    vault: Optional[Vault],
    verbose: bool,
    settle: Optional[Callable[[], Outcome]] = None,
) -> int:
    """Print `error:`, run the cleanup (settle) if any, then `hint:` (after Ctrl-C: what the cleanup found or
    did, so that the hint never contradicts it) and the cleanup's lines."""
    if verbose and (not isinstance(exc, Failure) or exc.__cause__ is not None):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)  # a Failure's SDK error comes first
    if isinstance(exc, KeyboardInterrupt):
        print(file=sys.stderr)
        failure = Failure(EXIT_INTERRUPTED, "interrupted (Ctrl-C)", "nothing was created")
    else:
        failure = exc if isinstance(exc, Failure) else explain(exc, vault)
    print(f"error: {failure.message}", file=sys.stderr, flush=True)
    outcome = settle() if settle is not None else Outcome(failure.hint)
    hint = outcome.hint if isinstance(exc, KeyboardInterrupt) else failure.hint
    print(f"hint: {hint}", file=sys.stderr)
    for line in outcome.lines:
        print(line, file=sys.stderr)
    return failure.code


def explain(exc: BaseException, vault: Optional[Vault]) -> Failure:
    """Turn an exception from the SDK into a Failure with a message, a hint and an exit code."""
    if vault is None or not type(exc).__module__.startswith("azure"):
        return Failure(
            EXIT_SERVICE,
            f"unexpected {type(exc).__name__}: {first_line(exc)}",
            "run again with --verbose for details",
        )
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(exc, ClientAuthenticationError):
        return authentication_failure(exc, vault)
    if isinstance(exc, ResourceExistsError):
        return Failure(
            EXIT_CONFLICT, f"name conflict in {vault.label}: {first_line(exc)}", "choose another name"
        )
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        text = str(exc)
        if "ForbiddenByFirewall" in text or "Client address is not authorized" in text:
            return Failure(
                EXIT_PERMISSION,
                f"{vault.label} refused this machine's network address (vault firewall): {first_line(exc)}",
                f"allow your public address: az keyvault network-rule add --name {az_vault_name(vault)} "
                "--ip-address YOUR_PUBLIC_IP",
            )
        return Failure(
            EXIT_PERMISSION, f"permission denied by {vault.label}: {first_line(exc)}", permission_hint(vault)
        )
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return connection_failure(exc, vault)
    if isinstance(exc, HttpResponseError):
        return Failure(
            EXIT_SERVICE,
            f"{vault.label} answered HTTP {exc.status_code}: {first_line(exc)}",
            "run again with --verbose to see the HTTP exchange",
        )
    return Failure(
        EXIT_SERVICE, f"{type(exc).__name__}: {first_line(exc)}", "run again with --verbose for details"
    )


def authentication_failure(exc: BaseException, vault: Vault) -> Failure:
    status = getattr(exc, "status_code", None)
    if status == 401:  # the vault itself rejected the token
        hint = "sign in to the vault's tenant: az login --tenant TENANT_ID"
        endpoint = urlsplit(os.environ.get("IDENTITY_ENDPOINT", "")).hostname or ""
        if not vault.is_loopback and is_loopback_host(endpoint) and os.environ.get("IDENTITY_HEADER"):
            hint = "IDENTITY_ENDPOINT and IDENTITY_HEADER point at this machine (a localvault?): unset them, then az login"
        return Failure(
            EXIT_AUTH, f"{vault.label} rejected the credential (HTTP 401): {first_line(exc)}", hint
        )
    if vault.is_loopback:
        return Failure(
            EXIT_AUTH,
            f"no token from localvault's identity endpoint: {first_line(exc)}",
            "is localvault still running? Set IDENTITY_ENDPOINT and IDENTITY_HEADER from its latest output",
        )
    return Failure(
        EXIT_AUTH,
        f"authentication failed: {summarise_credentials(str(exc))}",
        "sign in with `az login` (or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET), then run again",
    )


def summarise_credentials(text: str) -> str:
    """One line from DefaultAzureCredential's report: which credentials it tried and why each failed."""
    tried = []
    for credential, reason in re.findall(r"^\s*(\w+Credential): (.*)$", text, flags=re.MULTILINE):
        lowered = reason.lower()
        if any(
            word in lowered for word in ("not installed", "not found", "could not be found", "requires the")
        ):
            why = "not installed"
        elif any(word in lowered for word in ("az login", "login", "no accounts", "sign in", "expired")):
            why = "not signed in"
        elif any(
            word in lowered for word in ("not configured", "not fully configured", "unavailable", "not set")
        ):
            why = "not configured"
        else:
            why = "failed"
        tried.append(f"{credential.replace('Credential', '')} ({why})")
    if not tried:
        return first_line_of(text)
    return "DefaultAzureCredential tried " + ", ".join(tried) + ", and none gave a token"


def connection_failure(exc: BaseException, vault: Vault) -> Failure:
    causes = list(exception_chain(exc))
    text = " ".join(str(e) for e in causes)
    where = vault.host or vault.url
    if any(isinstance(e, socket.gaierror) for e in causes) or re.search(
        r"NameResolution|Name or service not known|nodename nor servname|getaddrinfo failed|"
        r"Temporary failure in name resolution|No address associated",
        text,
    ):
        hint = (
            f"check the vault name: is '{vault.label}' listed by `az keyvault list --output table`?"
            if vault.kind == "azure"
            else "check the host name in the vault URL, and your DNS or network"
        )
        return Failure(EXIT_UNREACHABLE, f"cannot find the vault: the name {where} does not resolve", hint)
    if any(isinstance(e, ssl.SSLError) for e in causes) or re.search(
        r"CERTIFICATE_VERIFY_FAILED|SSLError", text
    ):
        hint = (
            "trust the localvault that serves this URL: set LOCALVAULT_CA_FILE from its `python -m localvault` output"
            if vault.is_loopback
            else "a proxy or antivirus may be intercepting TLS; this script never turns verification off"
        )
        return Failure(EXIT_UNREACHABLE, f"TLS failed with {where}: {first_line(exc)}", hint)
    if any(isinstance(e, ConnectionRefusedError) for e in causes) or "refused" in text.lower():
        hint = (
            "is localvault still running there? Each start gets a new port: use its latest export lines"
            if vault.is_loopback
            else "check the vault URL and your network"
        )
        return Failure(EXIT_UNREACHABLE, f"cannot connect to {vault.url}: connection refused", hint)
    return Failure(
        EXIT_UNREACHABLE,
        f"cannot reach {vault.url}: {first_line(exc)}",
        "check the vault URL, your network and any proxy (HTTPS_PROXY)",
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
        EXIT_CONFLICT,
        f"the name '{name}' belongs to a deleted key that {vault.label} keeps{until} (soft-delete), "
        "so it cannot be used for a new key yet",
        f"recover it: {az_command(vault, 'recover', name)}   or purge it for good: "
        f"{az_command(vault, 'purge', name)}   or choose another name",
    )


def permission_hint(vault: Vault) -> str:
    name = az_vault_name(vault)
    if ".managedhsm." in vault.host:
        return (
            f'grant the role "Managed HSM Crypto User": az keyvault role assignment create --hsm-name {name} '
            f'--role "Managed HSM Crypto User" --assignee {ME} --scope /keys'
        )
    return (
        f"grant key permissions, either with an access policy: az keyvault set-policy --name {name} "
        f"--object-id {ME} --key-permissions {PERMISSIONS}   or, on a vault that uses Azure RBAC, "
        f'the role "{RBAC_ROLE}": az role assignment create --role "{RBAC_ROLE}" --assignee {ME} '
        f'--scope "$(az keyvault show --name {name} --query id --output tsv)"'
    )


def az_vault_name(vault: Vault) -> str:
    if vault.kind == "azure":
        return vault.label
    if vault.host and not vault.is_loopback:
        return vault.host.split(".")[0]
    return "VAULT_NAME"


def az_command(vault: Vault, verb: str, name: str, version: str = "") -> str:
    """The Azure CLI command for verb on key name; for localvault, which az cannot reach, the SDK call."""
    if vault.is_loopback or vault.kind == "embedded":
        calls = {
            "recover": f"KeyClient.begin_recover_deleted_key('{name}')",
            "purge": f"KeyClient.purge_deleted_key('{name}')",
            "delete": f"KeyClient.begin_delete_key('{name}')",
            "show": f"KeyClient.get_key('{name}')",
            "set-attributes": f"KeyClient.update_key_properties('{name}', '{version}', enabled=False)",
        }
        return f"{calls[verb]} on {vault.url or 'localvault'}"
    option = "--hsm-name" if ".managedhsm." in vault.host else "--vault-name"
    command = f"az keyvault key {verb} {option} {az_vault_name(vault)} --name {name}"
    return command + (f" --version {version} --enabled false" if verb == "set-attributes" else "")


def first_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return first_line_of(str(message))


def first_line_of(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 300 else line[:300] + "..."


def enum_text(value: Any) -> str:
    return str(getattr(value, "value", value))


# ---------------------------------------------------------------------------------------------------------
# Logging (--verbose) and the embedded localvault
# ---------------------------------------------------------------------------------------------------------


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
    """--verbose: the SDK's HTTP log on stderr. Otherwise silence it (azure.identity logs warnings)."""
    loggers = [logging.getLogger("azure"), logging.getLogger("localvault")]
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        handler.addFilter(_Redact())
    else:
        handler = logging.NullHandler()
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


@contextlib.contextmanager
def embedded_vault(vault: Vault) -> Iterator[Vault]:
    """Start localvault in this process; its managed-identity variables are set while it runs."""
    from localvault import LocalVault

    with LocalVault() as local:
        saved = dict(os.environ)
        os.environ.update(local.environ())  # azure-identity (msal) reads IDENTITY_* from os.environ
        try:
            yield Vault(
                kind="embedded", url=local.url, label=f"localvault at {local.url}", ca_file=local.ca_file
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    vault: Optional[Vault] = None
    verbose = argv is not None and ("-v" in argv or "--verbose" in argv)
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        verbose = args.verbose
        vault = choose_vault(args, os.environ)
        if vault.kind == "embedded":
            print(
                f"Using localvault, a Key Vault emulator started in this process on 127.0.0.1 ({vault.source}): "
                "nothing leaves this machine."
            )
            if importlib.util.find_spec("localvault") is None:
                raise Failure(
                    EXIT_USAGE,
                    "no vault configured, and the localvault package is not here to start one",
                    "run kv_keys.py from a clone of its repository, or set KEY_VAULT_NAME (or KEY_VAULT_URL) "
                    "to use a vault in Azure",
                )
        name = args.name or ask_key_name()
        with sdk_logging(verbose), contextlib.ExitStack() as stack:
            if vault.kind == "embedded":
                vault = stack.enter_context(embedded_vault(vault))
            client = make_client(vault)
            stack.callback(client.close)
            return run_quickstart(client, vault, name, args)
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(exc, vault, verbose)


if __name__ == "__main__":
    sys.exit(main())
