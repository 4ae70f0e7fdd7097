// Code written for Azure, unchanged, in JavaScript: run with only localvault's export lines as setup.
//   node tests/js/keys.mjs https://NAME.vault.azure.net
import { createHash } from "node:crypto";
import { DefaultAzureCredential } from "@azure/identity";
import { CryptographyClient, KeyClient } from "@azure/keyvault-keys";

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

const vaultUrl = process.argv[2];
const credential = new DefaultAzureCredential();
const client = new KeyClient(vaultUrl, credential);

const key = await client.createRsaKey("unchanged", { keySize: 2048 });
check(key.id.startsWith(`${vaultUrl}/keys/unchanged/`), key.id);
check((await client.getKey("unchanged")).id === key.id, "get returns the key");
for (let i = 0; i < 26; i++) await client.createEcKey(`page-${i}`);
const names = [];
for await (const properties of client.listPropertiesOfKeys()) names.push(properties.name);
check(names.length === 27, `27 keys listed, not ${names.length}`);

const crypto = new CryptographyClient(key.id, credential);
const digest = createHash("sha256").update("hello").digest();
const { result: signature } = await crypto.sign("RS256", digest);
check((await crypto.verify("RS256", digest, signature)).result, "the signature verifies");
const { result: ciphertext } = await crypto.encrypt({ algorithm: "RSA-OAEP", plaintext: Buffer.from("secret") });
const { result: plaintext } = await crypto.decrypt({ algorithm: "RSA-OAEP", ciphertext });
check(Buffer.from(plaintext).toString() === "secret", "decrypt returns the plaintext");

const rotated = await client.rotateKey("unchanged");
check(rotated.properties.version !== key.properties.version, "rotate makes a new version");
const deleted = await (await client.beginDeleteKey("unchanged")).pollUntilDone();
check(deleted.properties.recoveryId === `${vaultUrl}/deletedkeys/unchanged`, deleted.properties.recoveryId);
await (await client.beginRecoverDeletedKey("unchanged")).pollUntilDone();
await (await client.beginDeleteKey("unchanged")).pollUntilDone();
await client.purgeDeletedKey("unchanged");
console.log("OK", names.length);
