"""``--data DIR`` and ``LocalVault(data_dir=...)``: state across restarts and SIGKILL, encryption at rest,
file modes, and clear refusals for directories that cannot be used."""

from __future__ import annotations

import base64
import itertools
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.keys import (
    JsonWebKey,
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from localvault import LocalVault
from localvault.cli import read_exports
from localvault.persist import DATA_KEY_VARIABLE, DataDirError, UnencryptedDataWarning
from localvault.vault import LocalVaultCredential

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSPHRASE = "correct horse battery staple"


class FixedToken:
    """A credential that only ever presents one token, fetched earlier."""

    def __init__(self, token: AccessToken) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self.token


def _env(data_key: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEY_VAULT_URL", "LOCALVAULT_CA_FILE")}
    env = {k: v for k, v in env.items() if not k.startswith(("IDENTITY_", "AZURE_", "MSI_"))}
    env.pop(DATA_KEY_VARIABLE, None)
    if data_key is not None:
        env[DATA_KEY_VARIABLE] = data_key
    env["PYTHONPATH"] = ROOT
    return env


def _run_cli(data_dir: str, data_key: Optional[str]) -> subprocess.CompletedProcess:
    """``python -m localvault --data`` expected to refuse DIR at once."""
    return subprocess.run(
        [sys.executable, "-m", "localvault", "--port", "0", "--data", data_dir],
        capture_output=True,
        text=True,
        env=_env(data_key),
        cwd=ROOT,
        timeout=60,
    )


def _refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localvault: error: "), result.stderr
    return lines[0]


class Server:
    """``python -m localvault --data DIR --port 0`` in a subprocess, and an SDK client for it."""

    def __init__(self, data_dir: str, data_key: Optional[str] = PASSPHRASE) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localvault", "--port", "0", "--data", data_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(data_key),
            cwd=ROOT,
        )
        self.exports = read_exports(self.process.stdout)
        assert self.exports, self.process.stderr.read() if self.process.poll() is not None else ""

    def client(self) -> KeyClient:
        credential = LocalVaultCredential(self.exports["IDENTITY_ENDPOINT"], self.exports["IDENTITY_HEADER"])
        return KeyClient(
            self.exports["LOCALVAULT_URL"],
            credential,
            verify_challenge_resource=False,
            connection_verify=self.exports["LOCALVAULT_CA_FILE"],
            retry_total=0,  # a killed server's in-flight request fails at once
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.communicate(timeout=60)

    def stop(self) -> Tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


def _files(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            yield os.path.join(root, name)


def _contents(directory: str) -> bytes:
    return b"\n".join(Path(p).read_bytes() for p in _files(directory) if os.path.isfile(p))


# -- a restart round trip through the SDK --------------------------------------------------------


def test_restart_keeps_keys_versions_deleted_keys_policies_clock_backups_tokens_and_ca(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        client = vault.key_client()
        first = client.create_rsa_key("kept", size=2048)
        second = client.create_rsa_key("kept", size=2048)
        client.update_key_properties("kept", first.properties.version, tags={"first": "yes"})
        client.update_key_rotation_policy(
            "kept",
            KeyRotationPolicy(),
            lifetime_actions=[
                KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P90D")
            ],
            expires_in="P1Y",
        )
        client.create_ec_key("gone")
        client.begin_delete_key("gone").wait()
        client.create_ec_key("backed-up")
        blob = client.backup_key("backed-up")
        client.begin_delete_key("backed-up").wait()
        client.purge_deleted_key("backed-up")
        vault.clock.advance(days=3)
        token = vault.credential().get_token("https://vault.azure.net/.default")
        environ = vault.environ()
        ca_pem = Path(vault.ca_file).read_bytes()
        policy = client.get_key_rotation_policy("kept")

    assert os.path.exists(environ["LOCALVAULT_CA_FILE"])  # stopping keeps the CA file
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        assert vault.environ()["IDENTITY_HEADER"] == environ["IDENTITY_HEADER"]
        assert vault.ca_file == environ["LOCALVAULT_CA_FILE"]
        assert Path(vault.ca_file).read_bytes() == ca_pem
        assert vault.clock.offset == 3 * 86400
        client = vault.key_client(credential=FixedToken(token))  # the token fetched before the restart
        kept = client.get_key("kept")
        assert kept.properties.version == second.properties.version and kept.key.n == second.key.n
        assert client.get_key("kept", first.properties.version).properties.tags == {"first": "yes"}
        versions = {v.version for v in client.list_properties_of_key_versions("kept")}
        assert versions == {first.properties.version, second.properties.version}
        after = client.get_key_rotation_policy("kept")
        assert (after.expires_in, after.created_on) == (policy.expires_in, policy.created_on)
        assert [(a.action, a.time_after_create) for a in after.lifetime_actions if a.time_after_create] == [
            (KeyRotationPolicyAction.rotate, "P90D")
        ]
        assert client.get_deleted_key("gone").name == "gone"
        with pytest.raises(ResourceNotFoundError):
            client.get_key("gone")
        restored = client.restore_key_backup(blob)
        assert restored.name == "backed-up"


def test_rotation_and_purge_made_by_the_clock_survive_a_restart(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE, retention_days=7) as vault:
        client = vault.key_client()
        client.create_ec_key("rotating")
        client.update_key_rotation_policy(
            "rotating",
            KeyRotationPolicy(),
            lifetime_actions=[
                KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D")
            ],
        )
        client.create_ec_key("purged")
        client.begin_delete_key("purged").wait()
        vault.clock.advance(days=31)
        rotated = client.get_key("rotating")  # the clock's catch-up makes the version and purges the key
        versions = {v.version for v in client.list_properties_of_key_versions("rotating")}
        assert len(versions) == 2
        assert os.listdir(os.path.join(data_dir, "keys")) == ["rotating.json"]
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE, retention_days=7) as vault:
        client = vault.key_client()
        assert client.get_key("rotating").properties.version == rotated.properties.version
        assert {v.version for v in client.list_properties_of_key_versions("rotating")} == versions
        assert [k.name for k in client.list_deleted_keys()] == []


def test_a_deletion_or_recovery_still_pending_is_complete_after_a_restart(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE, delete_delay=3600) as vault:
        client = vault.key_client()
        client.create_ec_key("deleting")
        client.create_ec_key("recovering")
        vault.set_delete_delay(0)
        client.begin_delete_key("recovering").wait()
        vault.set_delete_delay(3600)
        client.begin_delete_key("deleting")  # acknowledged; visible as deleted only in an hour
        client.begin_recover_deleted_key("recovering")  # likewise
        with pytest.raises(ResourceNotFoundError):
            client.get_deleted_key("deleting")
        with pytest.raises(ResourceNotFoundError):
            client.get_key("recovering")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        client = vault.key_client()
        assert client.get_deleted_key("deleting").name == "deleting"
        assert client.get_key("recovering").name == "recovering"
        assert [k.name for k in client.list_properties_of_keys()] == ["recovering"]


def test_stop_releases_the_directory_and_start_reads_it_again(tmp_path):
    data_dir = str(tmp_path / "vault")
    vault = LocalVault(data_dir=data_dir, data_key=PASSPHRASE).start()
    vault.key_client().create_ec_key("first")
    vault.stop()
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as other:  # the directory is free
        other.key_client().create_ec_key("second")
    vault.start()
    try:
        assert sorted(p.name for p in vault.key_client().list_properties_of_keys()) == ["first", "second"]
    finally:
        vault.stop()


def test_a_vault_never_started_holds_no_lock(tmp_path):
    data_dir = str(tmp_path / "vault")
    idle = LocalVault(data_dir=data_dir, data_key=PASSPHRASE)  # made, and read, but never started
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        vault.key_client().create_ec_key("made")
        with pytest.raises(DataDirError, match="in use by another localvault"):
            idle.start()  # the lock is taken by start()
    with idle:  # and start() reads DIR as it is now
        assert [p.name for p in idle.key_client().list_properties_of_keys()] == ["made"]


# -- SIGKILL during writes -------------------------------------------------------------------------

ROUNDS = 12


def _next_write(model: Dict[str, str], rng: random.Random, n: int) -> Tuple[str, str, Any]:
    """A write on the model's keys (each "live:<tag n>" or "deleted"): its key, the key's state after
    it, and the SDK call making it."""
    live = sorted(name for name, state in model.items() if state.startswith("live"))
    choice = rng.random()
    if live and choice < 0.45:
        name, tag = rng.choice(live), str(n)
        return name, f"live:{tag}", lambda client: client.update_key_properties(name, tags={"n": tag})
    if live and choice < 0.6:
        name = rng.choice(live)
        return name, "deleted", lambda client: client.begin_delete_key(name)
    name = f"k{n}"
    return name, "live:", lambda client: client.create_ec_key(name)


def _observed(client: KeyClient) -> Dict[str, str]:
    state = {p.name: f"live:{(p.tags or {}).get('n', '')}" for p in client.list_properties_of_keys()}
    state.update({d.name: "deleted" for d in client.list_deleted_keys()})
    return state


def _write_until_killed(
    server: Server, client: KeyClient, model: Dict[str, str], rng: random.Random, numbers: Iterator[int]
) -> Optional[Tuple[str, str]]:
    """Write from a thread, SIGKILL the server after a varied number of acknowledged writes, and return
    the write that was in flight then (its key and the state it was making), if any."""
    acknowledged = threading.Semaphore(0)
    in_flight: List[Optional[Tuple[str, str]]] = [None]

    def writer() -> None:
        for n in numbers:
            name, after, call = _next_write(model, rng, n)
            in_flight[0] = (name, after)
            try:
                call(client)
            except AzureError:  # the server is gone
                return
            model[name] = after
            in_flight[0] = None
            acknowledged.release()

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(rng.randint(1, 12)):
        assert acknowledged.acquire(timeout=30), "the writer stopped while the server was up"
    time.sleep(rng.uniform(0, 0.03))  # not to wait for anything: lands the kill at a varied point of a write
    server.kill()
    thread.join(timeout=60)
    return in_flight[0]


def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path):
    data_dir = str(tmp_path / "vault")
    rng = random.Random(8)
    numbers = itertools.count()
    model: Dict[str, str] = {}
    in_flight: Optional[Tuple[str, str]] = None
    for round_number in range(ROUNDS + 1):
        server = Server(data_dir)
        client = server.client()
        observed = _observed(client)
        if in_flight is not None:  # the one write that may or may not have happened
            name, after = in_flight
            assert observed.get(name) in (model.get(name), after), (round_number, name, observed.get(name))
            if name in observed:
                model[name] = observed[name]
        assert observed == model, (
            f"after SIGKILL {round_number}, the vault differs from its acknowledged writes"
        )
        if round_number == ROUNDS:
            break
        in_flight = _write_until_killed(server, client, model, rng, numbers)
        client.close()
    code, err = server.stop()
    assert code == 0, err
    assert not [path for path in _files(data_dir) if ".tmp-" in path]


# -- directories that cannot be used ---------------------------------------------------------------


def _made(data_dir: str, data_key: Optional[str] = PASSPHRASE, key: str = "one") -> None:
    with LocalVault(data_dir=data_dir, data_key=data_key) as vault:
        vault.key_client().create_ec_key(key)


@pytest.mark.parametrize("name", ["keys/one.json", "secrets.json", "localvault.json", "clock.json", "ca.pem"])
def test_a_corrupt_file_is_named_and_left_as_it_is(tmp_path, name):
    data_dir = str(tmp_path / "vault")
    _made(data_dir)
    path = os.path.join(data_dir, name)
    damaged = Path(path).read_bytes()[:-20] + b"\x00" * 7
    Path(path).write_bytes(damaged)
    with pytest.raises(DataDirError, match="is corrupt") as raised:
        LocalVault(data_dir=data_dir, data_key=PASSPHRASE)
    assert path in str(raised.value)
    line = _refused(_run_cli(data_dir, PASSPHRASE))
    assert str(raised.value) in line
    assert Path(path).read_bytes() == damaged


def test_a_missing_file_is_named(tmp_path):
    data_dir = str(tmp_path / "vault")
    _made(data_dir)
    os.unlink(os.path.join(data_dir, "secrets.json"))
    line = _refused(_run_cli(data_dir, PASSPHRASE))
    assert os.path.join(data_dir, "secrets.json") in line and "missing" in line


def test_an_encrypted_directory_needs_its_passphrase(tmp_path):
    data_dir = str(tmp_path / "vault")
    _made(data_dir)
    missing = _refused(_run_cli(data_dir, None))
    assert "is encrypted" in missing and DATA_KEY_VARIABLE in missing
    wrong = _refused(_run_cli(data_dir, "not the passphrase"))
    assert "not the passphrase" in wrong and DATA_KEY_VARIABLE in wrong
    with pytest.raises(DataDirError, match="not the passphrase"):
        LocalVault(data_dir=data_dir, data_key="not the passphrase")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:  # nothing was harmed
        assert vault.key_client().get_key("one").name == "one"


def test_without_a_passphrase_a_new_directory_is_plain_with_a_warning(tmp_path):
    data_dir = str(tmp_path / "vault")
    server = Server(data_dir, data_key=None)
    server.client().create_ec_key("plain")
    code, err = server.stop()
    assert code == 0
    assert f"localvault: warning: {data_dir} is new and not encrypted" in err
    assert DATA_KEY_VARIABLE in err
    with pytest.warns(UnencryptedDataWarning):
        LocalVault(data_dir=str(tmp_path / "other"), data_key="").stop()
    # a passphrase cannot be added later: that would make the user think the keys are encrypted
    line = _refused(_run_cli(data_dir, PASSPHRASE))
    assert "not encrypted" in line
    server = Server(data_dir, data_key=None)
    assert server.client().get_key("plain").name == "plain"
    code, err = server.stop()
    assert code == 0 and "warning" not in err  # only a new directory warns


def test_a_directory_in_use_or_not_a_vaults_is_refused_untouched(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE):
        assert "in use by another localvault" in _refused(_run_cli(data_dir, PASSPHRASE))
    other = tmp_path / "documents"
    other.mkdir(mode=0o755)
    (other / "notes.txt").write_text("mine")
    assert "not empty" in _refused(_run_cli(str(other), PASSPHRASE))
    assert sorted(os.listdir(other)) == ["notes.txt"]
    assert stat.S_IMODE(os.stat(other).st_mode) == 0o755


# -- at rest: modes and encryption ------------------------------------------------------------------


def test_the_directory_is_owner_only(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        client = vault.key_client()
        client.create_ec_key("a")
        client.create_ec_key("b")
        client.begin_delete_key("b").wait()
        vault.clock.advance(days=1)
    paths = list(_files(data_dir))
    assert {os.path.relpath(p, data_dir) for p in paths} >= {
        "keys/a.json",
        "keys/b.json",
        "clock.json",
        "ca.pem",
    }
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    for path in paths:
        expected = 0o700 if os.path.isdir(path) else 0o600
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    LocalVault(data_dir=str(empty), data_key=PASSPHRASE).stop()
    assert stat.S_IMODE(os.stat(empty).st_mode) == 0o700


def _encodings(secret: bytes) -> List[bytes]:
    """The forms a private value could be stored in."""
    b64 = base64.b64encode(secret)
    b64url = base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), b64, b64.rstrip(b"="), b64url, b64url.rstrip(b"=")]


def _rsa_secrets(key: rsa.RSAPrivateKey) -> List[bytes]:
    numbers = key.private_numbers()
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = b"".join(pem.splitlines()[1:-1])
    found: List[bytes] = [pem.splitlines()[1], body]
    for value in (numbers.d, numbers.p, numbers.q):
        found += _encodings(value.to_bytes((value.bit_length() + 7) // 8, "big"))
    return found + _encodings(der)


def _import_rsa(vault: LocalVault) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = key.private_numbers()
    fields = {"n": n.public_numbers.n, "e": n.public_numbers.e, "d": n.d, "p": n.p, "q": n.q}
    fields.update({"dp": n.dmp1, "dq": n.dmq1, "qi": n.iqmp})
    jwk = {name: value.to_bytes((value.bit_length() + 7) // 8, "big") for name, value in fields.items()}
    vault.key_client().import_key("known", JsonWebKey(kty="RSA", **jwk))
    return key


def test_key_material_and_secrets_are_not_in_plain_form(tmp_path):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        key = _import_rsa(vault)
        vault.key_client().update_key_properties("known", tags={"rewritten": "yes"})
        identity_secret = vault.environ()["IDENTITY_HEADER"].encode()
    stored = _contents(data_dir)
    leaks = [s for s in _rsa_secrets(key) + _encodings(identity_secret) if s in stored]
    assert not leaks
    assert b"PRIVATE KEY" not in stored and b"known" not in stored and PASSPHRASE.encode() not in stored

    # the search does find them where they are kept unencrypted
    plain = str(tmp_path / "plain")
    with pytest.warns(UnencryptedDataWarning), LocalVault(data_dir=plain, data_key="") as vault:
        key = _import_rsa(vault)
    assert [s for s in _rsa_secrets(key) if s in _contents(plain)]


def test_oct_key_material_is_not_in_plain_form(tmp_path):
    data_dir = str(tmp_path / "hsm")
    secret = os.urandom(32)
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE, managed_hsm=True) as vault:
        vault.key_client().import_key("octet", JsonWebKey(kty="oct-HSM", k=secret))
    stored = _contents(data_dir)
    assert not [s for s in _encodings(secret) if s in stored]
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE, managed_hsm=True) as vault:
        assert vault.key_client().get_key("octet").key.kty == "oct-HSM"


# -- a write that fails half-way ------------------------------------------------------------------

HALF_WRITTEN = """
import os, resource, signal, sys
from localvault import LocalVault

data_dir, name = sys.argv[1:]
with LocalVault(data_dir=data_dir) as vault, vault.key_client(retry_total=0) as client:
    size = os.path.getsize(os.path.join(data_dir, "keys", name + ".json"))
    # No file of this process may grow past the key file's size now: the new record, longer, fails
    # part-way through its write, after any truncation of the file it is written to.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    try:
        client.update_key_properties(name, tags={"longer": "x" * 200})
    except Exception as error:
        print("refused:", type(error).__name__, flush=True)
    os._exit(0)  # as a vault that dies here: nothing more is written
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX only")
def test_a_key_file_write_that_fails_part_way_leaves_the_old_file(tmp_path):
    data_dir, name = str(tmp_path / "vault"), "half-written"
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault, vault.key_client() as client:
        key = client.create_ec_key(name, tags={"old": "1"})
    path = Path(data_dir, "keys", name + ".json")
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", HALF_WRITTEN, data_dir, name],
        env=_env(PASSPHRASE),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("refused: HttpResponseError"), result.stdout + result.stderr
    assert path.read_bytes() == before
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault, vault.key_client() as client:
        again = client.get_key(name)
        assert (again.properties.version, again.properties.tags) == (key.properties.version, {"old": "1"})
    assert not [file for file in _files(data_dir) if ".tmp-" in file]
