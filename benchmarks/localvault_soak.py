"""A soak of localvault: concurrent SDK clients doing a mixed workload (create, get, list, update, sign,
rotate, delete, recover, purge) for a bounded time against a standalone ``python -m localvault``, run in
memory and with ``--data``, then checked against what each client knows it wrote.

    python benchmarks/localvault_soak.py [--clients 16] [--seconds 15] [--warmup-requests 12000]
        [--seed 1] [--no-data] [--data-parent DIR] [--no-timing-targets] [--memory-trace]

Each client is a separate process with its own KeyClient (no retries, so every failure counts) and owns
its own few key names; it keeps a model of them (versions created and rotated, tags set, deleted,
recovered or purged), checks every answer against it as it goes, and at the end reads every name back.
Versions per name are capped and purges recycle names, so the state stays bounded. The ``--data`` run
sets LOCALVAULT_DATA_KEY (a random passphrase), as a vault holding real key material should, and after
the soak restarts the vault on the same directory and reads every name back again.

It prints operations per second with p50/p99 latency (overall and per operation), errors, lost writes,
and the vault process's resident memory (VmRSS from /proc/PID/status) at start, after the warm-up and at
the end; then each target with PASS or FAIL: no errors; no lost writes; memory growth under 10% from the
end of the warm-up to the end; ``--data`` at most 2 times slower than in memory. ``--no-timing-targets``
reports the last two without judging them. Exit status: 0 when every judged target passes, 1 when one
fails, 2 for a usage error, 130 or 143 when stopped by Ctrl-C or SIGTERM (or 129 for SIGHUP). However it
ends, short of SIGKILL, it stops the vault and the client processes and removes the ``--data`` run's
directory first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from localvault_throughput import percentile  # noqa: E402

from localvault.cli import read_exports  # noqa: E402
from localvault.control import MAX_LOG  # noqa: E402

NAMES_PER_CLIENT = 4
MAX_VERSIONS = 6  # per name; then the name is deleted and purged before it grows again
WARMUP_REQUESTS = MAX_LOG + MAX_LOG // 5
MAX_WARMUP = 300.0  # seconds; the warm-up ends then even if fewer requests were answered
MEMORY_GROWTH_TARGET = 10.0  # percent, from the end of the warm-up to the end
PERSISTENCE_TARGET = 2.0  # in-memory ops/s over --data ops/s
OPERATIONS = ("create", "get", "list", "update", "sign", "rotate", "delete", "recover", "purge")
# Relative weights of the operations a name's state allows.
ACTIVE_WEIGHTS = {"get": 30, "sign": 15, "update": 12, "list": 8, "create": 6, "rotate": 6, "delete": 8}
DELETED_WEIGHTS = {"recover": 3, "purge": 1}
EXIT_OK, EXIT_FAILED = 0, 1
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class KeyModel:
    """What a client knows about one of its names: the vault must agree at every step."""

    name: str
    state: str = "absent"  # absent, active or deleted
    versions: List[str] = field(default_factory=list)  # oldest first; the last is the latest
    tags: Dict[str, str] = field(default_factory=dict)  # the latest version's


class SoakClient:
    """One client's KeyClient, its names and their models, and the operations on them."""

    def __init__(self, exports: Dict[str, str], index: int, seed: int, served: Any) -> None:
        self.client, self._crypto_client = clients(exports, served, index)
        self.models = [KeyModel(f"soak-{index:02d}-{j}") for j in range(NAMES_PER_CLIENT)]
        self.rng = random.Random(seed * 1000 + index)
        self.latest: Dict[str, Any] = {}  # name -> the latest KeyVaultKey, to sign with
        self.crypto: Dict[str, Any] = {}  # name -> a CryptographyClient for that key
        self.writes = 0
        self.mismatches: List[str] = []

    def warm(self) -> None:
        """Get a token and a TLS connection before the clock starts."""
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self.client.get_key(self.models[0].name)

    def choose(self) -> Tuple[KeyModel, str]:
        model = self.rng.choice(self.models)
        if model.state == "absent":
            return model, "create"
        weights = DELETED_WEIGHTS if model.state == "deleted" else dict(ACTIVE_WEIGHTS)
        if model.state == "active" and len(model.versions) >= MAX_VERSIONS:
            del weights["create"], weights["rotate"]
        operations = list(weights)
        return model, self.rng.choices(operations, [weights[o] for o in operations])[0]

    def expect(self, model: KeyModel, what: str, got: Any, wanted: Any) -> None:
        if got != wanted:
            self.mismatches.append(f"{model.name}: {what} is {got!r}, the client wrote {wanted!r}")

    def new_tags(self) -> Dict[str, str]:
        self.writes += 1
        return {"write": str(self.writes), "by": "soak"}

    def adopt(self, model: KeyModel, key: Any) -> None:
        model.state = "active"
        self.latest[model.name] = key
        self.crypto.pop(model.name, None)

    def do(self, model: KeyModel, operation: str) -> None:
        getattr(self, f"do_{operation}")(model)

    def do_create(self, model: KeyModel) -> None:
        tags = self.new_tags()
        key = self.client.create_ec_key(model.name, curve="P-256", tags=tags)
        model.versions.append(key.properties.version)
        model.tags = tags
        self.adopt(model, key)

    def do_get(self, model: KeyModel) -> None:
        key = self.client.get_key(model.name)
        self.expect(model, "the latest version", key.properties.version, model.versions[-1])
        self.expect(model, "the tags", key.properties.tags or {}, model.tags)

    def do_list(self, model: KeyModel) -> None:
        listed = sorted(p.version for p in self.client.list_properties_of_key_versions(model.name))
        self.expect(model, "the listed versions", listed, sorted(model.versions))

    def do_update(self, model: KeyModel) -> None:
        tags = self.new_tags()
        key = self.client.update_key_properties(model.name, tags=tags)
        self.expect(model, "the updated version", key.properties.version, model.versions[-1])
        self.expect(model, "the updated tags", key.properties.tags, tags)
        model.tags = tags

    def do_sign(self, model: KeyModel) -> None:
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        key = self.latest[model.name]
        crypto = self.crypto.get(model.name) or self.crypto.setdefault(model.name, self._crypto_client(key))
        digest = hashlib.sha256(self.rng.randbytes(16)).digest()
        result = crypto.sign(SignatureAlgorithm.es256, digest)
        self.expect(model, "the signing key", result.key_id, key.id)
        self.expect(model, "the signature's length", len(result.signature), 64)

    def do_rotate(self, model: KeyModel) -> None:
        key = self.client.rotate_key(model.name)
        model.versions.append(key.properties.version)
        self.expect(model, "the rotated version's tags", key.properties.tags or {}, model.tags)
        self.adopt(model, key)

    def do_delete(self, model: KeyModel) -> None:
        poller = self.client.begin_delete_key(model.name)
        poller.wait()
        self.expect(model, "the deleted version", poller.result().properties.version, model.versions[-1])
        model.state = "deleted"

    def do_recover(self, model: KeyModel) -> None:
        poller = self.client.begin_recover_deleted_key(model.name)
        poller.wait()
        key = poller.result()
        self.expect(model, "the recovered version", key.properties.version, model.versions[-1])
        self.adopt(model, key)

    def do_purge(self, model: KeyModel) -> None:
        self.client.purge_deleted_key(model.name)
        model.state, model.versions, model.tags = "absent", [], {}
        self.latest.pop(model.name, None)
        self.crypto.pop(model.name, None)

    def resync(self, model: KeyModel) -> None:
        """After a failed operation the model is unsure: take the vault's word for the name."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            key = self.client.get_key(model.name)
            model.versions = [p.version for p in self.client.list_properties_of_key_versions(model.name)]
            model.versions.remove(key.properties.version)
            model.versions.append(key.properties.version)
            model.tags = key.properties.tags or {}
            self.adopt(model, key)
        except ResourceNotFoundError:
            try:
                deleted = self.client.get_deleted_key(model.name)
                model.state, model.versions = "deleted", [deleted.properties.version]
            except ResourceNotFoundError:
                model.state, model.versions, model.tags = "absent", [], {}

    def run(self, start_at: float, measured_from: Any, seconds: float) -> Dict[str, Any]:
        """Soak from ``start_at`` until ``seconds`` after the warm-up ends, which is when the parent
        sets ``measured_from`` (a shared number, 0 until then)."""
        latencies: Dict[str, List[float]] = {operation: [] for operation in OPERATIONS}
        errors: List[str] = []
        deadline = None
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            now, began = time.time(), time.perf_counter()
            if deadline is None and measured_from.value:
                deadline = measured_from.value + seconds
            if deadline is not None and now >= deadline:
                break
            model, operation = self.choose()
            try:
                self.do(model, operation)
            except Exception as exc:  # every failure is counted; the soak goes on
                errors.append(f"{operation} {model.name}: {describe(exc)}")
                try:
                    self.resync(model)
                except Exception as again:
                    errors.append(f"reading {model.name} back: {describe(again)}")
                continue
            if deadline is not None and now >= measured_from.value:
                latencies[operation].append(time.perf_counter() - began)
        final = []
        for model in self.models:
            final += verify(self.client, model)
        return {
            "latencies": latencies,
            "errors": errors,
            "mismatches": self.mismatches + final,
            "models": [asdict(model) for model in self.models],
        }


def clients(exports: Dict[str, str], served: Any = None, index: int = 0) -> Tuple[Any, Callable[[Any], Any]]:
    """A KeyClient for the vault, and a maker of CryptographyClients, all on one connection pool, with
    the vault's managed identity (nothing else is tried) and no retries; each response from the vault
    adds one to ``served[index]`` (this client's count, in memory shared with the parent), if given."""
    os.environ.update(exports)
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient

    credential = ManagedIdentityCredential()
    options: Dict[str, Any] = {"verify_challenge_resource": False, "retry_total": 0}
    if served is not None:

        def count(_response: Any) -> None:
            served[index] += 1  # only this process writes its slot: no lock

        options["raw_response_hook"] = count
    session = requests.Session()

    def transport() -> Any:
        return RequestsTransport(
            session=session, session_owner=False, connection_verify=exports["LOCALVAULT_CA_FILE"]
        )

    client = KeyClient(exports["LOCALVAULT_URL"], credential, transport=transport(), **options)
    return client, lambda key: CryptographyClient(key, credential, transport=transport(), **options)


def verify(client: Any, model: KeyModel) -> List[str]:
    """Where the vault disagrees with ``model``, one line each."""
    from azure.core.exceptions import ResourceNotFoundError

    def found(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except ResourceNotFoundError:
            return None

    key = found(lambda: client.get_key(model.name))
    deleted = found(lambda: client.get_deleted_key(model.name))
    state = "active" if key else "deleted" if deleted else "absent"
    if state != model.state:
        return [f"{model.name}: the vault has it {state}, the client left it {model.state}"]
    problems = []
    if key:
        listed = sorted(p.version for p in client.list_properties_of_key_versions(model.name))
        if listed != sorted(model.versions):
            problems.append(f"{model.name}: versions {listed}, the client made {sorted(model.versions)}")
        if key.properties.version != model.versions[-1] or (key.properties.tags or {}) != model.tags:
            problems.append(
                f"{model.name}: latest {key.properties.version} with tags {key.properties.tags}, the client "
                f"wrote {model.versions[-1]} with {model.tags}"
            )
    if deleted and deleted.properties.version != model.versions[-1]:
        problems.append(
            f"{model.name}: deleted at version {deleted.properties.version}, not {model.versions[-1]}"
        )
    return problems


def describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text[0] if text else ''}"


def worker(index: int, link, served, measured_from) -> None:
    """A client process: for each run, build its client, say it is ready, soak from the time given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent stops it
    while True:
        task = link.recv()
        if task is None:
            return
        try:
            exports, seed, seconds = task
            soak = SoakClient(exports, index, seed, served)
            soak.warm()
            link.send(("ready", index, None))
            start_at = link.recv()
            if start_at is None:
                return
            link.send(("done", index, soak.run(start_at, measured_from, seconds)))
            soak.client.close()
        except Exception:  # the parent stops the soak and shows it
            link.send(("failed", index, traceback.format_exc()))


@dataclass
class Vault:
    """A standalone ``python -m localvault`` and what it printed."""

    process: subprocess.Popen
    exports: Dict[str, str]
    stderr: Any

    @classmethod
    def start(cls, data_dir: Optional[str], passphrase: str) -> Vault:
        env = dict(os.environ, PYTHONPATH=ROOT, LOCALVAULT_DATA_KEY=passphrase)
        command = [sys.executable, "-m", "localvault", "--port", "0"]
        if data_dir is not None:
            command += ["--data", data_dir]
        stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed by stop()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        assert process.stdout is not None
        try:
            exports = read_exports(process.stdout)
        except BaseException:
            cls(process, {}, stderr).stop()
            raise
        if "LOCALVAULT_URL" not in exports:
            process.wait(timeout=30)
            stderr.seek(0)
            raise SystemExit(f"localvault did not start: {stderr.read().strip()}")
        return cls(process, exports, stderr)

    def stop(self) -> List[str]:
        """Stop it; what went wrong in it: a non-zero exit, and every traceback it printed."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except BaseException:  # it does not stop, or this stop is interrupted: it must not outlive the soak
            self.process.kill()
            self.process.wait()
            raise
        self.stderr.seek(0)
        printed = self.stderr.read()
        self.stderr.close()
        problems = [f"server: {line.strip()}" for line in printed.splitlines() if "Traceback" in line]
        if code != 0:
            problems.append(f"server: exit status {code}")
        return problems


def memory_kib(pid: int, item: str = "VmRSS") -> Optional[int]:
    """``item`` of /proc/PID/status in KiB, or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(item + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU time of process ``pid`` so far, from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def filesystem(path: str) -> str:
    """The type of the filesystem ``path`` is on, from /proc/mounts, or "unknown"."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                point = parts[1]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, parts[2]
    except OSError:
        pass
    return kind


@dataclass
class Run:
    label: str
    seconds: float
    latencies: Dict[str, List[float]] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    lost: List[str] = field(default_factory=list)
    memory: Dict[str, Optional[int]] = field(default_factory=dict)
    trace: List[Tuple[float, Optional[int]]] = field(default_factory=list)  # (seconds from start, KiB)
    warmup_seconds: float = 0.0
    server_cpu: Optional[float] = None  # CPU seconds the vault used in the measured seconds

    @property
    def all_latencies(self) -> List[float]:
        return [value for values in self.latencies.values() for value in values]

    @property
    def ops_per_second(self) -> float:
        return len(self.all_latencies) / self.seconds

    @property
    def cpu_per_operation(self) -> Optional[float]:
        operations = len(self.all_latencies)
        return None if self.server_cpu is None or not operations else self.server_cpu / operations

    @property
    def memory_growth(self) -> Optional[float]:
        warm, end = self.memory.get("after warm-up"), self.memory.get("end")
        return None if warm is None or end is None else (end - warm) / warm * 100


def soak(label: str, data_dir: Optional[str], pool: Pool, args) -> Run:
    """One run: a new vault, every client soaking it, then everything read back."""
    passphrase = secrets.token_urlsafe(24)
    vault = Vault.start(data_dir, passphrase)
    run = Run(label, args.seconds)
    models: List[KeyModel] = []
    try:
        pool.served[:], pool.measured_from.value = [0] * len(pool.links), 0.0
        pool.send((vault.exports, args.seed, args.seconds))
        pool.collect("ready", 180)
        pid = vault.process.pid
        run.memory["start"] = memory_kib(pid)
        start_at = time.time() + 0.2
        pool.send(start_at)
        print(f"{label} run: {len(pool.links)} clients soaking the vault", flush=True)

        def sample(until: Callable[[], bool]) -> None:
            while not until():
                time.sleep(0.25)
                if not run.trace or time.time() - start_at - run.trace[-1][0] >= 1:
                    run.trace.append((time.time() - start_at, memory_kib(pid)))

        sample(lambda: sum(pool.served) >= args.warmup_requests or time.time() > start_at + MAX_WARMUP)
        pool.measured_from.value = time.time()
        run.warmup_seconds = pool.measured_from.value - start_at
        run.memory["after warm-up"] = memory_kib(pid)
        cpu_before = cpu_seconds(pid)
        sample(lambda: time.time() >= pool.measured_from.value + args.seconds)
        run.memory["end"] = memory_kib(pid)
        cpu_after = cpu_seconds(pid)
        if cpu_before is not None and cpu_after is not None:
            run.server_cpu = cpu_after - cpu_before
        run.memory["peak (VmHWM)"] = memory_kib(pid, "VmHWM")
        for result in pool.collect("done", args.seconds + MAX_WARMUP + 300):
            for operation, values in result["latencies"].items():
                run.latencies.setdefault(operation, []).extend(values)
            run.errors += result["errors"]
            run.lost += result["mismatches"]
            models += [KeyModel(**model) for model in result["models"]]
        run.lost += listed_everywhere(vault.exports, models)
    finally:
        run.errors += vault.stop()
    if data_dir is not None:
        again = Vault.start(data_dir, passphrase)
        try:
            client, _ = clients(again.exports)
            run.lost += [f"after a restart: {line}" for model in models for line in verify(client, model)]
            client.close()
        finally:
            run.errors += again.stop()
    return run


def listed_everywhere(exports: Dict[str, str], models: List[KeyModel]) -> List[str]:
    """Where the vault's lists of keys and of deleted keys disagree with all the clients' models."""
    client, _ = clients(exports)
    problems = []
    for state, listing in (("active", client.list_properties_of_keys), ("deleted", client.list_deleted_keys)):
        listed = sorted(item.name for item in listing() if item.name.startswith("soak-"))
        wanted = sorted(model.name for model in models if model.state == state)
        if listed != wanted:
            problems.append(f"{state} keys listed: {listed}; the clients have {wanted}")
    client.close()
    return problems


class Pool:
    """The client processes, started once and soaking one run after another.

    Pipes and raw shared memory only: a Queue's or a Value's lock is a named semaphore, which a soak stopped
    at the wrong moment could leave to multiprocessing's resource tracker ("leaked semaphore objects")."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        pairs = [context.Pipe() for _ in range(count)]
        self.links = [ours for ours, _ in pairs]
        self.served = context.RawArray("q", count)  # responses from the vault in this run, per client
        self.measured_from = context.RawValue("d", 0.0)  # when the warm-up ended; 0 until then
        self.processes = [
            context.Process(target=worker, args=(i, theirs, self.served, self.measured_from), daemon=True)
            for i, (_, theirs) in enumerate(pairs)
        ]
        for process in self.processes:
            process.start()
        for _, theirs in pairs:
            theirs.close()  # the client's end is the client's: a client that dies then reads as EOF here

    def send(self, message: Any) -> None:
        for link in self.links:
            link.send(message)

    def collect(self, kind: str, timeout: float) -> List[Any]:
        got: Dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.links):
            waiting = [link for i, link in enumerate(self.links) if i not in got]
            ready = multiprocessing.connection.wait(waiting, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise SystemExit(f"the clients did not say {kind} within {timeout:g} s")
            for link in ready:
                try:
                    got_kind, index, payload = link.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise SystemExit(f"a client ended while the soak waited for {kind}") from None
                if got_kind != kind:
                    raise SystemExit(f"client {index} {got_kind} while the soak waited for {kind}:\n{payload}")
                got[index] = payload
        return [got[i] for i in sorted(got)]

    def close(self, at_once: bool = False) -> None:
        """Stop the clients: once they have finished their run, or ``at_once``; then close the pipes."""
        if not at_once:
            with contextlib.suppress(OSError):  # a client that has died reads nothing more
                self.send(None)
            for process in self.processes:
                process.join(timeout=30)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join()
        for link in self.links:
            link.close()


def milliseconds(values: List[float], pct: float) -> str:
    return f"{percentile(values, pct) * 1000:>8.1f}" if values else f"{'-':>8}"


def report(runs: List[Run], args) -> bool:
    """Print the figures and the targets; whether every judged target passed."""
    warmups = ", ".join(f"{run.label} {run.warmup_seconds:.1f} s" for run in runs)
    print(
        f"\nper operation, {args.seconds:g} s measured after a warm-up of {args.warmup_requests} requests ({warmups}):"
    )
    print((f"{'':<10}" + "".join(f" | {run.label:<33}" for run in runs)).rstrip())
    print(f"{'operation':<10}" + f" | {'count':>6} {'ops/s':>7} {'p50 ms':>8} {'p99 ms':>8}" * len(runs))
    for operation in (*OPERATIONS, "all"):
        row = f"{operation:<10}"
        for run in runs:
            values = run.all_latencies if operation == "all" else run.latencies.get(operation, [])
            row += f" | {len(values):>6} {len(values) / run.seconds:>7.1f} "
            row += f"{milliseconds(values, 50)} {milliseconds(values, 99)}"
        print(row)

    print("\nthe vault's CPU in the measured seconds (/proc/PID/stat; the clients run on the same cores):")
    for run in runs:
        if run.cpu_per_operation is None:
            print(f"  {run.label}: unavailable (no /proc/PID/stat here, or no operations)")
        else:
            print(
                f"  {run.label}: {run.server_cpu / run.seconds * 100:.0f}% of one core, "
                f"{run.cpu_per_operation * 1000:.2f} ms per operation"
            )
    if len(runs) == 2 and None not in (runs[0].cpu_per_operation, runs[1].cpu_per_operation):
        print(
            f"  --data costs the vault {runs[1].cpu_per_operation / runs[0].cpu_per_operation:.2f}x the CPU per operation"
        )

    print("\nserver memory, VmRSS of the vault process from /proc/PID/status (MiB):")
    for run in runs:
        if run.memory.get("start") is None:
            print(f"  {run.label}: unavailable (no /proc/PID/status on this system)")
            continue
        figures = ", ".join(f"{moment} {kib / 1024:.1f}" for moment, kib in run.memory.items() if kib)
        print(f"  {run.label}: {figures}; growth after warm-up {run.memory_growth:+.1f}%")
        if args.memory_trace:
            print("    " + ", ".join(f"{at:.0f}s {kib / 1024:.1f}" for at, kib in run.trace if kib))

    for run in runs:
        for kind, lines in (("errors", run.errors), ("lost writes", run.lost)):
            if lines:
                print(f"\n{run.label}: {len(lines)} {kind}; the first ones:")
                for line in lines[:5]:
                    print(f"  {line}")

    rows: List[Tuple[str, List[str], Optional[bool]]] = [
        ("errors: none", [str(len(run.errors)) for run in runs], not any(run.errors for run in runs)),
        ("lost writes: none", [str(len(run.lost)) for run in runs], not any(run.lost for run in runs)),
    ]
    growths = [run.memory_growth for run in runs]
    memory_ok = (
        None if args.no_timing_targets or None in growths else all(g < MEMORY_GROWTH_TARGET for g in growths)
    )
    rows.append(
        (
            f"memory growth after warm-up < {MEMORY_GROWTH_TARGET:g}%",
            ["n/a" if g is None else f"{g:+.1f}%" for g in growths],
            memory_ok,
        )
    )
    if len(runs) == 2:
        ratio = runs[0].ops_per_second / runs[1].ops_per_second if runs[1].ops_per_second else float("inf")
        rows.append(
            (
                f"in-memory ops/s / --data ops/s <= {PERSISTENCE_TARGET:g}",
                ["", f"{ratio:.2f}x"],
                None if args.no_timing_targets else ratio <= PERSISTENCE_TARGET,
            )
        )
    print(f"\n{'target':<42}" + "".join(f" {run.label:>10}" for run in runs) + "  result")
    for name, values, passed in rows:
        verdict = "not judged" if passed is None else "PASS" if passed else "FAIL"
        print(f"{name:<42}" + "".join(f" {value:>10}" for value in values) + f"  {verdict}")
    return all(passed is not False for _, _, passed in rows)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent client processes (default 16)")
    parser.add_argument(
        "--seconds", type=positive, default=15.0, help="measured seconds per run (default 15)"
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=WARMUP_REQUESTS,
        help="requests the vault answers, in the same workload, before the measured seconds begin; "
        f"memory growth is counted from then (default {WARMUP_REQUESTS}: more than the {MAX_LOG} requests "
        "the vault keeps in its request log, so that the log is full by then)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' choices (default 1)")
    parser.add_argument("--no-data", action="store_true", help="run in memory only: no --data run, no ratio")
    parser.add_argument(
        "--data-parent",
        metavar="DIR",
        help="where the --data run's directory is made (default: the temp dir)",
    )
    parser.add_argument(
        "--no-timing-targets",
        action="store_true",
        help="report memory growth and the persistence ratio without judging them (for a quick check)",
    )
    parser.add_argument(
        "--memory-trace", action="store_true", help="print the vault's VmRSS about every second of each run"
    )
    args = parser.parse_args(argv)
    if args.warmup_requests < 0:
        parser.error(f"--warmup-requests must be 0 or more, not {args.warmup_requests}")
    if not 1 <= args.clients <= 64:
        parser.error(f"--clients must be 1 to 64, not {args.clients}")
    runs_wanted: List[Tuple[str, bool]] = [("in memory", False)]
    if not args.no_data:
        runs_wanted.append(("--data", True))

    print(
        f"localvault soak: {args.clients} client processes; per run a warm-up of {args.warmup_requests} "
        f"requests, then {args.seconds:g} s measured, seed {args.seed}; {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every cleanup below

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        return soak_all(runs_wanted, args)
    except KeyboardInterrupt:
        print("localvault_soak.py: stopped (Ctrl-C); the vault and the clients are stopped", file=sys.stderr)
        return 130
    except SystemExit as stopped:
        if isinstance(stopped.code, int) and stopped.code > 128:
            print(
                f"localvault_soak.py: stopped (signal {stopped.code - 128}); the vault and the clients are "
                "stopped",
                file=sys.stderr,
            )
        raise


def soak_all(runs_wanted: List[Tuple[str, bool]], args) -> int:
    pool = Pool(args.clients)
    runs = []
    finished = False
    try:
        for label, with_data in runs_wanted:
            data_dir = (
                tempfile.mkdtemp(prefix="localvault-soak-", dir=args.data_parent) if with_data else None
            )
            try:
                if data_dir:
                    print(
                        f"--data run: {data_dir} on {filesystem(os.path.realpath(data_dir))}, "
                        "LOCALVAULT_DATA_KEY set (encrypted at rest), fsync on every acknowledged write"
                    )
                runs.append(soak(label, data_dir, pool, args))
            finally:
                if data_dir:
                    shutil.rmtree(data_dir, ignore_errors=True)
        finished = True
    finally:
        pool.close(at_once=not finished)
    return EXIT_OK if report(runs, args) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
