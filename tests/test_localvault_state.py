"""State on disk that localvault refuses at start, with one line naming the file and the member: every
field of every file checked, the KDF's parameters bounded before it runs, no symbolic links in DIR."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional
from unittest import mock

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import (
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from helpers import RawVault, error_of

from localvault import LocalVault
from localvault.http11 import MAX_BODY
from localvault.models import MAX_RESTORE_BODY
from localvault.persist import DATA_KEY_VARIABLE, DataDirError, UnencryptedDataWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSPHRASE = "correct horse battery staple"


def _env(data_key: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEY_VAULT_URL", "LOCALVAULT_CA_FILE")}
    env = {k: v for k, v in env.items() if not k.startswith(("IDENTITY_", "AZURE_", "MSI_"))}
    env.pop(DATA_KEY_VARIABLE, None)
    if data_key is not None:
        env[DATA_KEY_VARIABLE] = data_key
    env["PYTHONPATH"] = ROOT
    return env


def _refused_by_cli(data_dir: str, data_key: Optional[str]) -> str:
    """``python -m localvault --data DIR``: exit 2, nothing on stdout, one line on stderr; that line."""
    result = subprocess.run(
        [sys.executable, "-m", "localvault", "--port", "0", "--data", data_dir],
        capture_output=True,
        text=True,
        env=_env(data_key),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localvault: error: "), result.stderr
    return lines[0]


def _refused(data_dir: str, data_key: Optional[str]) -> str:
    with pytest.raises(DataDirError) as raised:
        LocalVault(data_dir=data_dir, data_key=data_key)
    return str(raised.value)


def _make(data_dir: str, data_key: str) -> None:
    """A DIR with a live RSA key (tags, a rotation policy, two versions), an EC key and a deleted one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnencryptedDataWarning)
        vault = LocalVault(data_dir=data_dir, data_key=data_key)
    with vault:
        client = vault.key_client()
        client.create_rsa_key("live", size=2048, tags={"team": "a"})
        client.rotate_key("live")
        policy = KeyRotationPolicy(
            lifetime_actions=[
                KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P90D")
            ]
        )
        client.update_key_rotation_policy("live", policy)
        client.create_ec_key("curve")
        client.create_ec_key("gone")
        client.begin_delete_key("gone").wait()
        vault.clock.advance(days=1)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    made = {}
    for kind, key in (("plain", ""), ("encrypted", PASSPHRASE)):
        made[kind] = str(tmp_path_factory.mktemp("template") / kind)
        _make(made[kind], key)
    return made


def _copy(templates: Dict[str, str], kind: str, tmp_path: Path) -> str:
    data_dir = str(tmp_path / "vault")
    shutil.copytree(templates[kind], data_dir)
    os.unlink(os.path.join(data_dir, "lock"))
    return data_dir


def _edit(path: str, change: Callable[[Dict[str, Any]], None]) -> None:
    data = json.loads(Path(path).read_text())
    change(data)
    Path(path).write_text(json.dumps(data))


def _version(data: Dict[str, Any]) -> Dict[str, Any]:
    return data["versions"][0]


# -- key files ------------------------------------------------------------------------------------

