"""Wall time of the quickstart on the embedded localvault, against the floor. Not a test.

    python benchmarks/quickstart_wall.py [--runs 7]

quickstart: `python kv_keys.py --name X` with no vault configured, so it starts localvault in-process,
            then creates, retrieves and deletes an RSA 2048 key.
floor:      a process that only imports azure.identity and azure.keyvault.keys and generates one RSA 2048
            key with cryptography: the least any such script has to do.

Runs alternate between the two, after one warm-up each; the figures are medians. Target: at most 1.5x the floor.
Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.5
FLOOR_CODE = (
    "import azure.identity, azure.keyvault.keys\n"
    "from cryptography.hazmat.primitives.asymmetric import rsa\n"
    "rsa.generate_private_key(public_exponent=65537, key_size=2048)\n"
)


def environment() -> Dict[str, str]:
    """No vault, identity, Azure or proxy variables: kv_keys.py uses its embedded localvault."""
    prefixes = ("KEY_VAULT_", "IDENTITY_", "LOCALVAULT_", "AZURE_", "MSI_", "IMDS_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(prefixes) and not k.upper().endswith("_PROXY")
    }
    env["AZURE_TOKEN_CREDENTIALS"] = "dev"
    return env


def timed(command: List[str], env: Dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each (default: 7)")
    args = parser.parse_args()
    env = environment()
    floor_cmd = [sys.executable, "-c", FLOOR_CODE]

    def quickstart_cmd() -> List[str]:
        return [sys.executable, str(REPO / "kv_keys.py"), "--name", f"bench-{uuid.uuid4().hex[:12]}"]

    timed(floor_cmd, env)  # warm-up: file cache, .pyc files
    timed(quickstart_cmd(), env)
    floor: List[float] = []
    quickstart: List[float] = []
    for _ in range(args.runs):
        floor.append(timed(floor_cmd, env))
        quickstart.append(timed(quickstart_cmd(), env))

    floor_median, quick_median = statistics.median(floor), statistics.median(quickstart)
    ratio = quick_median / floor_median
    print(
        f"runs each:         {args.runs} (after one warm-up), Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"floor median:      {floor_median * 1000:7.1f} ms  (min {min(floor) * 1000:.1f}, max {max(floor) * 1000:.1f})"
    )
    print(
        f"quickstart median: {quick_median * 1000:7.1f} ms  "
        f"(min {min(quickstart) * 1000:.1f}, max {max(quickstart) * 1000:.1f})"
    )
    verdict = "meets" if ratio <= TARGET else "MISSES"
    print(f"ratio:             {ratio:7.2f}x  ({verdict} the target of at most {TARGET}x the floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
