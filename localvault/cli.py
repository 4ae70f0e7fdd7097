"""The standalone command, ``python -m localvault --help``, and a reader for the lines it prints."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from typing import Dict, Iterable, List, Optional

from .persist import DATA_KEY_VARIABLE, DataDirError
from .vault import LOOPBACK, LocalVault, is_loopback

EXIT_OK, EXIT_USAGE = 0, 2
READY = "# Serving until Ctrl-C or SIGTERM."


def _retention(text: str) -> int:
    days = int(text)
    if not 7 <= days <= 90:
        raise argparse.ArgumentTypeError("must be between 7 and 90")
    return days


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
        epilog="Exit codes: 0 after a clean shutdown, 2 for a usage error, a port that is in use or a "
        "data directory that cannot be used.",
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
        "--data",
        metavar="DIR",
        help="keep keys, deleted keys, rotation policies, the clock, the CA and the vault's secrets in DIR "
        "across restarts, so the export lines, tokens and backups stay valid (with fixed --port and "
        f"--identity-port, export once). Each write is on disk before it is answered. With {DATA_KEY_VARIABLE} "
        "set when DIR is created, its secrets and key material are encrypted with a key derived from that "
        "passphrase, which every later start then needs (default: keep nothing)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return parser


def exports(vault: LocalVault) -> List[str]:
    kind = "Managed HSM" if vault.managed_hsm else "Azure Key Vault"
    lines = [f"# localvault: {kind} (keys) at {vault.url}; tokens from {vault.identity_endpoint}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in vault.environ().items()]
    lines += [
        f"# CA certificate to trust: {vault.ca_file}",
        "# A KeyClient for this vault needs two keyword arguments:",
        "#   KeyClient(os.environ['KEY_VAULT_URL'], DefaultAzureCredential(),",
        "#             verify_challenge_resource=False, connection_verify=os.environ['LOCALVAULT_CA_FILE'])",
        READY,
    ]
    return lines


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
                retention_days=args.retention_days,
                managed_hsm=args.managed_hsm,
                data_dir=args.data,
            )
    except DataDirError as exc:
        print(f"localvault: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for warning in caught:
        print(f"localvault: warning: {warning.message}", file=sys.stderr)
    try:
        vault.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"localvault: error: a port is already in use ({args.host}:{args.port} or identity port "
                f"{args.identity_port}); choose another with --port / --identity-port, or 0 for any free port.",
                file=sys.stderr,
            )
        else:
            print(
                f"localvault: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
                file=sys.stderr,
            )
        return EXIT_USAGE

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        print("\n".join(exports(vault)), flush=True)
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        vault.stop()
    print("# localvault stopped.", flush=True)
    return EXIT_OK
