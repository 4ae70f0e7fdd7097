"""Whether a hostile client stalls the others: a concurrent get_key's p50, p99 and max while each hostile
request runs, and localvault's CPU per get_key against a minimal TLS server answering the same SDK
client. Prints figures; it asserts nothing.

    python benchmarks/localvault_stalls.py [--seconds 5] [--connections 128] [--cpu-requests 300]

The vault runs standalone (``python -m localvault``) in its own process; the monitor is one KeyClient
with DefaultAzureCredential in this process, calling get_key in a loop. The hostile phases, each
``--seconds`` long:

- ``65 KB line``: request lines of 65 KB (no token), sent again and again, on the vault port and on the
  identity port;
- ``slowloris``: ``--connections`` connections on each port, each sending a head that never ends;
- ``buffered``: ``--connections`` connections each sending a whole request and a partial one;
- ``slow reader``: connections asking for answers they never read.

CPU is read from /proc (Linux): the server process's user + system time over ``--cpu-requests``
sequential get_key calls, for localvault and for a minimal server (``http.server`` over TLS, a fixed
answer, the same challenge), which shows what the SDK's requests cost any Python server. Target: at
most 3x the minimal server, and a max under 100 ms in every phase.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from localvault import tls  # noqa: E402
from localvault.cli import read_exports  # noqa: E402
from localvault.server import CHALLENGE  # noqa: E402

PROBE = "stall-probe"


# -- the servers ----------------------------------------------------------------------------------


def start_vault() -> Tuple[subprocess.Popen, Dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "localvault", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    return process, read_exports(process.stdout)


def minimal_server(answer_file: str) -> None:
    """The comparison: a TLS server that checks for a bearer token and answers one fixed key."""
    with open(answer_file, "rb") as handle:
        answer = handle.read()
    directory = tempfile.mkdtemp(prefix="minimal-")
    files = tls.generate(directory)
    context = tls.server_context(files)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                self.send_response(401)
                self.send_header("WWW-Authenticate", CHALLENGE)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):  # type: ignore[no-untyped-def]
            sock, address = super().get_request()
            return context.wrap_socket(sock, server_side=True), address

    server = Server(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1], "ca_file": files.ca_file}), flush=True)
    server.serve_forever()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- clients --------------------------------------------------------------------------------------


def key_client(url: str, ca_file: str):
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys import KeyClient

    return KeyClient(
        url, DefaultAzureCredential(), verify_challenge_resource=False, connection_verify=ca_file
    )


class Monitor:
    """get_key in a loop; each latency goes to the phase that is current."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.phase = "warm-up"
        self.latencies: Dict[str, List[float]] = {}
        self.errors: Dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            phase, start = self.phase, time.perf_counter()
            try:
                self.client.get_key(PROBE)
            except Exception:  # a failed probe is a figure too
                self.errors[phase] = self.errors.get(phase, 0) + 1
            self.latencies.setdefault(phase, []).append(time.perf_counter() - start)


def tls_socket(port: int, ca_file: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca_file)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def plain_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def long_lines(connect: Callable[[], socket.socket], stop: threading.Event) -> None:
    line = b"GET /" + b"eyJ" * 21_800 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    while not stop.is_set():
        with contextlib.suppress(OSError), connect() as sock:
            sock.sendall(line)
            while sock.recv(65536):
                pass


def hold(connect: Callable[[], socket.socket], data: bytes, count: int, stop: threading.Event) -> None:
    held = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sock = connect()
            sock.sendall(data)
            held.append(sock)
    stop.wait()
    for sock in held:
        sock.close()


def slow_readers(
    connect: Callable[[], socket.socket], request: bytes, count: int, stop: threading.Event
) -> None:
    held = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sock = connect()
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                for _ in range(64):
                    sock.send(request)
            held.append(sock)
    stop.wait()
    for sock in held:
        sock.close()