KEY_FILE_DAMAGE = {
    "policy.updated": lambda d: d["policy"].update(updated="x"),
    "policy.created": lambda d: d["policy"].update(created=-1),
    "policy.expiry_time": lambda d: d["policy"].update(expiry_time="soon"),
    "policy.lifetime_actions[0].action": lambda d: d["policy"]["lifetime_actions"][0].update(
        action="Explode"
    ),
    "policy.lifetime_actions[0].trigger": lambda d: d["policy"]["lifetime_actions"][0].update(trigger=5),
    "policy.lifetime_actions[0].duration": lambda d: d["policy"]["lifetime_actions"][0].update(
        duration="P1X"
    ),
    "policy.lifetime_actions": lambda d: d["policy"].update(lifetime_actions={"a": 1}),
    "versions[0].kty": lambda d: _version(d).update(kty="bogus"),
    "versions[0].tags": lambda d: _version(d).update(tags=["a"]),
    "versions[0].key_ops": lambda d: _version(d).update(key_ops=5),
    "versions[0].version": lambda d: _version(d).update(version=7),
    "versions[0].enabled": lambda d: _version(d).update(enabled="yes"),
    "versions[0].created": lambda d: _version(d).update(created=1e300),
    "versions[0].updated": lambda d: _version(d).update(updated=True),
    "versions[0].nbf": lambda d: _version(d).update(nbf="tomorrow"),
    "versions[0].exp": lambda d: _version(d).update(exp=[1]),
    "versions[0].pkcs8": lambda d: _version(d).update(pkcs8="AAAA"),
    "versions[0].colour": lambda d: _version(d).update(colour="red"),
    "versions": lambda d: d.update(versions=[]),
    "versions[0]": lambda d: d.update(versions=[5]),
    "latest": lambda d: d.update(latest="0" * 32),
    "versions[1].kty": lambda d: d["versions"][1].update(kty=["RSA"]),  # unhashable, as JSON can write
    "policy": lambda d: d.update(policy=[]),
    "name": lambda d: d.update(name="other"),
}


@pytest.mark.parametrize("field", sorted(KEY_FILE_DAMAGE))
def test_a_key_file_with_any_bad_member_is_refused_naming_the_member(templates, tmp_path, field):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "keys", "live.json")
    _edit(path, KEY_FILE_DAMAGE[field])
    damaged = Path(path).read_bytes()
    message = _refused(data_dir, "")
    assert path in message and f"({field} " in message, message
    assert Path(path).read_bytes() == damaged  # left as it was


def test_an_rsa_key_whose_numbers_do_not_hold_together_is_refused(templates, tmp_path):
    from cryptography.hazmat.primitives import serialization

    from localvault.jwk import b64url_decode, b64url_encode

    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "keys", "live.json")

    def swap_d(data: Dict[str, Any]) -> None:
        key = serialization.load_der_private_key(b64url_decode(_version(data)["pkcs8"]), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        n = key.private_numbers()
        broken = rsa.RSAPrivateNumbers(n.p, n.q, n.d + 2, n.dmp1, n.dmq1, n.iqmp, n.public_numbers)
        der = broken.private_key(unsafe_skip_rsa_key_validation=True).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _version(data)["pkcs8"] = b64url_encode(der)

    _edit(path, swap_d)
    assert "(versions[0].pkcs8 " in _refused(data_dir, "")


def test_a_deleted_keys_dates_are_checked(templates, tmp_path):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "keys", "gone.json")
    _edit(path, lambda d: d["deleted"].update(purge="later"))
    assert "(deleted.purge " in _refused(data_dir, "")


def test_the_command_gives_one_line_naming_the_file_and_member(templates, tmp_path):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "keys", "live.json")
    _edit(path, KEY_FILE_DAMAGE["policy.updated"])
    line = _refused_by_cli(data_dir, None)
    assert path in line and "policy.updated" in line


# -- clock.json -----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", ["NaN", "Infinity", "-Infinity", "-5", '"x"', "1e300", "true", "null"])
@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_a_clock_offset_that_is_not_a_usable_number_is_refused(templates, tmp_path, kind, offset):
    data_dir = _copy(templates, kind, tmp_path)
    path = os.path.join(data_dir, "clock.json")
    Path(path).write_text(f'{{"offset": {offset}}}')
    message = _refused(data_dir, PASSPHRASE if kind == "encrypted" else "")
    assert path in message and "(offset " in message, message


def test_a_bad_clock_offset_is_one_line_from_the_command(templates, tmp_path):
    data_dir = _copy(templates, "encrypted", tmp_path)
    Path(data_dir, "clock.json").write_text('{"offset": NaN}')
    line = _refused_by_cli(data_dir, PASSPHRASE)
    assert os.path.join(data_dir, "clock.json") in line and "offset" in line


# -- localvault.json and secrets.json ----------------------------------------------------------------

