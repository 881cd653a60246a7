"""Several mount points in storage_backends (UCM's ':'-separated list): blocks
spread over them by key, so each one's bandwidth adds up (issue 27).

    python bench/mounts_bench.py [--gib 1] [--block-mib 4] [--threads 8,32] [--mbps 150] [--json FILE]

Needs root. Two directories, each an ext4 on its own loop device
(test/python/slow_disk.py), both throttled to --mbps MB/s for reads and for
writes in one blkio cgroup, the engine's and fio's: each mount's limit is
the same, far below this machine's disk. For each thread count:

- fio (O_DIRECT, psync, one I/O per block file's size, that many jobs) on
  ONE mount, write then read, page cache dropped: one mount's limit, measured;
- ucm.store.NfsStore (UCM's flat dict, store_pipeline "Posix": no Cache
  stage, every dump written before it is answered and every load read from
  its file) over ONE mount, then over BOTH ("m1:m2"): dump every block from
  CPU tensors in shared memory and commit, page cache dropped, load them
  back byte-exact; how many block files each mount received.

The ratio of interest is two mounts' speed to one mount's fio (goal 1.8x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))
sys.path.insert(0, os.path.join(ROOT, "test", "python"))

from page_cache import drop_caches  # noqa: E402
from engine_proc import engine_pid, stop_engine  # noqa: E402

HEADER = 4096


def fio_in(cgroup: str, directory: str, rw: str, file_bytes: int, nblocks: int, jobs: int) -> float:
    """fio's GB/s, run inside `cgroup` (so under its throttle)."""
    per_job = -(-nblocks // jobs) * file_bytes
    cmd = (
        f"echo $$ > {cgroup}/cgroup.procs; exec fio --name=ucm --directory={directory} --rw={rw} "
        f"--bs={file_bytes} --size={per_job} --numjobs={jobs} --direct=1 --ioengine=psync "
        "--group_reporting --output-format=json"
    )
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return (job["write"] if rw == "write" else job["read"])["bw_bytes"] / 1e9


def block_files(root: str) -> int:
    """Committed block files under a storage directory (<ns>/<2 hex>/<key hex>, core/layout.ts)."""
    return sum(
        len(files) for d, _, files in os.walk(root) if len(os.path.basename(d)) == 2 and os.path.dirname(d) != root
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--block-mib", type=float, default=4)
    ap.add_argument("--threads", default="8,32")
    ap.add_argument("--mbps", type=float, default=150.0, help="each mount's read and write limit, MB/s (1e6 bytes)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    os.environ.setdefault("UCM_TASK_LINES", "0")
    import torch

    from slow_disk import MISSING, SlowDisk
    from ucm.store import NfsStore

    if MISSING is not None:
        print(f"mounts_bench: needs a throttled disk: {MISSING}", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("mounts_bench: fio not found (apt-get install fio)", file=sys.stderr)
        return 2
    rate = int(a.mbps * 1e6)
    block = int(a.block_mib * 2**20)
    n = max(8, int(a.gib * 2**30) // block)
    size_mib = int(a.gib * 1024 * 1.5) + 512
    work = tempfile.mkdtemp(prefix="ucm-mounts-bench-")
    os.chmod(work, 0o700)
    disks = [SlowDisk(mib=size_mib), SlowDisk(mib=size_mib)]
    # One cgroup (the first disk's) throttles both devices: a process is in one blkio cgroup.
    cgroup = disks[0].cgroup

    def throttle(bps: int) -> None:
        for d in disks:
            for name in ("read_bps_device", "write_bps_device"):
                with open(f"{cgroup}/blkio.throttle.{name}", "w") as f:
                    f.write(f"{d.dev} {bps}")

    rows = []
    src = torch.randint(0, 256, (n, block), dtype=torch.uint8).share_memory_()
    dst = torch.zeros((n, block), dtype=torch.uint8).share_memory_()
    try:
        for threads in [int(x) for x in a.threads.split(",")]:
            row: dict = {"block_mib": a.block_mib, "blocks": n, "threads": threads, "limit_MBps_each": rate / 1e6}
            throttle(rate)
            fdir = os.path.join(disks[0].mnt, "fio")
            os.makedirs(fdir)
            drop_caches()
            row["fio_write_GBps_one"] = fio_in(cgroup, fdir, "write", block + HEADER, n, threads)
            drop_caches()
            row["fio_read_GBps_one"] = fio_in(cgroup, fdir, "read", block + HEADER, n, threads)
            shutil.rmtree(fdir)
            for label, mounts in (("one", disks[:1]), ("two", disks)):
                dirs = [os.path.join(d.mnt, "kv") for d in mounts]
                for d in dirs:
                    os.makedirs(d, mode=0o700)
                sock = os.path.join(work, "e.sock")
                store = NfsStore(
                    {
                        "storage_backends": ":".join(dirs),
                        "store_pipeline": "Posix",
                        "transferStreamNumber": threads,
                        "endpoint": f"ipc://{sock}",
                        "maxInflightBytes": "64GiB",
                        "maxQueueMs": 0,
                        "loadTimeoutMs": 600000,
                        "clientTimeoutMs": 60000,
                    },
                    namespace="mounts",
                )
                pid = engine_pid(sock)
                with open(f"{cgroup}/cgroup.procs", "w") as f:
                    f.write(str(pid))
                try:
                    store.register_memory([src, dst])
                    keys = [f"m-{threads}-{label}-{i}".encode() for i in range(n)]
                    drop_caches()
                    t0 = time.perf_counter()
                    failed = store.wait(store.dump(keys, [0] * n, [src[i] for i in range(n)]))
                    store.commit(keys)
                    row[f"dump_GBps_{label}"] = n * block / (time.perf_counter() - t0) / 1e9
                    drop_caches()
                    dst.zero_()
                    t0 = time.perf_counter()
                    failed += store.wait(store.load(keys, [0] * n, [dst[i] for i in range(n)]))
                    row[f"load_GBps_{label}"] = n * block / (time.perf_counter() - t0) / 1e9
                    row[f"byte_exact_{label}"] = failed == 0 and torch.equal(src, dst)
                    row[f"files_per_mount_{label}"] = [block_files(d) for d in dirs]
                finally:
                    store.close()
                    stop_engine(pid)
                    for d in dirs:
                        shutil.rmtree(d, ignore_errors=True)
            throttle(0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for d in disks:
            d.close()
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gib": a.gib, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print()
    print(
        "| threads | limit each MB/s | fio write, one mount | dump, one | dump, two | two / fio | "
        "fio read, one mount | load, one | load, two | two / fio | files per mount | byte-exact |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(
            f"| {r['threads']} | {r['limit_MBps_each']:.0f} | {r['fio_write_GBps_one']:.3f} | {r['dump_GBps_one']:.3f} | "
            f"{r['dump_GBps_two']:.3f} | {r['dump_GBps_two'] / r['fio_write_GBps_one']:.2f}x | "
            f"{r['fio_read_GBps_one']:.3f} | {r['load_GBps_one']:.3f} | {r['load_GBps_two']:.3f} | "
            f"{r['load_GBps_two'] / r['fio_read_GBps_one']:.2f}x | {r['files_per_mount_two']} | "
            f"{'yes' if r['byte_exact_one'] and r['byte_exact_two'] else 'NO'} |"
        )
    return 0 if all(r["byte_exact_one"] and r["byte_exact_two"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
