"""The engine process a benchmark's store started: its pid, and a clean stop
(SIGTERM, then waiting for it to go) between cases, so that each case starts
its own engine."""

from __future__ import annotations

import os
import time


def engine_pid(sock: str) -> int:
    """The pid of the engine listening on the ipc socket `sock` (its `health`)."""
    from ucm.client import EngineClient

    c = EngineClient(f"ipc://{sock}", 3000)
    try:
        return int(c.raw("health")["pid"])
    finally:
        c.close()


def stop_engine(pid: int, wait_s: float = 30.0) -> None:
    """SIGTERM to `pid`, then waits up to `wait_s` for it to exit."""
    os.kill(pid, 15)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            return
