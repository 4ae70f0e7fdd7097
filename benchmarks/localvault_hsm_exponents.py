"""What an RSA key with a public exponent other than 3 or 65537 costs in Managed HSM mode, and whether
making one holds up other requests: each create's time per (size, exponent), and a concurrent get_key's
p50 and max while the creates run. Prints figures; it asserts nothing.

    python benchmarks/localvault_hsm_exponents.py [--keys 5]

The vault runs in this process (``LocalVault(managed_hsm=True)``); its worker processes make the keys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from localvault import LocalVault  # noqa: E402

CASES = [(2048, 65537), (2048, 17), (3072, 17), (4096, 17), (4096, 2**31 - 1)]


def watch(client: object, stop: threading.Event, latencies: List[float]) -> None:
    """get_key in a loop until ``stop``, each call's time in ``latencies``."""
    while not stop.is_set():
        started = time.perf_counter()
        client.get_key("monitored")  # type: ignore[attr-defined]
        latencies.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=5, help="keys per case")
    args = parser.parse_args()
    with LocalVault(managed_hsm=True) as hsm:
        creator, monitor = hsm.key_client(), hsm.key_client()
        monitor.create_ec_key("monitored", hardware_protected=True)
        creator.create_rsa_key("warm-up", hardware_protected=True)  # starts the worker pool
        print(
            f"{'size':>5} {'exponent':>11} {'create p50':>11} {'create max':>11} {'get_key p50':>12} {'get_key max':>12}"
        )
        for size, exponent in CASES:
            latencies: List[float] = []
            stop = threading.Event()
            watcher = threading.Thread(target=watch, args=(monitor, stop, latencies))
            watcher.start()
            creates = []
            for index in range(args.keys):
                started = time.perf_counter()
                creator.create_rsa_key(
                    f"k{size}-{exponent}-{index}",
                    size=size,
                    public_exponent=exponent,
                    hardware_protected=True,
                )
                creates.append(time.perf_counter() - started)
            stop.set()
            watcher.join()
            print(
                f"{size:>5} {exponent:>11} {statistics.median(creates) * 1000:>9.0f}ms {max(creates) * 1000:>9.0f}ms"
                f" {statistics.median(latencies) * 1000:>10.1f}ms {max(latencies) * 1000:>10.1f}ms"
            )
        creator.close()
        monitor.close()


if __name__ == "__main__":
    main()
