"""How fast localvault answers the real SDK: get_key requests per second with p50/p99 latency, the
latency of creating an RSA-2048 key, and remote cryptographic operations per second (RS256 sign with
RSA-2048, ES256 sign with P-256, RSA-OAEP decrypt with RSA-2048), and writes per second (create_ec_key
and update_key_properties). Prints figures; it asserts nothing.

    python benchmarks/localvault_throughput.py [--clients 4] [--seconds 10] [--creates 20] [--data]

``--data`` runs the vault with ``--data`` in a new temporary directory, encrypted with a random
LOCALVAULT_DATA_KEY, so that every write is on disk before it is answered; compare its write figures
with a run without it to see what persistence costs.

The vault runs standalone (``python -m localvault``) in its own process, and each client is a separate
process with its own KeyClient (or CryptographyClient) and DefaultAzureCredential, so the figures are
what another program on this machine would see. Targets on 2 cores: at least 400 get_key/s with p99
under 50 ms; at least 200 RS256 signs/s. The cryptographic operations are the vault's: each
CryptographyClient has only the key's id and public part, and every timed call is checked to have
been one HTTP response from the vault.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from localvault.cli import read_exports  # noqa: E402


def start_vault(data_dir: Optional[str] = None) -> Tuple[subprocess.Popen, Dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "localvault", "--port", "0"]
    if data_dir is not None:
        command += ["--data", data_dir]
        env["LOCALVAULT_DATA_KEY"] = secrets.token_urlsafe(16)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    exports = read_exports(process.stdout)
    return process, exports


def make_client(exports: Dict[str, str]):
    os.environ.update(exports)
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys import KeyClient

    return KeyClient(
        exports["LOCALVAULT_URL"],
        DefaultAzureCredential(),
        verify_challenge_resource=False,
        connection_verify=exports["LOCALVAULT_CA_FILE"],
    )


def make_operation(
    exports: Dict[str, str], operation: str, target: str, payload: bytes, responses: List[int]
):
    """A no-argument call doing ``operation`` once, counting the vault's HTTP responses."""
    if operation == "get_key":
        client = make_client(exports)
        return lambda: client.get_key(target)
    if operation == "update_key_properties":
        client = make_client(exports)
        tags = iter(range(1 << 62))
        return lambda: client.update_key_properties(target, tags={"n": str(next(tags))})
    if operation == "create_ec_key":
        client = make_client(exports)
        names = iter(range(1 << 62))
        return lambda: client.create_ec_key(f"{target}-{os.getpid()}-{next(names)}")
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys.crypto import CryptographyClient

    crypto = CryptographyClient(
        target,
        DefaultAzureCredential(),
        verify_challenge_resource=False,
        connection_verify=exports["LOCALVAULT_CA_FILE"],
    )

    def counted(_response) -> None:
        responses[0] += 1

    if operation == "RSA-OAEP":
        return lambda: crypto.decrypt(operation, payload, raw_response_hook=counted)
    return lambda: crypto.sign(operation, payload, raw_response_hook=counted)


def worker(
    exports: Dict[str, str], operation: str, target: str, payload: bytes, start_at: float, seconds: float, out
) -> None:
    os.environ.update(exports)
    responses = [0]
    call = make_operation(exports, operation, target, payload, responses)
    call()  # warm: challenge, token, TLS session (and the CryptographyClient's get_key)
    responses[0] = 0
    while time.time() < start_at:
        time.sleep(0.001)
    latencies: List[float] = []
    deadline = start_at + seconds
    while True:
        began = time.perf_counter()
        if time.time() >= deadline:
            break
        call()
        latencies.append(time.perf_counter() - began)
    out.put((latencies, responses[0]))


