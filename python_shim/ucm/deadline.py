"""Deadlines: when the shim gives up on a transfer, and what it tells the engine.

Every dump and load the shim sends carries `deadline_unix_ms`: the engine
starts no copy out of or into the client's memory after it (docs/PROTOCOL.md).
The shim gives up on the task at `give_up` (its own timeout); the deadline it
sends is earlier by a margin, so that a copy the engine started just before
the deadline has ended by `give_up`:

    deadline = give_up - margin,  margin = 100 ms + one block's bytes at 250 MB/s

A block copy is memcpy (host memory, in 4 MiB chunks) or one batched device
copy (GPU) between the client's memory and the engine's staging, never file
I/O; one that ends past the deadline counts for nothing (the engine reads the
clock between chunks and after the copy: a load is failed, a dump never
committed, and an engine paused in a copy stops within a chunk). 250 MB/s
is far below what one core copies (several GB/s) to allow for 32 transfer
threads sharing the memory bus and a loaded machine; 100 ms covers the thread
being descheduled. A 16 MiB block gets 167 ms, 1 GiB 4.4 s (the engine's
`cancel` waits at most 5 s for a running copy, the same bound). The margin
never exceeds half the timeout, so a short timeout still leaves the engine
time to work.

So once `give_up` has passed, the engine touches the memory no more, whether
or not it can be asked: that is the guarantee when it is unreachable. Before
`give_up`, the shim reports a task's memory free only after the engine
acknowledged a `cancel` (or the engine process is gone).
"""

from __future__ import annotations

import time

MARGIN_BASE_MS = 100
MARGIN_BYTES_PER_MS = 250_000  # 250 MB/s


def copy_margin_ms(block_bytes: int, timeout_ms: float) -> int:
    """Milliseconds between the deadline sent and the moment the shim gives up."""
    margin = MARGIN_BASE_MS + -(-max(0, block_bytes) // MARGIN_BYTES_PER_MS)
    return int(min(margin, timeout_ms / 2))


class Deadline:
    """A transfer's give-up time (monotonic) and the deadline sent for it."""

    __slots__ = ("give_up", "unix_ms")

    def __init__(self, timeout_ms: float, block_bytes: int, start: float | None = None):
        now = time.monotonic()
        start = now if start is None else start
        self.give_up = start + timeout_ms / 1000
        margin = copy_margin_ms(block_bytes, timeout_ms)
        # The wall clock the engine compares with; the monotonic clock is ours.
        self.unix_ms = int(time.time() * 1000 + (self.give_up - now) * 1000 - margin)

    def left_ms(self) -> int:
        return max(0, int((self.give_up - time.monotonic()) * 1000))

    def passed(self) -> bool:
        return time.monotonic() >= self.give_up

    def sleep_until(self) -> None:
        """Blocks until give_up: the engine starts no copy of the task after
        the deadline, and the margin covers one copy started just before."""
        left = self.give_up - time.monotonic()
        if left > 0:
            time.sleep(left)