META_DAMAGE = {
    "kdf.salt": lambda d: d["kdf"].update(salt=5),
    "check": lambda d: d.update(check=5),
    "kdf.n": lambda d: d["kdf"].update(n=2**40),
    "kdf.r": lambda d: d["kdf"].update(r=2**31),
    "kdf.p": lambda d: d["kdf"].update(p=0),
    "kdf.name": lambda d: d["kdf"].update(name="argon2"),
    "kdf": lambda d: d.update(kdf=[]),
    "encrypted": lambda d: d.update(encrypted="yes"),
}


@pytest.mark.parametrize("field", sorted(META_DAMAGE))
def test_a_bad_kdf_parameter_is_refused_before_the_kdf_runs(templates, tmp_path, field):
    data_dir = _copy(templates, "encrypted", tmp_path)
    path = os.path.join(data_dir, "localvault.json")
    _edit(path, META_DAMAGE[field])
    with mock.patch("localvault.persist.Scrypt", side_effect=AssertionError("scrypt ran")) as scrypt:
        message = _refused(data_dir, PASSPHRASE)
    assert scrypt.call_count == 0
    assert path in message and f"({field} " in message, message


def test_an_n_that_would_take_gigabytes_is_refused_without_running_the_kdf(templates, tmp_path):
    data_dir = _copy(templates, "encrypted", tmp_path)
    path = os.path.join(data_dir, "localvault.json")
    _edit(path, lambda d: d["kdf"].update(n=2**22))
    with mock.patch("localvault.persist.Scrypt", side_effect=AssertionError("scrypt ran")) as scrypt:
        message = _refused(data_dir, PASSPHRASE)
    assert scrypt.call_count == 0 and "(kdf.n " in message
    line = _refused_by_cli(data_dir, PASSPHRASE)
    assert path in line and "kdf.n" in line


def test_a_bad_kdf_value_is_one_line_from_the_command(templates, tmp_path):
    data_dir = _copy(templates, "encrypted", tmp_path)
    path = os.path.join(data_dir, "localvault.json")
    _edit(path, META_DAMAGE["kdf.salt"])
    line = _refused_by_cli(data_dir, PASSPHRASE)
    assert path in line and "kdf.salt" in line


SECRETS_DAMAGE = {
    "identity_secret": lambda d: d.update(identity_secret=""),
    "backup_key": lambda d: d.update(backup_key="AAAAAAA="),  # 5 bytes
    "token_key": lambda d: d.update(token_key=5),
    "principal_id": lambda d: d.update(principal_id="me"),
    "ca_key": lambda d: d.update(ca_key=None),
}


@pytest.mark.parametrize("field", sorted(SECRETS_DAMAGE))
def test_a_bad_secret_is_refused(templates, tmp_path, field):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "secrets.json")
    _edit(path, SECRETS_DAMAGE[field])
    message = _refused(data_dir, "")
    assert path in message and f"({field} " in message, message


def test_an_empty_identity_secret_is_one_line_from_the_command(templates, tmp_path):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "secrets.json")
    _edit(path, SECRETS_DAMAGE["identity_secret"])
    line = _refused_by_cli(data_dir, None)
    assert path in line and "identity_secret" in line


# -- symbolic links -------------------------------------------------------------------------------


def test_a_planted_lock_link_is_refused_and_its_target_untouched(templates, tmp_path):
    data_dir = _copy(templates, "encrypted", tmp_path)
    target = tmp_path / "precious"
    target.write_text("mine")
    target.chmod(0o644)
    os.symlink(target, os.path.join(data_dir, "lock"))
    message = _refused(data_dir, PASSPHRASE)
    assert os.path.join(data_dir, "lock") in message and "symbolic link" in message
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "mine"


