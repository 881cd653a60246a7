"""Process helpers shared by the Python tests and the wheel test (test/wheel
puts this folder on sys.path). Reads /proc only, so a test can tell that a
process it stopped is really gone."""

from __future__ import annotations

import time


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` no longer runs (exited, or a zombie not yet reaped), false after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False
