#!/usr/bin/env bash
# The Azure CLI, unchanged, against localvault: run in a shell with only localvault's export lines as
# setup, with `az` on PATH (pip install azure-cli, in a venv of its own: it is large, so CI does not).
#
#   python -m localvault --isolated &    # then paste its export lines, or: . FILE from --env-file
#   bash tests/unchanged/az_keys.sh contoso
#
# az keeps its login in the AZURE_CONFIG_DIR the export lines name, so your own az login is never touched.
set -euo pipefail

vault=${1:?usage: az_keys.sh VAULT_NAME}
: "${IDENTITY_ENDPOINT:?load localvault export lines first}"
: "${AZURE_CONFIG_DIR:?load localvault export lines first: they set AZURE_CONFIG_DIR}"
work=$(mktemp -d)
export AZURE_CORE_COLLECT_TELEMETRY=no AZURE_CORE_ONLY_SHOW_ERRORS=true AZURE_CORE_NO_COLOR=true
trap 'rm -rf "$work"' EXIT

step() { printf 'ok   %s\n' "$*"; }
# check WHAT GOT WANTED: stop the witness unless GOT is WANTED
check() { [[ $2 == "$3" ]] || { printf 'FAIL %s: got %q, wanted %q\n' "$1" "$2" "$3"; exit 1; }; step "$1"; }
key=(--vault-name "$vault" --name witness)
value() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

az login --identity --allow-no-subscriptions --output none
step "az login --identity --allow-no-subscriptions"

kid=$(az keyvault key create "${key[@]}" --kty RSA --size 2048 --tags team=witness | value '["key"]["kid"]')
check "key create" "${kid%/*}" "https://$vault.vault.azure.net/keys/witness"
check "key show" "$(az keyvault key show "${key[@]}" | value '["key"]["kid"]')" "$kid"
check "key list" "$(az keyvault key list --vault-name "$vault" | value '[0]["name"]')" witness
az keyvault key set-attributes "${key[@]}" --tags team=changed --output none
check "key set-attributes" "$(az keyvault key show "${key[@]}" | value '["tags"]["team"]')" changed

digest=$(printf 'hello' | openssl dgst -sha256 -binary | base64)
signature=$(az keyvault key sign "${key[@]}" --algorithm RS256 --digest "$digest" | value '["signature"]')
step "key sign"
check "key verify" "$(az keyvault key verify "${key[@]}" --algorithm RS256 --digest "$digest" \
    --signature "$signature" | value '["isValid"]')" True
secret=$(printf 'secret' | base64)
ciphertext=$(az keyvault key encrypt "${key[@]}" --algorithm RSA-OAEP --value "$secret" --data-type base64 \
    | value '["result"]')
step "key encrypt"
check "key decrypt" "$(az keyvault key decrypt "${key[@]}" --algorithm RSA-OAEP --value "$ciphertext" \
    --data-type base64 | value '["result"]')" "$secret"

az keyvault key rotation-policy update "${key[@]}" --value '{"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}], "attributes": {"expiryTime": "P1Y"}}' --output none
step "key rotation-policy update"
check "key rotation-policy show" "$(az keyvault key rotation-policy show "${key[@]}" | value '["expiresIn"]')" P1Y
rotated=$(az keyvault key rotate "${key[@]}" | value '["key"]["kid"]')
[[ $rotated != "$kid" ]] || { echo "FAIL key rotate: the same version"; exit 1; }
step "key rotate"
check "key list-versions" "$(az keyvault key list-versions "${key[@]}" | value '.__len__()')" 2

az keyvault key backup "${key[@]}" --file "$work/witness.backup"
step "key backup"
check "key delete" "$(az keyvault key delete "${key[@]}" | value '["recoveryId"]')" \
    "https://$vault.vault.azure.net/deletedkeys/witness"
check "key show-deleted" "$(az keyvault key show-deleted "${key[@]}" | value '["key"]["kid"]')" "$rotated"
check "key list-deleted" "$(az keyvault key list-deleted --vault-name "$vault" | value '[0]["name"]')" witness
check "key recover" "$(az keyvault key recover "${key[@]}" | value '["key"]["kid"]')" "$rotated"
az keyvault key delete "${key[@]}" --output none
az keyvault key purge "${key[@]}"
check "key purge" "$(az keyvault key list-deleted --vault-name "$vault" | value '.__len__()')" 0
az keyvault key restore --vault-name "$vault" --file "$work/witness.backup" --output none
check "key restore" "$(az keyvault key list-versions "${key[@]}" | value '.__len__()')" 2

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/imported.pem" 2>/dev/null
check "key import" "$(az keyvault key import --vault-name "$vault" --name imported --pem-file "$work/imported.pem" \
    | value '["key"]["kty"]')" RSA
echo "the Azure CLI ran every step against https://$vault.vault.azure.net"
