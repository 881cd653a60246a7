"""Loads that hit the Cache stage (the engine's host-memory tier), through the
public API, beside a plain copy of the same bytes between two host buffers.

    python bench/tier_bench.py --dir <storage dir> [--gib 2] [--block-mib 4,16]
                               [--threads 8,32] [--repeat 3] [--json FILE]

For each block size and thread count an engine starts with `hostCacheBytes`
large enough for every block (as UCM's store_pipeline "Cache|Posix" with
cache_buffer_capacity_gb would), ucm.store.NfsStore dumps the blocks from
CPU tensors in shared memory (registered once, as a KV buffer is) and
commits them; then, taking turns `--repeat` times:

- the limit: torch's copy of the same bytes between two host tensors with
  torch.set_num_threads(threads) (the memory's own speed with that many
  threads on this machine);
- the store: one load task of every block into a zeroed tensor, timed from
  the call to the end of wait, byte-exact, and every block counted a tier hit
  by the engine's own figures (`stats`).

Medians; the ratio is load / copy (goal: 0.8). The directory only receives
the writes; the page cache plays no part in what a tier hit measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_shim"))

from engine_proc import engine_pid, stop_engine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--block-mib", default="4,16")
    ap.add_argument("--threads", default="8,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    os.environ.setdefault("UCM_TASK_LINES", "0")
    import torch

    from ucm.client import EngineClient
    from ucm.store import NfsStore

    base = tempfile.mkdtemp(prefix="ucm-tier-bench-", dir=os.path.abspath(a.dir))
    os.chmod(base, 0o700)
    rows = []
    try:
        for mib in [float(x) for x in a.block_mib.split(",")]:
            block = int(mib * 2**20)
            n = max(8, int(a.gib * 2**30) // block)
            src = torch.randint(0, 256, (n, block), dtype=torch.uint8).share_memory_()
            dst = torch.zeros((n, block), dtype=torch.uint8).share_memory_()
            for threads in [int(x) for x in a.threads.split(",")]:
                store_dir = os.path.join(base, "store")
                os.makedirs(store_dir, mode=0o700)
                sock = os.path.join(base, "e.sock")
                flat = {
                    "storage_backends": store_dir,
                    "transferStreamNumber": threads,
                    "endpoint": f"ipc://{sock}",
                    "hostCacheBytes": n * (block + 4096) + (64 << 20),
                    "maxInflightBytes": "64GiB",
                    "maxQueueMs": 0,
                    "loadTimeoutMs": 600000,
                    "clientTimeoutMs": 60000,
                }
                store = NfsStore(flat, namespace="tierbench")
                stats = EngineClient(f"ipc://{sock}", 10000)
                copies, loads = [], []
                exact, all_hits = True, True
                try:
                    store.register_memory([src, dst])
                    keys = [f"tier-{mib}-{threads}-{i}".encode() for i in range(n)]
                    failed = store.wait(store.dump(keys, [0] * n, [src[i] for i in range(n)]))
                    store.commit(keys)
                    if failed:
                        print(f"tier_bench: {failed} block(s) failed to dump", file=sys.stderr)
                        return 1
                    torch.set_num_threads(threads)
                    for _ in range(a.repeat):
                        dst.zero_()
                        t0 = time.perf_counter()
                        dst.copy_(src)
                        copies.append(n * block / (time.perf_counter() - t0) / 1e9)
                        dst.zero_()
                        hits0 = stats.raw("stats")["tier"]["hits"]
                        t0 = time.perf_counter()
                        failed = store.wait(store.load(keys, [0] * n, [dst[i] for i in range(n)]))
                        loads.append(n * block / (time.perf_counter() - t0) / 1e9)
                        hits = stats.raw("stats")["tier"]["hits"] - hits0
                        exact = exact and failed == 0 and torch.equal(src, dst)
                        all_hits = all_hits and hits == n
                        print(
                            f"{mib:g} MiB x {n}, {threads} threads: copy {copies[-1]:.2f} GB/s, "
                            f"tier load {loads[-1]:.2f} GB/s, {hits} of {n} tier hits"
                            f"{'' if exact else ', NOT BYTE-EXACT'}",
                            flush=True,
                        )
                finally:
                    store.close()
                    stop_engine(engine_pid(sock), 10)
                    shutil.rmtree(store_dir, ignore_errors=True)
                c, ld = statistics.median(copies), statistics.median(loads)
                rows.append(
                    {
                        "block_mib": mib,
                        "threads": threads,
                        "blocks": n,
                        "copy_GBps": c,
                        "tier_load_GBps": ld,
                        "ratio": ld / c,
                        "byte_exact": exact,
                        "all_tier_hits": all_hits,
                    }
                )
            del src, dst
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gib": a.gib, "repeat": a.repeat, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print()
    print("| block | threads | host copy GB/s | tier load GB/s | load / copy | byte-exact | all tier hits |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(
            f"| {r['block_mib']:g} MiB | {r['threads']} | {r['copy_GBps']:.2f} | {r['tier_load_GBps']:.2f} | "
            f"{100 * r['ratio']:.0f} % | {'yes' if r['byte_exact'] else 'NO'} | {'yes' if r['all_tier_hits'] else 'NO'} |"
        )
    return 0 if all(r["byte_exact"] and r["all_tier_hits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
