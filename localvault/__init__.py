"""localvault: an embedded Azure Key Vault (keys) that the real SDK and DefaultAzureCredential talk to."""

from .vault import LocalVault, LocalVaultCredential

__all__ = ["LocalVault", "LocalVaultCredential"]
