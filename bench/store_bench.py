"""The store's public API at disk speed: ucm.store.NfsStore beside fio on the
same directory, in the same run.

    python bench/store_bench.py --dir <dir on the disk to measure> [--gib 2]
                                [--block-mib 4,16] [--threads 8,32] [--shapes big,small]
                                [--memory shared,private] [--repeat 3]
                                [--host-cache 3GiB [--cold-tier]] [--fresh-store]

For each block size and thread count: fio writes and then reads (page cache
dropped, O_DIRECT, psync) files with one I/O per block file's size from that
many jobs; then NfsStore, built from UCM's flat connector-config dict as a UCM
user would, dumps the same bytes from CPU tensors in shared memory (one
tensor per block; `register_memory` once, as a long-lived KV buffer would),
commits, drops the page cache and loads them back, byte-exact. "big" is one
task of every block; "small" is tasks of 8 blocks, all submitted, then waited
for. With --repeat, fio and the store take turns that many times and the
medians are reported. Prints one table with the ratios to fio (goal: 90 %).
With --host-cache the engine has a Cache stage of that size; --cold-tier then
starts a new engine (an empty stage) before each load, so the loads read the
directory into the stage's buffers and verify them there: the cold path
through the Cache stage (the table says "warm!" if the stage served any).
With --fresh-store every case of every round opens a new store (a new
engine, a new staging pool in the shim): each figure is then a store's first
2 GiB, the case a new user meets, and --repeat gives medians of those.
Needs fio and root (to drop the page cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import shutil
import subprocess
import sys
import tempfile
import time

from engine_proc import engine_pid, stop_engine
from page_cache import drop_caches

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_shim"))

HEADER = 4096


FIO = "fio"


def remove_blocks(store_dir: str) -> None:
    """Deletes the stored block files (64 hex digits) under store_dir, nothing else."""
    for root, _, files in os.walk(store_dir):
        for f in files:
            if len(f) == 64 and all(c in "0123456789abcdef" for c in f):
                os.unlink(os.path.join(root, f))


def fio(directory: str, rw: str, file_bytes: int, nblocks: int, threads: int) -> float:
    per_job = -(-nblocks // threads) * file_bytes
    out = subprocess.run(
        [
            FIO,
            "--name=ucm",
            f"--directory={directory}",
            f"--rw={rw}",
            f"--bs={file_bytes}",
            f"--size={per_job}",
            f"--numjobs={threads}",
            "--direct=1",
            "--ioengine=psync",
            "--group_reporting",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return (job["write"] if rw == "write" else job["read"])["bw_bytes"] / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--block-mib", default="4,16")
    ap.add_argument("--threads", default="8,32")
    ap.add_argument("--shapes", default="big,small")
    ap.add_argument(
        "--memory", default="shared", help="shared (register_memory: used in place) and/or private (staged by the shim)"
    )
    ap.add_argument("--fio", default="fio", help="the fio binary (default: fio on PATH)")
    ap.add_argument(
        "--host-cache",
        default="0",
        help="hostCacheBytes of the engine (the Cache stage; default 0: none). With it, dumps gather into the "
        "tier and the loads that follow are tier hits, not cold reads",
    )
    ap.add_argument(
        "--cold-tier",
        action="store_true",
        help="with --host-cache: a new engine (an empty Cache stage) for each load, so every load reads the "
        "directory into the stage's buffers: cold loads through the Cache stage",
    )
    ap.add_argument(
        "--fresh-store",
        action="store_true",
        help="a new NfsStore (a new engine, a new staging pool in the shim) for every case of every round, so "
        "each figure is a store's first use: what a user's first 2 GiB sees",
    )
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds per case (fio, then the store, each round); medians reported"
    )
    a = ap.parse_args()
    global FIO
    FIO = a.fio
    os.environ.setdefault("UCM_TASK_LINES", "0")  # the per-task log lines would flood the table
    if a.cold_tier and a.host_cache in ("", "0"):
        print("store_bench: --cold-tier needs --host-cache (the Cache stage's size)", file=sys.stderr)
        return 2
    import torch

    from ucm.client import EngineClient
    from ucm.store import NfsStore

    if shutil.which(FIO) is None:
        print(f"store_bench: {FIO} not found (apt-get install fio, or --fio PATH)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="ucm-store-bench-", dir=os.path.abspath(a.dir))
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
                    "maxInflightBytes": "64GiB",
                    "maxQueueMs": 0,
                    "loadTimeoutMs": 600000,
                    "clientTimeoutMs": 60000,
                    "hostCacheBytes": a.host_cache,
                }
                store = NfsStore(flat, namespace="bench")
                cells: dict[str, list[tuple[float, float, float, float, bool, bool]]] = {}
                try:
                    if "shared" in a.memory.split(","):
                        store.register_memory([src, dst])
                    for rep in range(a.repeat):
                        # fio and the store take turns, so that a slow patch of the disk touches both
                        fdir = os.path.join(base, "fio")
                        os.makedirs(fdir)
                        fw = fio(fdir, "write", block + HEADER, n, threads)
                        drop_caches()
                        fr = fio(fdir, "read", block + HEADER, n, threads)
                        shutil.rmtree(fdir)
                        for memory in a.memory.split(","):
                            if a.fresh_store and (rep > 0 or memory != a.memory.split(",")[0]):
                                pid = engine_pid(sock)
                                store.close()
                                stop_engine(pid, 5)
                                store = NfsStore(flat, namespace="bench")
                                if "shared" in a.memory.split(","):
                                    store.register_memory([src, dst])
                            if memory == "shared":
                                s_t, d_t = src, dst
                            else:
                                s_t, d_t = src.clone(), dst.clone()  # ordinary CPU tensors: the shim stages them
                            for shape in a.shapes.split(","):
                                ks = [f"{shape}-{memory}-{mib}-{threads}-{rep}-{i}".encode()[:64] for i in range(n)]
                                groups = (
                                    [list(range(n))]
                                    if shape == "big"
                                    else [list(range(i, min(n, i + 8))) for i in range(0, n, 8)]
                                )
                                t0 = time.perf_counter()
                                tasks = [
                                    store.dump([ks[i] for i in g], [0] * len(g), [s_t[i] for i in g]) for g in groups
                                ]
                                failed = sum(store.wait(t) for t in tasks)
                                store.commit(ks)
                                dump = n * block / (time.perf_counter() - t0) / 1e9
                                if a.cold_tier:
                                    pid = engine_pid(sock)
                                    store.close()
                                    stop_engine(pid, 5)  # its files are written: the dump was answered
                                    store = NfsStore(flat, namespace="bench")
                                    if "shared" in a.memory.split(","):
                                        store.register_memory([src, dst])
                                cold = drop_caches()
                                d_t.zero_()
                                t0 = time.perf_counter()
                                tasks = [
                                    store.load([ks[i] for i in g], [0] * len(g), [d_t[i] for i in g]) for g in groups
                                ]
                                failed += sum(store.wait(t) for t in tasks)
                                load = n * block / (time.perf_counter() - t0) / 1e9
                                exact = failed == 0 and torch.equal(s_t, d_t)
                                if a.cold_tier:
                                    # Not cold if the new engine's stage served any of it.
                                    tier = EngineClient(f"ipc://{sock}", 3000).raw("stats")["tier"]
                                    cold = cold and tier["hits"] == 0
                                cells.setdefault(f"{shape}/{memory}", []).append((dump, fw, load, fr, exact, cold))
                                print(
                                    f"{mib:g} MiB x {n}, {threads} threads, {shape}, {memory}, round {rep + 1}: dump {dump:.2f} GB/s "
                                    f"(fio {fw:.2f}), load {load:.2f} GB/s (fio {fr:.2f}){'' if exact else ' NOT BYTE-EXACT'}",
                                    flush=True,
                                )
                                remove_blocks(store_dir)  # the disk holds one case at a time
                finally:
                    pid = engine_pid(sock)
                    store.close()
                    stop_engine(pid, 5)
                    shutil.rmtree(store_dir, ignore_errors=True)
                for shape_mem, runs in cells.items():
                    med = [statistics.median(r[k] for r in runs) for k in range(4)]
                    rows.append((mib, threads, shape_mem, *med, all(r[4] for r in runs), all(r[5] for r in runs)))
            del src, dst
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        keys = (
            "block_mib",
            "threads",
            "shape_memory",
            "dump_GBps",
            "fio_write_GBps",
            "load_GBps",
            "fio_read_GBps",
            "byte_exact",
            "cold",
        )
        with open(a.json, "w") as f:
            json.dump(
                {"dir": os.path.abspath(a.dir), "gib": a.gib, "rows": [dict(zip(keys, r)) for r in rows]}, f, indent=1
            )
    print()
    print(
        "| block | threads | tasks | memory | dump GB/s | fio write | dump / fio | load GB/s (cold) | fio read | load / fio | byte-exact |"
    )
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for mib, threads, shape_mem, dump, fw, load, fr, exact, cold in rows:
        shape, memory = shape_mem.split("/")
        print(
            f"| {mib:g} MiB | {threads} | {'one of all blocks' if shape == 'big' else '8 blocks each'} | {memory} | {dump:.2f} | {fw:.2f} | "
            f"{100 * dump / fw:.0f} % | {load:.2f}{'' if cold else ' (warm!)'} | {fr:.2f} | {100 * load / fr:.0f} % | {'yes' if exact else 'NO'} |"
        )
    return 0 if all(r[7] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
