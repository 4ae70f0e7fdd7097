"""The standalone command, ``python -m localvault --help``, and a reader for the lines it prints."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

from .control import parse_permissions
from .faults import parse_operations, parse_rates
from .models import SKUS, check_delay
from .persist import DATA_KEY_VARIABLE, DataDirError
from .proxy import check_vault_names
from .vault import LOOPBACK, LocalVault, is_loopback

EXIT_OK, EXIT_USAGE = 0, 2
READY = "# Serving until Ctrl-C or SIGTERM."


def _retention(text: str) -> int:
    days = int(text)
    if not 7 <= days <= 90:
        raise argparse.ArgumentTypeError("must be between 7 and 90")
    return days


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError with a readable message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _delay(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    return check_delay(seconds)


def prog_name() -> str:
    """The command this was run as: ``localvault`` (the console script) or ``python -m localvault``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m localvault" if name in ("", "-c", "__main__.py") else name


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or prog_name(),
        description=(
            "Serve an Azure Key Vault (keys API) over HTTPS on this machine, with a managed-identity "
            "token endpoint, so the real azure-keyvault-keys SDK and DefaultAzureCredential work "
            "against it unchanged. Prints shell export lines; stop it with Ctrl-C or SIGTERM."
        ),
        epilog="Exit codes: 0 after a clean shutdown, 2 for a usage error, a port that is in use, an "
        "--env-file that cannot be written or a data directory that cannot be used.",
    )
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to serve the vault on (default: %(default)s). Anything but loopback "
        "exposes the vault to the network and prints a warning.",
    )
    parser.add_argument(
        "--port", type=int, default=8443, help="vault HTTPS port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--proxy-port",
        type=int,
        default=0,
        metavar="N",
        help="port of the HTTPS proxy, always on 127.0.0.1, through which HTTPS_PROXY brings code written "
        "for Azure to https://NAME.vault.azure.net and https://NAME.managedhsm.azure.net here, unchanged; "
        "(default: a free port)",
    )
    parser.add_argument(
        "--vault",
        action="append",
        type=_checked(lambda text: check_vault_names([text])[0]),
        metavar="NAME",
        help="serve only this vault (or Managed HSM) name through the proxy; repeat for more. Any other "
        "name then fails to connect, as an unknown vault does in Azure (default: every name, each a vault "
        "of its own, made on first use)",
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="refuse (403) every host through the proxy that is not a Key Vault or Managed HSM host, "
        "instead of tunnelling it unchanged to its real destination",
    )
    parser.add_argument(
        "--identity-port",
        type=int,
        default=0,
        metavar="N",
        help="port of the managed-identity token endpoint, always on 127.0.0.1 over plain HTTP "
        "(default: a free port)",
    )
    parser.add_argument(
        "--retention-days",
        type=_retention,
        default=90,
        metavar="DAYS",
        help="soft-delete retention, 7 to 90 days (default: %(default)s)",
    )
    parser.add_argument(
        "--managed-hsm",
        action="store_true",
        help="behave as a Managed HSM (tokens for https://managedhsm.azure.net, oct-HSM keys, random "
        "bytes) instead of a Premium key vault",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="write the export lines to PATH, a file only you can read (mode 0600 from its creation), "
        "instead of printing them; load them with '. PATH'. They carry IDENTITY_HEADER, the secret that "
        "gets tokens for this vault, which a redirect such as '> PATH' leaves readable by every local user",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="keep keys, deleted keys, rotation policies, the clock, the CA and the vault's secrets in DIR "
        "across restarts, so tokens and backups stay valid, and with fixed --port and --identity-port the "
        f"export lines for the vault's own port too. Each write is on disk before it is answered. With {DATA_KEY_VARIABLE} "
        "set when DIR is created, its secrets and key material are encrypted with a key derived from that "
        "passphrase, which every later start then needs (default: keep nothing)",
    )
    controls = parser.add_argument_group(
        "controls",
        "Make the vault fail as a real one does. Tests can change faults, the delete delay and key "
        "permissions at run time through the control API under /_localvault/ on the vault's port, "
        "which needs the IDENTITY_HEADER secret in X-IDENTITY-HEADER.",
    )
    controls.add_argument(
        "--faults",
        type=_checked(parse_rates),
        default={},
        metavar="FAULT=RATE,...",
        help="answer this share of requests with an injected failure, decided before the request is "
        "processed: 429 (Throttled, with Retry-After), 500, 503, or drop (close the connection with no "
        "answer); e.g. 429=0.2,503=0.1 (default: none)",
    )
    controls.add_argument(
        "--fault-seed",
        type=int,
        metavar="N",
        help="seed for --faults, so the same requests fail on every run (default: random)",
    )
    controls.add_argument(
        "--fault-operations",
        type=_checked(parse_operations),
        metavar="OPERATION,...",
        help="apply --faults only to these operations (keys.json operationIds, e.g. CreateKey,GetKey; "
        "default: all)",
    )
    controls.add_argument(
        "--delete-delay",
        type=_checked(_delay),
        default=0.0,
        metavar="SECONDS",
        help="time a deletion or a recovery takes to complete, 0 to 3600 seconds of the vault's clock; "
        "until then the deleted key is not found and its name cannot be reused (default: 0)",
    )
    controls.add_argument(
        "--key-permissions",
        type=_checked(parse_permissions),
        metavar="PERMISSION,...",
        help="access-policy key permissions tokens have, e.g. get,list,create (any case); other "
        "operations get 403 Forbidden (default: all)",
    )
    controls.add_argument(
        "--purge-protection",
        action="store_true",
        help="refuse to purge deleted keys (403); they are purged at their scheduled purge date",
    )
    controls.add_argument(
        "--sku",
        choices=SKUS,
        default="premium",
        help="standard refuses RSA-HSM and EC-HSM keys with 403 Forbidden; ignored with --managed-hsm "
        "(default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return parser


# The direct URL stays out of the export lines, so that KEY_VAULT_NAME chooses the vault.
EXPORTED_OUT = ("KEY_VAULT_URL",)


def exports(vault: LocalVault) -> List[str]:
    kind = "Managed HSM" if vault.managed_hsm else "Azure Key Vault"
    names = vault.allowed_vaults
    example = names[0] if names else "contoso"
    lines = [
        f"# localvault: {kind} (keys) at {vault.url}; HTTPS proxy {vault.proxy_url}; "
        f"tokens from {vault.identity_endpoint}",
        f"# Through the proxy, https://NAME.vault.azure.net and https://NAME.managedhsm.azure.net are vaults "
        f"here: {'only ' + ', '.join(names) if names else 'each name its own, made on first use'}"
        f"{'' if not vault.isolated else '; other hosts are refused (--isolated)'}.",
    ]
    lines += [
        f"export {name}={shlex.quote(value)}"
        for name, value in vault.environ().items()
        if name not in EXPORTED_OUT
    ]
    controls = vault.describe_controls()
    if controls:
        lines.append(f"# Controls: {controls}; control API under {vault.url}/_localvault/")
    lines += [
        f"# CA certificate to trust: {vault.ca_file}",
        "# Code written for Azure now runs here unchanged, with DefaultAzureCredential, e.g.",
        f"#   KeyClient('https://{example}.vault.azure.net', DefaultAzureCredential())",
        f"#   KEY_VAULT_NAME={example} python kv_keys.py",
        f"#   az login --identity --allow-no-subscriptions && az keyvault key list --vault-name {example}",
        f"# Undo these exports when localvault stops: {unset_line(vault)}",
        READY,
    ]
    return lines


def unset_line(vault: LocalVault) -> str:
    """The shell line that undoes the export lines; a shell still pointing at a stopped proxy fails every
    HTTPS request."""
    return "unset " + " ".join(name for name in vault.environ() if name not in EXPORTED_OUT)


def write_private(path: str, lines: List[str]) -> None:
    """Write ``lines`` to ``path`` through a new file only its owner can read from its creation (mkstemp
    makes it 0600), renamed over ``path``: a file there keeps no old mode, a symlink is not followed."""
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".localvault-env-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_exports(lines: Iterable[str]) -> Dict[str, str]:
    """The variables from ``python -m localvault``'s output, read up to the line saying it serves."""
    exports: Dict[str, str] = {}
    for line in lines:
        if line.startswith("export "):
            name, _, value = line[len("export ") :].strip().partition("=")
            exports[name] = shlex.split(value)[0]
        if line.strip() == READY:
            break
    return exports


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="localvault: %(message)s", stream=sys.stderr)
    if not is_loopback(args.host):
        print(
            f"localvault: warning: serving on {args.host}, not loopback: other machines can reach this vault.",
            file=sys.stderr,
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vault = LocalVault(
                host=args.host,
                port=args.port,
                identity_port=args.identity_port,
                proxy_port=args.proxy_port,
                vaults=args.vault,
                isolated=args.isolated,
                retention_days=args.retention_days,
                managed_hsm=args.managed_hsm,
                data_dir=args.data,
                faults=args.faults,
                fault_seed=args.fault_seed,
                fault_operations=args.fault_operations,
                key_permissions=args.key_permissions,
                delete_delay=args.delete_delay,
                purge_protection=args.purge_protection,
                sku=args.sku,
            )
    except DataDirError as exc:
        print(f"localvault: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for warning in caught:
        print(f"localvault: warning: {warning.message}", file=sys.stderr)
    try:
        vault.start()
    except DataDirError as exc:  # e.g. another localvault took DIR since it was read
        print(f"localvault: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"localvault: error: a port is already in use ({args.host}:{args.port}, proxy port "
                f"{args.proxy_port} or identity port {args.identity_port}); choose another with --port / "
                "--proxy-port / --identity-port, or 0 for any free port.",
                file=sys.stderr,
            )
        else:
            print(
                f"localvault: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
                file=sys.stderr,
            )
        return EXIT_USAGE

    lines = exports(vault)
    if args.env_file:
        try:
            write_private(args.env_file, [line for line in lines if line != READY])
        except OSError as exc:
            vault.stop()
            print(
                f"localvault: error: cannot write --env-file {args.env_file}: {exc.strerror}; "
                "choose a file in a directory you can write to.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        lines = [line for line in lines if not line.startswith("export ")]
        path = os.path.abspath(args.env_file)
        lines.insert(
            1, f"# Export lines written to {path} (mode 0600); load them with: . {shlex.quote(path)}"
        )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        print("\n".join(lines), flush=True)
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        undo = unset_line(vault)
        vault.stop()
        if args.env_file:
            with contextlib.suppress(OSError):
                os.unlink(args.env_file)
    removed = f"; {os.path.abspath(args.env_file)} removed" if args.env_file else ""
    print(f"# localvault stopped{removed}. Undo its exports in each shell that loaded them:", flush=True)
    print(undo, flush=True)
    return EXIT_OK