def run_phase(exports: Dict[str, str], operation: str, target: str, payload: bytes, args) -> List[float]:
    """Latencies of ``operation`` from ``args.clients`` processes running for ``args.seconds``."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 3.0  # time for every worker to import the SDK and warm up
    workers = [
        context.Process(
            target=worker, args=(exports, operation, target, payload, start_at, args.seconds, queue)
        )
        for _ in range(args.clients)
    ]
    for process in workers:
        process.start()
    latencies: List[float] = []
    for _ in workers:
        part, responses = queue.get(timeout=args.seconds + 120)
        if operation not in (*WRITES, "get_key") and responses != len(part):
            raise SystemExit(f"{operation}: {len(part)} calls but {responses} vault responses; not remote")
        latencies.extend(part)
    for process in workers:
        process.join()
    return latencies


WRITES = ("create_ec_key", "update_key_properties")


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
    parser.add_argument(
        "--data",
        action="store_true",
        help="run the vault with --data in a temporary directory (encrypted), as persistence costs",
    )
    args = parser.parse_args(argv)

    data_dir = tempfile.mkdtemp(prefix="localvault-bench-") if args.data else None
    vault, exports = start_vault(None if data_dir is None else os.path.join(data_dir, "vault"))
    try:
        client = make_client(exports)
        name = f"bench-{os.getpid()}"
        ec_key = client.create_ec_key(name)
        creates = []
        for i in range(args.creates):
            began = time.perf_counter()
            client.create_rsa_key(f"{name}-rsa-{i}", size=2048)
            creates.append(time.perf_counter() - began)
        rsa_key = client.get_key(f"{name}-rsa-0")
        ciphertext = public_rsa(rsa_key).encrypt(os.urandom(32), oaep())
        digest = hashlib.sha256(b"localvault").digest()

        latencies = run_phase(exports, "get_key", name, b"", args)
        remote = {
            "RS256 sign (RSA-2048)": run_phase(exports, "RS256", rsa_key.id, digest, args),
            "ES256 sign (P-256)": run_phase(exports, "ES256", ec_key.id, digest, args),
            "RSA-OAEP decrypt (RSA-2048)": run_phase(exports, "RSA-OAEP", rsa_key.id, ciphertext, args),
        }
        writes = {operation: run_phase(exports, operation, name, b"", args) for operation in WRITES}
        client.close()
    finally:
        vault.send_signal(signal.SIGTERM)
        vault.wait(timeout=60)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        "vault: " + ("--data (encrypted), each write on disk before its answer" if args.data else "in memory")
    )
    print(f"get_key: {args.clients} client processes for {args.seconds:.0f} s")
    print(f"  requests/s  {len(latencies) / args.seconds:8.1f}   (target >= 400)")
    print(f"  p50 ms      {statistics.median(latencies) * 1000:8.2f}")
    print(f"  p99 ms      {percentile(latencies, 99) * 1000:8.2f}   (target < 50)")
    print(f"create_rsa_key(size=2048): {args.creates} sequential creates")
    print(f"  p50 ms      {statistics.median(creates) * 1000:8.2f}")
    print(f"  p99 ms      {percentile(creates, 99) * 1000:8.2f}")
    for label, values in remote.items():
        target = "   (target >= 200)" if label.startswith("RS256") else ""
        print(f"{label}, remote: {args.clients} client processes for {args.seconds:.0f} s")
        print(f"  ops/s       {len(values) / args.seconds:8.1f}{target}")
        print(f"  p50 ms      {statistics.median(values) * 1000:8.2f}")
        print(f"  p99 ms      {percentile(values, 99) * 1000:8.2f}")
    for operation, values in writes.items():
        print(f"{operation}: {args.clients} client processes for {args.seconds:.0f} s")
        print(f"  writes/s    {len(values) / args.seconds:8.1f}")
        print(f"  p50 ms      {statistics.median(values) * 1000:8.2f}")
        print(f"  p99 ms      {percentile(values, 99) * 1000:8.2f}")
    return 0


def public_rsa(key):
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.RSAPublicNumbers(int.from_bytes(key.key.e, "big"), int.from_bytes(key.key.n, "big"))
    return numbers.public_key()


def oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


if __name__ == "__main__":
    sys.exit(main())
