"""How fast localvault answers the real SDK: get_key requests per second with p50/p99 latency, and the
latency of creating an RSA-2048 key. Prints figures; it asserts nothing.

    python benchmarks/localvault_throughput.py [--clients 4] [--seconds 10] [--creates 20]

The vault runs standalone (``python -m localvault``) in its own process, and each client is a separate
process with its own KeyClient and DefaultAzureCredential, so the figures are what another program
on this machine would see. Target: at least 400 get_key/s with p99 under 50 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from localvault.cli import read_exports  # noqa: E402


def start_vault() -> Tuple[subprocess.Popen, Dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "localvault", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    exports = read_exports(process.stdout)
    return process, exports


def make_client(exports: Dict[str, str]):
    os.environ.update(exports)
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys import KeyClient

    return KeyClient(
        exports["KEY_VAULT_URL"],
        DefaultAzureCredential(),
        verify_challenge_resource=False,
        connection_verify=exports["LOCALVAULT_CA_FILE"],
    )


def get_worker(exports: Dict[str, str], name: str, start_at: float, seconds: float, out) -> None:
    client = make_client(exports)
    client.get_key(name)  # warm: challenge, token, TLS session
    while time.time() < start_at:
        time.sleep(0.001)
    latencies: List[float] = []
    deadline = start_at + seconds
    while True:
        began = time.perf_counter()
        if time.time() >= deadline:
            break
        client.get_key(name)
        latencies.append(time.perf_counter() - began)
    out.put(latencies)


def percentile(values: List[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes (default 4)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="how long the get_key phase runs (default 10)"
    )
    parser.add_argument(
        "--creates", type=int, default=20, help="RSA-2048 keys to create, one at a time (default 20)"
    )
    args = parser.parse_args(argv)

    vault, exports = start_vault()
    try:
        client = make_client(exports)
        name = f"bench-{os.getpid()}"
        client.create_ec_key(name)
        creates = []
        for i in range(args.creates):
            began = time.perf_counter()
            client.create_rsa_key(f"{name}-rsa-{i}", size=2048)
            creates.append(time.perf_counter() - began)

        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        start_at = time.time() + 3.0  # time for every worker to import the SDK and warm up
        workers = [
            context.Process(target=get_worker, args=(exports, name, start_at, args.seconds, queue))
            for _ in range(args.clients)
        ]
        for worker in workers:
            worker.start()
        latencies: List[float] = []
        for _ in workers:
            latencies.extend(queue.get(timeout=args.seconds + 120))
        for worker in workers:
            worker.join()
        client.close()
    finally:
        vault.send_signal(signal.SIGTERM)
        vault.wait(timeout=60)

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"get_key: {args.clients} client processes for {args.seconds:.0f} s")
    print(f"  requests/s  {len(latencies) / args.seconds:8.1f}   (target >= 400)")
    print(f"  p50 ms      {statistics.median(latencies) * 1000:8.2f}")
    print(f"  p99 ms      {percentile(latencies, 99) * 1000:8.2f}   (target < 50)")
    print(f"create_rsa_key(size=2048): {args.creates} sequential creates")
    print(f"  p50 ms      {statistics.median(creates) * 1000:8.2f}")
    print(f"  p99 ms      {percentile(creates, 99) * 1000:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
