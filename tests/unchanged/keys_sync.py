"""Code written for Azure, unchanged: run with only localvault's export lines as setup.

python tests/unchanged/keys_sync.py https://NAME.vault.azure.net
"""

import hashlib
import sys

from azure.identity import DefaultAzureCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm, SignatureAlgorithm

vault_url = sys.argv[1]
credential = DefaultAzureCredential()
client = KeyClient(vault_url, credential)

key = client.create_rsa_key("unchanged", size=2048)
assert key.id.startswith(f"{vault_url}/keys/unchanged/"), key.id
assert client.get_key("unchanged").id == key.id
for i in range(26):  # past the first page of 25
    client.create_ec_key(f"page-{i}")
names = [k.name for k in client.list_properties_of_keys()]
assert len(names) == 27, names

crypto = CryptographyClient(key.id, credential)
digest = hashlib.sha256(b"hello").digest()
signature = crypto.sign(SignatureAlgorithm.rs256, digest).signature
assert crypto.verify(SignatureAlgorithm.rs256, digest, signature).is_valid
ciphertext = crypto.encrypt(EncryptionAlgorithm.rsa_oaep, b"secret").ciphertext
assert crypto.decrypt(EncryptionAlgorithm.rsa_oaep, ciphertext).plaintext == b"secret"

rotated = client.rotate_key("unchanged")
assert rotated.properties.version != key.properties.version
deleted = client.begin_delete_key("unchanged").result()
assert deleted.recovery_id == f"{vault_url}/deletedkeys/unchanged", deleted.recovery_id
client.begin_recover_deleted_key("unchanged").wait()
client.begin_delete_key("unchanged").wait()
client.purge_deleted_key("unchanged")
print("OK", len(names))
