"""Whether a request's cost grows with the number of keys in the vault, and whether listing is linear.
Prints figures; it asserts nothing.

    python benchmarks/localvault_scale.py [--small 10] [--large 10000] [--list-sizes 1000,10000]
                                          [--requests 2000] [--rounds 5]
                                          [--versions 10,3000] [--writes 100]

Each vault size runs in its own process (this script with ``--serve N``): a LocalVault holding N EC keys,
each with a rotation policy (Rotate 90 days after creation, and Key Vault's Notify), made through the
store so that filling it takes seconds. The client is one KeyClient in this process, over HTTPS.

- per request, at ``--small`` and at ``--large`` keys: ``--requests`` sequential get_key calls on each,
  consecutive ones on far-apart keys, the two vaults taking turns ``--rounds`` times (so that a change in
  the machine's load falls on both); client latency p50/p99, and the vault process's CPU (user + system,
  from /proc/PID/stat) per call, the median round's. Target: at ``--large`` keys, at most 1.2x the cost
  at ``--small``.
- writes, with ``--data`` (a new directory under the system's temporary one: the disk decides what an
  fsync costs), to a key of each of ``--versions`` versions: ``--writes`` sequential tag updates; p50
  and the vault's CPU per write. No target: a write rewrites the key's file, whose bytes grow with its
  versions, but no version is serialised again.
- listing, at each of ``--list-sizes``: one full ``list_properties_of_keys`` (pages of 25); its time and
  the vault's CPU per listed key. Target: linear (per listed key, the largest size at most 1.2x the
  smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONNECTION = ("KEY_VAULT_URL", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "LOCALVAULT_CA_FILE")

TARGET_RATIO = 1.2
SPREAD = (
    7919  # a prime: request i asks for key i * SPREAD mod N, so consecutive requests ask for far-apart keys
)
WARMUP = 20
VERSIONED = "scale-versions"


def key_name(index: int) -> str:
    return f"scale-{index:06d}"


def serve(count: int) -> None:
    """The vault, filled with ``count`` keys with rotation policies; serves until stdin closes."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from localvault import LocalVault
    from localvault.models import ROTATE, TIME_AFTER_CREATE, LifetimeAction

    with LocalVault() as vault:
        rotate = [LifetimeAction(ROTATE, TIME_AFTER_CREATE, "P90D")]
        for index in range(count):
            vault.store.add_version(key_name(index), "EC", ec.generate_private_key(ec.SECP256R1()))
            vault.store.set_rotation_policy(key_name(index), rotate, None)
        announce(vault)


def serve_versions(count: int) -> None:
    """A vault with ``--data`` (a new directory under the system's temporary one) holding one key of
    ``count`` versions; serves until stdin closes, then removes the directory."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from localvault import LocalVault

    parent = tempfile.mkdtemp(prefix="localvault-scale-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a plain DIR, for this run only
            vault = LocalVault(data_dir=os.path.join(parent, "data"), data_key="")
        with vault:
            key = ec.generate_private_key(ec.SECP256R1())
            for _ in range(count):
                vault.store.add_version(VERSIONED, "EC", key)
            announce(vault)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def announce(vault: Any) -> None:
    """Tell the parent where the vault is (through a pipe to it only), then serve until stdin closes."""
    environ = vault.environ()
    print(json.dumps({name: environ[name] for name in CONNECTION}), flush=True)
    sys.stdin.read()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: List[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


class Vault:
    """A ``--serve N`` process and a KeyClient for it."""

    def __init__(self, count: int, versions: bool = False) -> None:
        self.count = count
        serve = "--serve-versions" if versions else "--serve"
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), serve, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the vault with {count} keys did not start")
        found = json.loads(line)
        from azure.keyvault.keys import KeyClient

        from localvault.vault import LocalVaultCredential

        credential = LocalVaultCredential(found["IDENTITY_ENDPOINT"], found["IDENTITY_HEADER"])
        self.client = KeyClient(
            found["KEY_VAULT_URL"],
            credential,
            verify_challenge_resource=False,
            connection_verify=found["LOCALVAULT_CA_FILE"],
        )

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def close(self) -> None:
        self.client.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def per_request(vaults: List[Vault], requests: int, rounds: int) -> Dict[int, Tuple[float, float, float]]:
    """For each vault: get_key p50 and p99 (seconds) and its CPU seconds per call. The vaults take turns,
    ``rounds`` times, so that a change in the machine's load falls on each; CPU is the median round's."""
    for vault in vaults:
        for index in range(WARMUP):
            vault.client.get_key(key_name(index % vault.count))
    latencies: Dict[int, List[float]] = {vault.count: [] for vault in vaults}
    cpu: Dict[int, List[float]] = {vault.count: [] for vault in vaults}
    per_round = max(1, requests // rounds)
    for turn in range(rounds):
        for vault in vaults:
            before = vault.cpu()
            for index in range(turn * per_round, (turn + 1) * per_round):
                start = time.perf_counter()
                vault.client.get_key(key_name(index * SPREAD % vault.count))  # every key in turn
                latencies[vault.count].append(time.perf_counter() - start)
            cpu[vault.count].append((vault.cpu() - before) / per_round)
    return {
        count: (statistics.median(values), percentile(values, 99), statistics.median(cpu[count]))
        for count, values in latencies.items()
    }


def writes(vault: Vault, count: int) -> Tuple[float, float]:
    """``count`` tag updates of the versioned key's latest version: p50 (seconds), and the vault's CPU
    seconds per update."""
    vault.client.update_key_properties(VERSIONED, tags={"write": "warm-up"})
    latencies = []
    before = vault.cpu()
    for index in range(count):
        start = time.perf_counter()
        vault.client.update_key_properties(VERSIONED, tags={"write": str(index)})
        latencies.append(time.perf_counter() - start)
    return statistics.median(latencies), (vault.cpu() - before) / count


def listing(vault: Vault) -> Tuple[float, float]:
    """One full listing: seconds, and the vault's CPU seconds per listed key."""
    before, start = vault.cpu(), time.perf_counter()
    listed = sum(1 for _ in vault.client.list_properties_of_keys())
    elapsed, cpu = time.perf_counter() - start, vault.cpu() - before
    if listed != vault.count:
        raise SystemExit(f"listed {listed} keys of {vault.count}")
    return elapsed, cpu / listed


