"""What the proxy costs: get_key and remote RS256 signs per second through the proxy port, at a vault's real
address, against the same calls made directly to localvault's own port. Prints figures; asserts nothing.

    python benchmarks/localvault_proxy.py [--clients 8] [--seconds 5] [--rounds 3]

The vault runs standalone (``python -m localvault --isolated``) in its own process. Each client is a
separate process holding two clients per operation: one as code written for Azure has it
(``KeyClient("https://bench.vault.azure.net", DefaultAzureCredential())``, with only the export lines),
one at ``https://127.0.0.1:PORT`` with ``verify_challenge_resource=False`` and the CA. All processes run
the same schedule of phases, direct and proxy interleaved round by round, so that both see the same
machine. Target: the proxy costs at most 1.25x direct throughput (direct/proxy at most 1.25).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from localvault.cli import read_exports  # noqa: E402

VAULT_NAME = "bench"
PROXIED_URL = f"https://{VAULT_NAME}.vault.azure.net"
OPERATIONS = ("get_key", "RS256 sign")
MODES = ("direct", "proxy")
WARMUP = 4.0  # seconds for every process to import the SDK, get tokens and open its connections


def start_vault() -> Tuple[subprocess.Popen, Dict[str, str]]:
    env = {name: value for name, value in os.environ.items() if not name.upper().endswith("_PROXY")}
    command = [sys.executable, "-m", "localvault", "--port", "0", "--isolated", "--vault", VAULT_NAME]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=dict(env, PYTHONPATH=ROOT))
    assert process.stdout is not None
    return process, read_exports(process.stdout)


def clients(exports: Dict[str, str], mode: str) -> Tuple[Any, Callable[[str], Any]]:
    """A KeyClient and a CryptographyClient factory, as code written for Azure has them (proxy) or
    pointed at localvault's own port (direct)."""
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient

    credential = DefaultAzureCredential()
    if mode == "proxy":
        return KeyClient(PROXIED_URL, credential), lambda key_id: CryptographyClient(key_id, credential)
    direct = {"verify_challenge_resource": False, "connection_verify": exports["LOCALVAULT_CA_FILE"]}
    return (
        KeyClient(exports["LOCALVAULT_URL"], credential, **direct),
        lambda key_id: CryptographyClient(key_id, credential, **direct),
    )


def prepare(exports: Dict[str, str]) -> Dict[str, str]:
    """An RSA-2048 key in each vault: the direct port's and the proxied name's. Its id per mode."""
    os.environ.update(exports)
    ids = {}
    for mode in MODES:
        client, _ = clients(exports, mode)
        ids[mode] = client.create_rsa_key(f"bench-{os.getpid()}", size=2048).id
        client.close()
    return ids


def worker(
    exports: Dict[str, str], ids: Dict[str, str], schedule: List[Tuple[str, str, float, float]], out
) -> None:
    os.environ.update(exports)
    digest = hashlib.sha256(b"localvault").digest()
    calls: Dict[Tuple[str, str], Callable[[], Any]] = {}
    for mode in MODES:
        client, crypto_for = clients(exports, mode)
        name = ids[mode].split("/keys/")[1].split("/")[0]
        crypto = crypto_for(ids[mode])
        responses = [0]

        def sign(crypto: Any = crypto, responses: List[int] = responses) -> Any:
            return crypto.sign(
                "RS256", digest, raw_response_hook=lambda _: responses.__setitem__(0, responses[0] + 1)
            )

        calls[(mode, "get_key")] = lambda client=client, name=name: client.get_key(name)
        calls[(mode, "RS256 sign")] = sign
        for operation in OPERATIONS:
            calls[(mode, operation)]()  # warm: challenge, token, TLS (and the CryptographyClient's get_key)
        responses[0] = 0
        sign()
        if responses[0] != 1:
            raise SystemExit(f"{mode}: a sign was not one response from the vault; not remote")
    counts = []
    for mode, operation, start_at, end_at in schedule:
        call = calls[(mode, operation)]
        while time.time() < start_at:
            time.sleep(0.001)
        done = 0
        latencies = []
        while True:
            began = time.perf_counter()
            if time.time() >= end_at:
                break
            call()
            latencies.append(time.perf_counter() - began)
            done += 1
        counts.append((mode, operation, done, latencies))
    out.put(counts)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of direct and proxy phases (default 3)")
    args = parser.parse_args(argv)
    for name in ("clients", "seconds", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")

    vault, exports = start_vault()
    try:
        ids = prepare(exports)
        start = time.time() + WARMUP + args.clients * 0.5
        schedule = []
        for round_number in range(args.rounds):
            for operation in OPERATIONS:
                order = MODES if round_number % 2 == 0 else MODES[::-1]
                for mode in order:
                    schedule.append((mode, operation, start, start + args.seconds))
                    start += args.seconds + 0.2  # a pause: the phase before has ended everywhere
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        processes = [
            context.Process(target=worker, args=(exports, ids, schedule, queue)) for _ in range(args.clients)
        ]
        for process in processes:
            process.start()
        results = [queue.get(timeout=start - time.time() + 120) for _ in processes]
        failed = [result for result in results if isinstance(result, str)]
        if failed:
            raise SystemExit(f"a client failed: {failed[0]}")
        for process in processes:
            process.join()
    finally:
        vault.send_signal(signal.SIGTERM)
        vault.wait(timeout=60)

    totals: Dict[Tuple[str, str], int] = {}
    latencies: Dict[Tuple[str, str], List[float]] = {}
    for counts in results:
        for mode, operation, done, phase_latencies in counts:
            totals[(mode, operation)] = totals.get((mode, operation), 0) + done
            latencies.setdefault((mode, operation), []).extend(phase_latencies)
    seconds = args.seconds * args.rounds
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"{args.clients} client processes, {args.rounds} rounds of {args.seconds:g} s per mode and operation"
    )
    for operation in OPERATIONS:
        rates = {mode: totals[(mode, operation)] / seconds for mode in MODES}
        for mode in MODES:
            values = sorted(latencies[(mode, operation)])
            p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
            print(
                f"{operation:>10} {mode:>6}: {rates[mode]:8.1f}/s  p50 {statistics.median(values) * 1000:6.2f} ms"
                f"  p99 {p99 * 1000:6.2f} ms"
            )
        ratio = rates["direct"] / rates["proxy"] if rates["proxy"] else float("inf")
        print(f"{operation:>10} direct/proxy throughput: {ratio:.2f}x (target at most 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