def percentile(values: List[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# -- main -----------------------------------------------------------------------------------------


def measure_cpu(pid: int, client, count: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        client.get_key(PROBE)
    before = cpu_seconds(pid)
    for _ in range(count):
        client.get_key(PROBE)
    return (cpu_seconds(pid) - before) / count


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--cpu-requests", type=int, default=300)
    parser.add_argument("--minimal-server", metavar="ANSWER_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minimal_server:
        minimal_server(args.minimal_server)
        return 0

    vault, exports = start_vault()
    minimal: Optional[subprocess.Popen] = None
    answer_dir = tempfile.mkdtemp(prefix="stalls-")
    try:
        os.environ.update(exports)
        url, ca_file = exports["LOCALVAULT_URL"], exports["LOCALVAULT_CA_FILE"]
        port = urlsplit(url).port
        identity_port = urlsplit(exports["IDENTITY_ENDPOINT"]).port
        assert port and identity_port
        client = key_client(url, ca_file)
        client.create_ec_key(PROBE)
        from azure.identity import DefaultAzureCredential

        token = DefaultAzureCredential().get_token("https://vault.azure.net/.default").token

        def vault_tls() -> socket.socket:
            return tls_socket(port, ca_file)

        def identity() -> socket.socket:
            return plain_socket(identity_port)

        get = f"GET /keys/{PROBE}?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        head = b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        n = args.connections
        phases: List[Tuple[str, Callable[[threading.Event], None]]] = [
            ("at rest", lambda stop: stop.wait()),
            ("65 KB line, vault port", lambda stop: long_lines(vault_tls, stop)),
            ("65 KB line, identity port", lambda stop: long_lines(identity, stop)),
            (f"slowloris {n}, vault port", lambda stop: hold(vault_tls, head, n, stop)),
            (f"slowloris {n}, identity port", lambda stop: hold(identity, head, n, stop)),
            (f"buffered partial {n}", lambda stop: hold(vault_tls, get.encode() + head, n, stop)),
            ("slow readers 16", lambda stop: slow_readers(vault_tls, get.encode(), 16, stop)),
        ]
        monitor = Monitor(key_client(url, ca_file))
        monitor.thread.start()
        print(f"{'phase':32} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, hostile in phases:
            stop = threading.Event()
            attacker = threading.Thread(target=hostile, args=(stop,), daemon=True)
            monitor.phase = name
            attacker.start()
            time.sleep(args.seconds)
            monitor.phase = "between"
            stop.set()
            attacker.join(30)
            values = monitor.latencies.get(name, [])
            if values:
                print(
                    f"{name:32} {len(values):8d} {monitor.errors.get(name, 0):6d} "
                    f"{statistics.median(values) * 1e3:8.1f} {percentile(values, 99) * 1e3:8.1f} "
                    f"{max(values) * 1e3:8.1f}"
                )
            else:
                print(f"{name:32} no get_key finished")
        monitor.stop.set()
        monitor.thread.join(30)

        if not os.path.exists(f"/proc/{vault.pid}/stat"):
            print("server CPU: not measured (no /proc)")
            return 0
        vault_cpu = measure_cpu(vault.pid, client, args.cpu_requests)
        answer_file = os.path.join(answer_dir, "answer.json")
        with tls_socket(port, ca_file) as sock:  # the vault's own answer, served as is by the minimal server
            sock.sendall(get.encode())
            response = http.client.HTTPResponse(sock, method="GET")
            response.begin()
            with open(answer_file, "wb") as handle:
                handle.write(response.read())
        minimal = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--minimal-server", answer_file],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        assert minimal.stdout is not None
        started = json.loads(minimal.stdout.readline())
        minimal_client = key_client(f"https://127.0.0.1:{started['port']}", started["ca_file"])
        minimal_cpu = measure_cpu(minimal.pid, minimal_client, args.cpu_requests)
        ratio = f"{vault_cpu / minimal_cpu:.2f}x" if minimal_cpu else "not measurable (too few requests)"
        print(
            f"server CPU per get_key: localvault {vault_cpu * 1e3:.3f} ms, minimal TLS server "
            f"{minimal_cpu * 1e3:.3f} ms, ratio {ratio} ({args.cpu_requests} requests)"
        )
    finally:
        for process in (minimal, vault):
            if process is not None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(30)
        shutil.rmtree(answer_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