def judged(ratio: float) -> str:
    return f"{ratio:.2f}x (target at most {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'missed'})"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def sizes(text: str) -> List[int]:
    try:
        values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError("must be numbers separated by commas") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=positive, default=10, help="keys in the small vault (default: 10)")
    parser.add_argument(
        "--large", type=positive, default=10_000, help="keys in the large vault (default: 10000)"
    )
    parser.add_argument(
        "--list-sizes", type=sizes, default=[1000, 10_000], metavar="N,N", help="vaults to list"
    )
    parser.add_argument(
        "--requests", type=positive, default=2000, help="get_key calls per size (default: 2000)"
    )
    parser.add_argument("--rounds", type=positive, default=5, help="turns the two vaults take (default: 5)")
    parser.add_argument(
        "--versions", type=sizes, default=[10, 3000], metavar="N,N", help="versions of the written key"
    )
    parser.add_argument("--writes", type=positive, default=100, help="writes per size (default: 100)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-versions", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.serve_versions is not None:
        serve_versions(args.serve_versions)
        return 0
    if not os.path.exists("/proc/self/stat"):
        parser.error("the vault's CPU is read from /proc, which this system does not have")

    def start(count: int) -> Vault:
        started = time.perf_counter()
        vault = Vault(count)
        print(f"# vault with {count} keys ready in {time.perf_counter() - started:.1f} s", flush=True)
        return vault

    vaults = [start(count) for count in sorted({args.small, args.large})]
    try:
        requests = per_request(vaults, args.requests, args.rounds)
    finally:
        for vault in vaults:
            vault.close()
    for count, (p50, p99, cpu) in sorted(requests.items()):
        print(
            f"get_key at {count} keys: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"vault CPU {cpu * 1e3:.3f} ms per call",
            flush=True,
        )
    lists: Dict[int, Tuple[float, float]] = {}
    for count in args.list_sizes:
        vault = start(count)
        try:
            lists[count] = elapsed, cpu = listing(vault)
        finally:
            vault.close()
        print(
            f"listing {count} keys: {elapsed:.2f} s, vault CPU {cpu * 1e3:.3f} ms per listed key", flush=True
        )

    written: Dict[int, Tuple[float, float]] = {}
    for count in args.versions:
        started = time.perf_counter()
        vault = Vault(count, versions=True)
        print(f"# --data vault with a key of {count} versions ready in {time.perf_counter() - started:.1f} s")
        try:
            written[count] = p50, cpu = writes(vault, args.writes)
        finally:
            vault.close()
        print(
            f"update_key_properties on a key of {count} versions (--data): p50 {p50 * 1e3:.2f} ms, "
            f"vault CPU {cpu * 1e3:.3f} ms per write",
            flush=True,
        )

    small, large = requests[args.small], requests[args.large]
    print(f"get_key p50, {args.large} keys against {args.small}: {judged(large[0] / small[0])}")
    print(
        f"get_key vault CPU, {args.large} keys against {args.small}: {judged(large[2] / max(small[2], 1e-9))}"
    )
    if len(lists) > 1:
        first, last = min(lists), max(lists)
        ratio = lists[last][1] / max(lists[first][1], 1e-9)
        print(f"listing vault CPU per key, {last} keys against {first}: {judged(ratio)}")
    if len(written) > 1:
        first, last = min(written), max(written)
        print(
            f"a write at {last} versions against {first}: p50 {written[last][0] / written[first][0]:.2f}x, "
            f"vault CPU {written[last][1] / max(written[first][1], 1e-9):.2f}x (no target: each write "
            "rewrites the key's file, so its bytes grow with the versions)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
