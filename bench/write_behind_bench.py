"""Dumps into the Cache stage with write-behind while the directory is far
slower than memory (issue 27), through the public API.

    python bench/write_behind_bench.py [--gib 1] [--block-mib 4,16] [--threads 8,32]
                                       [--write-mbps 200] [--prepare | --block-size] [--warm-rounds 3] [--json FILE]

Needs root: the directory is an ext4 on a loop device (test/python/slow_disk.py)
whose writes by the engine the blkio cgroup throttles to --write-mbps: that
rate is the directory's physical limit in this run, far below the memory's.
For each block size and thread count:

- the limit for a dump: torch's copy of the same bytes between two host
  tensors with torch.set_num_threads(threads);
- Cache|Posix: ucm.store.NfsStore from UCM's flat dict (store_pipeline
  "Cache|Posix", cache_buffer_capacity_gb sized for every block, so
  write-behind is on by default) dumps every block from CPU tensors in shared
  memory and commits them, timed from the call to the end of the commit;
  first into a cold tier (the first dump after the engine started), then
  --warm-rounds times (3) into a warm one (the round before's buffers
  reused), each warm round right after a torch copy of the same bytes: the
  ratio is taken round by round and its median reported, as the copy itself
  moves by a third from one moment to the next on a shared VM. With --prepare, one block is
  dumped first and the bench waits until the engine has prepared the Cache
  stage's memory for that block size (its filling thread: host_tier.h), as
  a server's first requests leave it prepared for the ones after. With
  --block-size, the store is opened with block_size (as UcmNfsStore with
  kv_block_size is): the engine prepares the stage from the store's opening,
  and the first dump follows at once, racing the preparation;
- the write-behind that follows: from the dump's start until the engine's
  own figures (`stats`, tier.unwritten) say every file is written; how busy
  it kept the directory is the bytes the cgroup counted written to the
  device divided by what the throttle allows in that time (goal: 90 %);
- another engine (the first one stopped: the launcher runs one engine a
  directory), without a Cache stage, loads every block from its file, page
  cache dropped, byte-exact: what a second node would find;
- Posix alone (no Cache stage, a dump answered once its file is written)
  under the same throttle, for contrast.

Each timed dump also reports how long this process's own garbage collector
ran inside it (the caller's cost, not the store's: a full collection of the
objects torch leaves at import took 65-75 ms on the 2-core VM, as long as
the copy of 1 GiB). With --freeze-gc the bench does what vLLM's engine
does after startup (gc.collect, then gc.freeze: vllm/v1/engine/core.py), so
only objects made since are ever visited.

Prints one table; the ratios are dump / copy (goal: 0.8, as for loads from
the tier) and the directory's busy share.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))
sys.path.insert(0, os.path.join(ROOT, "test", "python"))

from engine_proc import engine_pid, stop_engine  # noqa: E402
from page_cache import drop_caches  # noqa: E402


def written_bytes(cgroup: str, dev: str) -> int:
    """Bytes the cgroup's processes wrote to `dev` (blkio's throttle counters)."""
    with open(f"{cgroup}/blkio.throttle.io_service_bytes") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] == dev and parts[1] == "Write":
                return int(parts[2])
    return 0


class GcClock:
    """Milliseconds this process's garbage collector ran since the last reset."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._t) * 1e3

    def take(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--block-mib", default="4,16")
    ap.add_argument("--threads", default="8,32")
    ap.add_argument("--write-mbps", type=float, default=200.0, help="the directory's write limit, MB/s (1e6 bytes)")
    ap.add_argument("--no-posix", action="store_true", help="leave out the Posix-alone contrast")
    ap.add_argument(
        "--prepare", action="store_true", help="one block dumped first, then wait until the Cache stage is prepared"
    )
    ap.add_argument(
        "--block-size", action="store_true", help="open the store with block_size, then dump at once (no wait)"
    )
    ap.add_argument(
        "--freeze-gc", action="store_true", help="gc.collect() and gc.freeze() before timing, as vLLM's engine does"
    )
    ap.add_argument(
        "--warm-rounds",
        type=int,
        default=3,
        help="warm rounds after the cold one, each right after a torch copy of the same bytes (medians reported)",
    )
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    if a.prepare and a.block_size:
        ap.error("--prepare and --block-size measure different starts: give one")
    os.environ.setdefault("UCM_TASK_LINES", "0")
    import torch

    from slow_disk import MISSING, SlowDisk
    from ucm.client import EngineClient
    from ucm.store import NfsStore

    if MISSING is not None:
        print(f"write_behind_bench: needs a throttled disk: {MISSING}", file=sys.stderr)
        return 2
    rate = int(a.write_mbps * 1e6)
    clock = GcClock()
    work = tempfile.mkdtemp(prefix="ucm-wb-bench-")
    os.chmod(work, 0o700)
    nrounds = 1 + max(1, a.warm_rounds)
    disk = SlowDisk(mib=int(a.gib * 1024 * (nrounds + 0.5)) + 512)  # every round's files stay, for the second engine
    rows = []
    try:
        for mib in [float(x) for x in a.block_mib.split(",")]:
            block = int(mib * 2**20)
            n = max(8, int(a.gib * 2**30) // block)
            src = torch.randint(0, 256, (n, block), dtype=torch.uint8).share_memory_()
            dst = torch.zeros((n, block), dtype=torch.uint8).share_memory_()
            for threads in [int(x) for x in a.threads.split(",")]:
                store_dir = os.path.join(disk.mnt, "kv")
                os.makedirs(store_dir, mode=0o700)
                sock = os.path.join(work, "e.sock")
                common = {
                    "storage_backends": store_dir,
                    "transferStreamNumber": threads,
                    "endpoint": f"ipc://{sock}",
                    "maxInflightBytes": "64GiB",
                    "maxQueueMs": 0,
                    "loadTimeoutMs": 600000,
                    "clientTimeoutMs": 60000,
                    "shutdownTimeoutS": 600,
                }
                rounds = [[f"wb-{mib}-{threads}-{r}-{i}".encode() for i in range(n)] for r in range(nrounds)]
                keys = rounds[-1]
                row: dict = {"block_mib": mib, "threads": threads, "blocks": n, "write_limit_MBps": rate / 1e6}

                # The loop device's backing file goes through the host's page cache: what the case before
                # wrote is flushed now, not while this one runs.
                drop_caches()
                torch.set_num_threads(threads)
                dst.zero_()
                t0 = time.perf_counter()
                dst.copy_(src)
                row["copy_GBps_first"] = n * block / (time.perf_counter() - t0) / 1e9
                copies: list[float] = []  # torch's copy before each warm round
                warm: list[dict] = []

                # Room for one round and a little: the second round's blocks take the buffers of the
                # first's (written by then, so evicted, not shed), as on a server whose tier is full.
                cache_gb = n * (block + 4096) * 1.1 / 2**30
                store = NfsStore(
                    {**common, "store_pipeline": "Cache|Posix", "cache_buffer_capacity_gb": round(cache_gb, 3)},
                    namespace="wb",
                    block_size=block if a.block_size else None,
                )
                pid = engine_pid(sock)
                disk.admit(pid)
                disk.throttle(write_bps=rate)
                stats = EngineClient(f"ipc://{sock}", 10000)
                try:
                    store.register_memory([src, dst])
                    if a.prepare:
                        t0 = time.perf_counter()
                        store.wait(store.dump([b"prepare"], [0], [src[0]]))
                        store.commit([b"prepare"])
                        # Prepared: every buffer the capacity holds made (two blocks' slack for rounding).
                        while time.perf_counter() - t0 < 30:
                            tier = stats.raw("stats")["tier"]
                            if tier["usedBytes"] + 2 * (block + 4096) > tier["capacityBytes"]:
                                break
                            time.sleep(0.05)
                        row["prepared_s"] = time.perf_counter() - t0
                    if a.freeze_gc:
                        gc.collect()
                        gc.freeze()
                    for r, rkeys in enumerate(rounds):
                        os.sync()  # the loop device's backing file: the round before flushed now, not during this one
                        if r > 0:
                            # The limit, taken right before this round: torch's copy moves by a third from one
                            # moment to the next on a shared VM, so each warm dump is set against its own.
                            t0 = time.perf_counter()
                            dst.copy_(src)
                            copies.append(n * block / (time.perf_counter() - t0) / 1e9)
                        before = written_bytes(disk.cgroup, disk.dev)
                        clock.take()
                        t0 = time.perf_counter()
                        failed = store.wait(store.dump(rkeys, [0] * n, [src[i] for i in range(n)]))
                        committed = store.commit(rkeys)
                        dump_s = time.perf_counter() - t0
                        gc_ms = clock.take()
                        unwritten = stats.raw("stats")["tier"]["unwritten"]
                        while True:
                            tier = stats.raw("stats")["tier"]
                            if tier["unwritten"] == 0:
                                break
                            time.sleep(0.01)
                        drain_s = time.perf_counter() - t0
                        wrote = written_bytes(disk.cgroup, disk.dev) - before
                        measured = {
                            "dump_GBps": n * block / dump_s / 1e9,
                            "dump_failed": failed,
                            "caller_gc_ms": gc_ms,
                            "committed": sum(1 for c in committed if c),
                            "unwritten_at_answer": unwritten,
                            "drain_s": drain_s,
                            "device_written_bytes": wrote,
                            "busy": wrote / (rate * drain_s),
                        }
                        if r == 0:
                            row.update({f"{k}_cold": v for k, v in measured.items()})
                        else:
                            measured["ratio"] = measured["dump_GBps"] / copies[-1]
                            warm.append(measured)
                    # Each warm figure the median of its rounds; failures summed, the caller's GC its worst.
                    for k in (
                        "dump_GBps",
                        "committed",
                        "unwritten_at_answer",
                        "drain_s",
                        "device_written_bytes",
                        "busy",
                    ):
                        row[f"{k}_warm"] = statistics.median(w[k] for w in warm)
                    row["dump_failed_warm"] = sum(w["dump_failed"] for w in warm)
                    row["caller_gc_ms_warm"] = max(w["caller_gc_ms"] for w in warm)
                    row["warm_ratio"] = statistics.median(w["ratio"] for w in warm)
                    row["warm_ratio_rounds"] = [w["ratio"] for w in warm]
                    row["dump_GBps_warm_rounds"] = [w["dump_GBps"] for w in warm]
                    row["copy_GBps_rounds"] = copies
                    row["copy_GBps"] = statistics.median(copies)
                    row.update(written_behind=tier["written"], shed=tier["shed"], write_failed=tier["writeFailed"])
                finally:
                    stats.close()
                    store.close()
                    stop_engine(pid)
                    disk.throttle(write_bps=0)

                # Another engine, no Cache stage, over the files alone.
                drop_caches()
                plain = NfsStore({**common, "store_pipeline": "Posix"}, namespace="wb")
                pid = engine_pid(sock)
                try:
                    dst.zero_()
                    plain.register_memory([src, dst])
                    found = 0
                    exact = True
                    for rkeys in rounds:
                        dst.zero_()
                        found += sum(1 for f in plain.lookup(rkeys) if f)
                        t0 = time.perf_counter()
                        failed = plain.wait(plain.load(rkeys, [0] * n, [dst[i] for i in range(n)]))
                        row["second_engine_load_GBps"] = n * block / (time.perf_counter() - t0) / 1e9
                        exact = exact and failed == 0 and torch.equal(src, dst)
                    row["second_engine_found"] = found
                    row["second_engine_byte_exact"] = exact
                finally:
                    plain.close()
                    stop_engine(pid)
                shutil.rmtree(store_dir, ignore_errors=True)

                if not a.no_posix:
                    os.makedirs(store_dir, mode=0o700)
                    posix = NfsStore({**common, "store_pipeline": "Posix"}, namespace="wb")
                    pid = engine_pid(sock)
                    disk.admit(pid)
                    disk.throttle(write_bps=rate)
                    try:
                        posix.register_memory([src, dst])
                        pkeys = [k + b"-p" for k in keys]
                        t0 = time.perf_counter()
                        failed = posix.wait(posix.dump(pkeys, [0] * n, [src[i] for i in range(n)]))
                        posix.commit(pkeys)
                        row["posix_dump_GBps"] = n * block / (time.perf_counter() - t0) / 1e9
                        row["posix_dump_failed"] = failed
                    finally:
                        posix.close()
                        stop_engine(pid)
                        disk.throttle(write_bps=0)
                    shutil.rmtree(store_dir, ignore_errors=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del src, dst
    finally:
        disk.close()
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gib": a.gib, "cpus": os.cpu_count(), "freeze_gc": a.freeze_gc, "rows": rows}, f, indent=1)
    print()
    print(
        f"| block | threads | host copy GB/s, median | dump GB/s, tier {'prepared (in s)' if a.prepare else 'opened with block_size' if a.block_size else 'cold'} | dump GB/s, tier warm, median | warm dump / copy, median (each round) | "
        "caller's GC in the dump, ms (cold, warm) | directory limit MB/s | written behind in s (cold, warm) | directory busy (cold, warm) | shed | "
        "another engine: found, byte-exact | Posix alone dump GB/s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        posix = f"{r['posix_dump_GBps']:.3f}" if "posix_dump_GBps" in r else "-"
        print(
            f"| {r['block_mib']:g} MiB | {r['threads']} | {r['copy_GBps']:.2f} | {r['dump_GBps_cold']:.2f}"
            f"{' (%.1f)' % r['prepared_s'] if 'prepared_s' in r else ''} | "
            f"{r['dump_GBps_warm']:.2f} | {100 * r['warm_ratio']:.0f} % ({', '.join('%.0f' % (100 * x) for x in r['warm_ratio_rounds'])}) | "
            f"{r['caller_gc_ms_cold']:.0f}, {r['caller_gc_ms_warm']:.0f} | "
            f"{r['write_limit_MBps']:.0f} | {r['drain_s_cold']:.2f}, {r['drain_s_warm']:.2f} | "
            f"{100 * r['busy_cold']:.0f} %, {100 * r['busy_warm']:.0f} % | {r['shed']} | "
            f"{r['second_engine_found']} of {nrounds * r['blocks']}, {'yes' if r['second_engine_byte_exact'] else 'NO'} | {posix} |"
        )
    ok = all(
        r["dump_failed_cold"] == 0
        and r["dump_failed_warm"] == 0
        and r["second_engine_byte_exact"]
        and r["second_engine_found"] == nrounds * r["blocks"]
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
