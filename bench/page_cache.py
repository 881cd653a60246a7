"""Cold reads for the benchmarks: dropping the page cache needs root, so a
caller learns whether it worked and labels its figures accordingly."""

from __future__ import annotations

import os


def drop_caches() -> bool:
    """Writes dirty pages out and drops the page cache; false without the right to."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