def test_a_linked_keys_directory_is_refused_and_left_as_it_is(templates, tmp_path):
    data_dir = _copy(templates, "encrypted", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(os.path.join(data_dir, "keys"), elsewhere)
    elsewhere.chmod(0o755)
    os.symlink(elsewhere, os.path.join(data_dir, "keys"))
    line = _refused_by_cli(data_dir, PASSPHRASE)
    assert os.path.join(data_dir, "keys") in line and "symbolic link" in line
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_a_linked_key_file_is_refused(templates, tmp_path):
    data_dir = _copy(templates, "plain", tmp_path)
    path = os.path.join(data_dir, "keys", "curve.json")
    shutil.move(path, tmp_path / "curve.json")
    os.symlink(tmp_path / "curve.json", path)
    assert "symbolic link" in _refused(data_dir, "")


def test_an_undamaged_copy_still_loads(templates, tmp_path):
    for kind, key in (("plain", ""), ("encrypted", PASSPHRASE)):
        data_dir = _copy(templates, kind, tmp_path / kind)
        with LocalVault(data_dir=data_dir, data_key=key) as vault:
            client = vault.key_client()
            assert client.get_key("live").properties.tags == {"team": "a"}
            assert len(list(client.list_properties_of_key_versions("live"))) == 2
            assert client.get_deleted_key("gone").name == "gone"


# -- backups: the service's 500 versions, and every backup made restores ------------------------------


@pytest.fixture(scope="module")
def vault() -> Iterator[LocalVault]:
    with LocalVault() as vault:
        yield vault


@pytest.fixture(scope="module")
def managed_hsm() -> Iterator[LocalVault]:
    with LocalVault(managed_hsm=True) as vault:
        yield vault


@pytest.fixture(scope="module")
def rsa_4096() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


def _versions(
    vault: LocalVault, name: str, count: int, key: Any, tags: Optional[Dict[str, str]] = None
) -> None:
    """``count`` versions of ``name`` holding ``key``, stored as an import would store them."""
    kty = "RSA" if isinstance(key, rsa.RSAPrivateKey) else "EC"
    for _ in range(count):
        vault.store.add_version(name, kty, key, tags=tags)


def _gone(client: KeyClient, name: str) -> None:
    client.begin_delete_key(name).wait()
    client.purge_deleted_key(name)


BIG_TAGS = {f"{index:02d}-{'n' * 509}": "v" * 256 for index in range(15)}  # the most a version may have


def test_a_backup_of_500_rsa_4096_versions_with_all_their_tags_restores(vault, rsa_4096, unique_key_name):
    _versions(vault, unique_key_name, 500, rsa_4096, BIG_TAGS)
    client = vault.key_client()
    versions = {p.version for p in client.list_properties_of_key_versions(unique_key_name)}
    blob = client.backup_key(unique_key_name)
    _gone(client, unique_key_name)
    restored = client.restore_key_backup(blob)
    assert restored.key.n == rsa_4096.public_key().public_numbers().n.to_bytes(512, "big")
    assert {p.version for p in client.list_properties_of_key_versions(unique_key_name)} == versions
    assert client.get_key(unique_key_name).properties.tags == BIG_TAGS


def test_a_key_with_3000_versions_is_not_backed_up_as_in_key_vault(vault, unique_key_name):
    _versions(vault, unique_key_name, 3000, ec.generate_private_key(ec.SECP256R1()))
    client = vault.key_client()
    with pytest.raises(HttpResponseError) as raised:
        client.backup_key(unique_key_name)
    assert (raised.value.status_code, raised.value.error.code) == (400, "BadParameter")
    assert "3000 versions" in raised.value.message and "at most 500" in raised.value.message
    vault.store.add_version(unique_key_name, "EC", ec.generate_private_key(ec.SECP256R1()))
    assert len(list(client.list_properties_of_key_versions(unique_key_name))) == 3001  # nothing lost


def test_a_backup_too_large_to_restore_is_refused_when_made(vault, unique_key_name):
    key = ec.generate_private_key(ec.SECP256R1())
    _versions(vault, unique_key_name, 500, key)
    client = vault.key_client()
    for version in client.list_properties_of_key_versions(unique_key_name):  # tags that do not compress
        tags = {f"{i:02d}-{os.urandom(254).hex()}": os.urandom(128).hex() for i in range(15)}
        vault.store.update(unique_key_name, version.version, tags=tags)
    with pytest.raises(HttpResponseError) as raised:
        client.backup_key(unique_key_name)
    assert (raised.value.status_code, raised.value.error.code) == (400, "BadParameter")
    assert "more than a restore takes" in raised.value.message


def test_a_restore_larger_than_any_backup_is_refused_before_it_is_read(vault):
    raw = RawVault(vault)
    try:
        response = raw.request(
            "POST",
            "/keys/restore",
            data=b"{" + b" " * MAX_RESTORE_BODY + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 413 and error_of(response)["code"] == "RequestEntityTooLarge"
        elsewhere = raw.request(
            "POST",
            "/keys/x/create",
            data=b"{" + b" " * (MAX_BODY + 1) + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert elsewhere.status_code == 413  # other requests keep their own bound
    finally:
        raw.close()


def _rotate_policy() -> KeyRotationPolicy:
    return KeyRotationPolicy(
        lifetime_actions=[KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P90D")]
    )


def test_a_managed_hsm_refuses_a_key_vault_backup_and_a_key_vault_a_managed_hsm_backup(
    vault, managed_hsm, unique_key_name
):
    client, hsm_client = vault.key_client(), managed_hsm.key_client()
    client.create_rsa_key(unique_key_name, size=2048)
    client.update_key_rotation_policy(unique_key_name, _rotate_policy())  # with Key Vault's Notify
    for source, target in ((client, hsm_client), (hsm_client, client)):
        if source is hsm_client:
            source.create_rsa_key(unique_key_name, size=2048, hardware_protected=True)
        blob = source.backup_key(unique_key_name)
        with pytest.raises(HttpResponseError) as raised:
            target.restore_key_backup(blob)
        assert (raised.value.status_code, raised.value.error.code) == (400, "BadParameter")
        assert "restores only backups made by" in raised.value.message
    _gone(hsm_client, unique_key_name)  # its name was free: the refused restore left nothing
    _gone(client, unique_key_name)


def test_an_older_backup_with_a_notify_is_refused_by_a_managed_hsm(vault, managed_hsm, unique_key_name):
    from localvault import models

    client = vault.key_client()
    client.create_ec_key(unique_key_name)
    client.update_key_rotation_policy(unique_key_name, _rotate_policy())
    record = models.record_to_dict(vault.store._record(unique_key_name))
    nonce = os.urandom(12)
    aead = AESGCM(models._PROCESS_BACKUP_SECRET)
    legacy = (
        models._BACKUP_MAGIC_V1
        + nonce
        + aead.encrypt(nonce, json.dumps(record).encode(), models._BACKUP_MAGIC_V1)
    )
    with pytest.raises(HttpResponseError) as raised:
        managed_hsm.key_client().restore_key_backup(legacy)
    assert raised.value.status_code == 400 and "made by a key vault" in raised.value.message
    _gone(client, unique_key_name)
    assert client.restore_key_backup(legacy).name == unique_key_name  # a key vault still takes it


def test_a_changed_version_is_written_and_backed_up_as_it_now_is(tmp_path, unique_key_name):
    # each version's stored form is made once: a change to a version must make it anew
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        client = vault.key_client()
        first = client.create_ec_key(unique_key_name, tags={"state": "made"})
        client.rotate_key(unique_key_name)
        client.update_key_properties(unique_key_name, first.properties.version, tags={"state": "changed"})
        client.update_key_properties(unique_key_name, first.properties.version, enabled=False)
        blob = client.backup_key(unique_key_name)
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        client = vault.key_client()
        kept = client.get_key(unique_key_name, first.properties.version).properties
        assert (kept.tags, kept.enabled) == ({"state": "changed"}, False)
        _gone(client, unique_key_name)
        client.restore_key_backup(blob)
        restored = client.get_key(unique_key_name, first.properties.version).properties
        assert (restored.tags, restored.enabled) == ({"state": "changed"}, False)
