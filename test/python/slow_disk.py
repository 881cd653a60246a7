"""A real slow disk for the Python tests, as test/helpers/slow_disk.ts makes
for jest: an ext4 file system on a loop device whose reads and writes the
cgroup v1 blkio controller throttles for the processes put in its cgroup
(an engine). It holds a transfer in flight for as long as a test needs,
whatever the machine's speed. Needs root, losetup, mkfs.ext4 and
/sys/fs/cgroup/blkio; `MISSING` says what is missing, and `needs_slow_disk`
skips a test, with that reason, without it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile

import pytest

BLKIO = "/sys/fs/cgroup/blkio"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists(f"{BLKIO}/cgroup.procs"):
        return f"no cgroup v1 blkio controller at {BLKIO}"
    if not (shutil.which("losetup") and shutil.which("mkfs.ext4")):
        return "no losetup or mkfs.ext4"
    return None


MISSING = _missing()
needs_slow_disk = pytest.mark.skipif(MISSING is not None, reason=f"needs a throttled disk: {MISSING}")


class SlowDisk:
    def __init__(self, mib: int = 128, base: str | None = None):
        self.base = tempfile.mkdtemp(prefix="ucm-slow-", dir=base or "/var/tmp")
        img = os.path.join(self.base, "disk.img")
        self.mnt = os.path.join(self.base, "mnt")
        os.mkdir(self.mnt)
        subprocess.run(["truncate", "-s", f"{mib}M", img], check=True)
        self.loop = subprocess.run(
            ["losetup", "-f", "--show", img], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.cgroup = f"{BLKIO}/ucm-pytest-{os.getpid()}-{secrets.token_hex(3)}"
        self._homes: dict[int, str] = {}
        try:
            subprocess.run(["mkfs.ext4", "-q", self.loop], check=True)
            subprocess.run(["mount", self.loop, self.mnt], check=True)
            os.chmod(self.mnt, 0o755)
            os.mkdir(self.cgroup)
        except BaseException:
            self.close()
            raise
        rdev = os.stat(self.loop).st_rdev
        self.dev = f"{os.major(rdev)}:{os.minor(rdev)}"

    def admit(self, pid: int) -> None:
        """Puts a process under this disk's limits (it goes back to its own cgroup at close)."""
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "blkio" in controllers.split(","):
                    self._homes[pid] = path
        with open(f"{self.cgroup}/cgroup.procs", "w") as f:
            f.write(str(pid))

    def throttle(self, read_bps: int | None = None, write_bps: int | None = None) -> None:
        """Bytes per second; 0 lifts the limit; None leaves it as it is."""
        for value, name in ((read_bps, "read_bps_device"), (write_bps, "write_bps_device")):
            if value is not None:
                with open(f"{self.cgroup}/blkio.throttle.{name}", "w") as f:
                    f.write(f"{self.dev} {value}")

    def close(self) -> None:
        if os.path.isdir(self.cgroup):
            self.throttle(0, 0)
            with open(f"{self.cgroup}/cgroup.procs") as f:
                pids = [int(p) for p in f.read().split()]
            for pid in pids:
                home = os.path.join(BLKIO, self._homes.get(pid, "/").lstrip("/"))
                try:
                    with open(f"{home if os.path.isdir(home) else BLKIO}/cgroup.procs", "w") as f:
                        f.write(str(pid))
                except OSError:
                    pass  # gone meanwhile
            subprocess.run(["rmdir", self.cgroup], check=False)
        subprocess.run(["umount", "-l", self.mnt], check=False, capture_output=True)
        if getattr(self, "loop", None):
            subprocess.run(["losetup", "-d", self.loop], check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
