"""Per-block statuses of a finished dump or load, as the engine names them on
the wire (docs/PROTOCOL.md; the native addon exports the same list, in its
enum order, and test_config.py checks the two agree). The shim compares
statuses against these names only."""

from __future__ import annotations

OK = "ok"
NOT_FOUND = "not_found"
CORRUPT = "corrupt"
IO_ERROR = "io_error"
CANCELLED = "cancelled"
SKIPPED = "skipped"  # a dump's block that was stored already
MISMATCH = "mismatch"
DROPPED = "dropped"  # a dump's block shed by write admission

#: every status, in the addon's order
ALL = (OK, NOT_FOUND, CORRUPT, IO_ERROR, CANCELLED, SKIPPED, MISMATCH, DROPPED)
#: the block is in the store (or in memory, for a load) once the task is done
STORED = (OK, SKIPPED)
