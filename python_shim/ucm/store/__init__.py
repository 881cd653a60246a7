"""The store API, usable without vLLM: `NfsStore` (this package's own), and
UCM's interface to it (`ucm.store.ucmstore`, `ucm.store.factory`,
`ucm.store.nfsstore.nfsstore_connector.UcmNfsStore`)."""

from .nfs_store import NfsStore, Task

__all__ = ["NfsStore", "Task"]
