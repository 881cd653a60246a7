"""One NfsStore round trip as one process, for paired whole-process timings of
two engine builds (UCM_NATIVE_ADDON picks the addon the engine loads):

    python bench/api_roundtrip.py <block MiB> <transfer streams> <big|small> [--dir /tmp/sb]

Registers 1 GiB of shared CPU tensors, dumps them as blocks of the given size
(one task, or tasks of 8 blocks), commits, drops the page cache, loads them
back and prints one RESULT line with both speeds and whether the bytes came
back exact. store_bench.py is the full benchmark (with fio in the same run);
this is its "shared" case alone, cheap enough to repeat many times. Root (to
drop the page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_shim"))

import torch  # noqa: E402

from page_cache import drop_caches  # noqa: E402
from ucm.client import EngineClient  # noqa: E402
from ucm.store import NfsStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("block_mib", type=float)
    ap.add_argument("streams", type=int)
    ap.add_argument("shape", choices=["big", "small"])
    ap.add_argument("--dir", default="/tmp")
    a = ap.parse_args()
    block = int(a.block_mib * 2**20)
    n = 2**30 // block
    base = tempfile.mkdtemp(prefix="ucm-roundtrip-", dir=a.dir)
    store_dir = os.path.join(base, "store")
    os.makedirs(store_dir)
    endpoint = f"ipc://{base}/e.sock"
    src = torch.randint(0, 256, (n, block), dtype=torch.uint8).share_memory_()
    dst = torch.zeros((n, block), dtype=torch.uint8).share_memory_()
    store = NfsStore(
        {
            "storage_backends": store_dir,
            "transferStreamNumber": a.streams,
            "endpoint": endpoint,
            "maxInflightBytes": "64GiB",
            "maxQueueMs": 0,
            "loadTimeoutMs": 600000,
            "clientTimeoutMs": 60000,
        },
        namespace="roundtrip",
    )
    try:
        store.register_memory([src, dst])
        keys = [f"k-{i}".encode() for i in range(n)]
        groups = [list(range(n))] if a.shape == "big" else [list(range(i, min(n, i + 8))) for i in range(0, n, 8)]
        t0 = time.perf_counter()
        tasks = [store.dump([keys[i] for i in g], [0] * len(g), [src[i] for i in g]) for g in groups]
        failed = sum(store.wait(t) for t in tasks)
        store.commit(keys)
        dump = n * block / (time.perf_counter() - t0) / 1e9
        drop_caches()
        t0 = time.perf_counter()
        tasks = [store.load([keys[i] for i in g], [0] * len(g), [dst[i] for i in g]) for g in groups]
        failed += sum(store.wait(t) for t in tasks)
        load = n * block / (time.perf_counter() - t0) / 1e9
        print(
            f"RESULT {a.block_mib:g} MiB x {n}, {a.streams} streams, {a.shape}: dump {dump:.2f} load {load:.2f} "
            f"failed {failed} exact {torch.equal(src, dst)}",
            flush=True,
        )
    finally:
        pid = EngineClient(endpoint, 3000).raw("health").get("pid")
        store.close()
        if pid:
            os.kill(pid, 15)
            time.sleep(0.3)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
