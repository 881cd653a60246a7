"""The store API, usable without vLLM."""
from .nfs_store import NfsStore, Task

__all__ = ["NfsStore", "Task"]
