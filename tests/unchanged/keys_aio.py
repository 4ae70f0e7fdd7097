"""The same, with the async client (aiohttp): run with only localvault's export lines as setup."""

import asyncio
import hashlib
import sys

from azure.identity.aio import DefaultAzureCredential
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import EncryptionAlgorithm, SignatureAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient


async def main(vault_url: str) -> None:
    async with DefaultAzureCredential() as credential, KeyClient(vault_url, credential) as client:
        key = await client.create_rsa_key("unchanged", size=2048)
        assert key.id.startswith(f"{vault_url}/keys/unchanged/"), key.id
        assert (await client.get_key("unchanged")).id == key.id
        for i in range(26):
            await client.create_ec_key(f"page-{i}")
        names = [k.name async for k in client.list_properties_of_keys()]
        assert len(names) == 27, names
        async with CryptographyClient(key.id, credential) as crypto:
            digest = hashlib.sha256(b"hello").digest()
            signature = (await crypto.sign(SignatureAlgorithm.rs256, digest)).signature
            assert (await crypto.verify(SignatureAlgorithm.rs256, digest, signature)).is_valid
            ciphertext = (await crypto.encrypt(EncryptionAlgorithm.rsa_oaep, b"secret")).ciphertext
            assert (await crypto.decrypt(EncryptionAlgorithm.rsa_oaep, ciphertext)).plaintext == b"secret"
        rotated = await client.rotate_key("unchanged")
        assert rotated.properties.version != key.properties.version
        deleted = await client.delete_key("unchanged")
        assert deleted.recovery_id == f"{vault_url}/deletedkeys/unchanged", deleted.recovery_id
        await client.recover_deleted_key("unchanged")
        await client.delete_key("unchanged")
        await client.purge_deleted_key("unchanged")
        print("OK", len(names))


asyncio.run(main(sys.argv[1]))
