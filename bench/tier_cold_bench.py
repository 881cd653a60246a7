"""Cold loads with and without the Cache stage, through the public API: does
reading into fresh tier buffers (instead of a reused staging buffer) cost
anything?

    python bench/tier_cold_bench.py --dir <storage dir> [--block-mib 4]
                                    [--threads 8] [--rounds 3]

NfsStore stores 1 GiB of shared-memory CPU tensors once (an engine without
the stage). Then, `--rounds` times each, alternating: an engine with
`hostCacheBytes` 0 and one with 2 GiB (the shim's launcher replaces the idle
engine when the settings change, so each measurement has a fresh engine and
an empty tier), the page cache dropped, one load task of every block,
byte-exact. Needs root (to drop the page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from page_cache import drop_caches

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_shim"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--block-mib", type=float, default=4)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("UCM_TASK_LINES", "0")
    import torch

    from ucm.store import NfsStore

    base = tempfile.mkdtemp(prefix="ucm-tier-cold-", dir=os.path.abspath(a.dir))
    os.chmod(base, 0o700)
    store_dir = os.path.join(base, "store")
    os.makedirs(store_dir, mode=0o700)
    block = int(a.block_mib * 2**20)
    n = 2**30 // block
    src = torch.randint(0, 256, (n, block), dtype=torch.uint8).share_memory_()
    dst = torch.zeros((n, block), dtype=torch.uint8).share_memory_()

    def config(host_cache: str) -> dict:
        return {
            "storage_backends": store_dir,
            "transferStreamNumber": a.threads,
            "endpoint": f"ipc://{base}/e.sock",
            "maxInflightBytes": "64GiB",
            "maxQueueMs": 0,
            "loadTimeoutMs": 600000,
            "clientTimeoutMs": 60000,
            "hostCacheBytes": host_cache,
        }

    keys = [f"cold-{i}".encode() for i in range(n)]
    runs: dict[str, list[float]] = {"0": [], "2GiB": []}
    exact = True
    try:
        with NfsStore(config("0"), namespace="tiercold") as s:
            s.register_memory([src, dst])
            if s.wait(s.dump(keys, [0] * n, [src[i] for i in range(n)])) != 0:
                print("tier_cold_bench: the dump failed", file=sys.stderr)
                return 1
            s.commit(keys)
        for _ in range(a.rounds):
            for host_cache in runs:
                with NfsStore(config(host_cache), namespace="tiercold") as s:
                    s.register_memory([src, dst])
                    cold = drop_caches()
                    dst.zero_()
                    t0 = time.perf_counter()
                    failed = s.wait(s.load(keys, [0] * n, [dst[i] for i in range(n)]))
                    gbps = n * block / (time.perf_counter() - t0) / 1e9
                    ok = failed == 0 and torch.equal(src, dst)
                    exact = exact and ok
                    runs[host_cache].append(gbps)
                    print(
                        f"hostCacheBytes {host_cache}: cold load {gbps:.2f} GB/s"
                        f"{'' if ok else ' NOT BYTE-EXACT'}{'' if cold else ' (page cache not dropped!)'}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"{a.block_mib:g} MiB blocks, {a.threads} threads, 1 GiB, {a.rounds} rounds each, alternating")
    for host_cache, v in runs.items():
        print(
            f"hostCacheBytes {host_cache}: median {statistics.median(v):.2f} GB/s ({', '.join(f'{x:.2f}' for x in v)})"
        )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
