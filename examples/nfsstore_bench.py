"""Throughput of the store through UCM's own store interface, the way UCM's NFS
store scripts measure it (test/ of UCM: nfsstore_embed_fetch*.py): for each
transfer stream count and I/O mode, a fresh process builds
ucm.store.nfsstore.nfsstore_connector.UcmNfsStore from UCM's flat config,
allocates fresh per-layer KV caches each round, embeds a batch of blocks
(create, dump, wait, commit), fetches them into fresh caches and checks every
byte. The first round warms up and is not counted. Written for this package;
no UCM code.

    .venv/bin/python examples/nfsstore_bench.py --dir /mnt/nfs/kv
    .venv/bin/python examples/nfsstore_bench.py --dir /tmp/kv --streams 4,16,32 --direct off,on --memory private,shared

--memory private: caches from torch.empty (what UCM's scripts do); the store
copies them through its shared-memory staging. shared: caches allocated in
shared memory, which the engine reads and writes in place (how the vLLM
connector's KV cache is held). Each run starts its own engine, replacing the
previous (idle) one, as UCM's script does with its stream counts. Exit code 1
if any byte differs or any block failed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import secrets
import sys
import time


def _caches(layers: int, kv: int, blocks: int, block_len: int, heads: int, head_size: int, shared: bool):
    """Per-layer caches [kv, blocks, block_len, heads, head_size] in fp16, each
    4 KiB-aligned inside a padded byte storage (as UCM's script allocates)."""
    import torch

    out = []
    shape = [kv, blocks, block_len, heads, head_size]
    nbytes = math.prod(shape) * 2
    for _ in range(layers):
        raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
        if shared:
            raw.share_memory_()
        skip = (-raw.data_ptr()) % 4096
        out.append(raw[skip : skip + nbytes].view(torch.float16).view(shape))
    return out


def _entries(hashes, caches, kv):
    ids, offsets, tensors = [], [], []
    for i, h in enumerate(hashes):
        off = 0
        for layer in caches:
            for k in range(kv):
                t = layer[k][i]
                ids.append(h)
                offsets.append(off)
                tensors.append(t)
                off += t.numel() * t.element_size()
    return ids, offsets, tensors


def run(a: dict) -> dict:
    """One configuration, in its own process: averages of rounds 2..n."""
    import torch

    from ucm.store.nfsstore.nfsstore_connector import UcmNfsStore

    kv = 1 if a["mla"] else 2
    blocks = a["tokens"] // a["block_len"]
    io_size = a["block_len"] * a["heads"] * a["head_size"] * 2
    block_bytes = io_size * a["layers"] * kv
    store = UcmNfsStore(
        {
            "storage_backends": a["dir"],
            "kv_block_size": block_bytes,
            "io_size": io_size,
            "role": "worker",
            "device": 0,
            "stream_number": a["streams"],
            "use_direct": a["direct"],
        }
    )
    threads = store.store.client.raw("stats").get("transferThreads")
    writes, reads, exact, failed = [], [], True, 0
    for r in range(a["rounds"]):
        hashes = [secrets.token_hex(16) for _ in range(blocks)]
        src = _caches(a["layers"], kv, blocks, a["block_len"], a["heads"], a["head_size"], a["shared"])
        for t in src:
            t.copy_(torch.randn(t.shape, dtype=torch.float32).to(torch.float16))
        failed += sum(1 for x in store.create(hashes) if x != 0)
        ids, offs, tens = _entries(hashes, src, kv)
        t0 = time.perf_counter()
        task = store.dump(ids, offs, tens)
        failed += store.wait(task)
        store.commit(hashes, True)
        w = time.perf_counter() - t0
        dst = _caches(a["layers"], kv, blocks, a["block_len"], a["heads"], a["head_size"], a["shared"])
        ids, offs, tens = _entries(hashes, dst, kv)
        t0 = time.perf_counter()
        found = store.lookup(hashes)
        failed += found.count(False)
        task = store.load(ids, offs, tens)
        failed += store.wait(task)
        rd = time.perf_counter() - t0
        exact = exact and all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(src, dst))
        if r > 0 or a["rounds"] == 1:
            writes.append(w)
            reads.append(rd)
    store.close()
    total = block_bytes * blocks
    return {
        **a,
        "threads": threads,
        "blocks": blocks,
        "block_bytes": block_bytes,
        "bytes": total,
        "write_s": sum(writes) / len(writes),
        "read_s": sum(reads) / len(reads),
        "write_gbs": total / (sum(writes) / len(writes)) / 1e9,
        "read_gbs": total / (sum(reads) / len(reads)) / 1e9,
        "exact": exact,
        "failed": failed,
    }


def _child(q, a):
    try:
        q.put(("ok", run(a)))
    except Exception as e:  # noqa: BLE001 - reported by the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="storage directory (storage_backends)")
    p.add_argument("--streams", default="8,32", help="transfer stream counts, comma-separated")
    p.add_argument("--direct", default="off,on", help="O_DIRECT (use_direct): off, on or both")
    p.add_argument("--memory", default="private,shared", help="private (staged) and/or shared (in place)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (blocks = tokens / block-len)")
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=4, help="KV heads per rank")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--mla", action="store_true", help="one latent per layer (kv = 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration; the first is not counted")
    p.add_argument("--json", help="write the results here as well")
    p.add_argument("--keep-engine", action="store_true", help="leave the engine running afterwards")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    results = []
    for memory in args.memory.split(","):
        for direct in args.direct.split(","):
            for streams in (int(s) for s in args.streams.split(",")):
                a = {
                    "dir": os.path.abspath(args.dir),
                    "streams": streams,
                    "direct": direct == "on",
                    "shared": memory == "shared",
                    "tokens": args.tokens,
                    "block_len": args.block_len,
                    "layers": args.layers,
                    "heads": args.heads,
                    "head_size": args.head_size,
                    "mla": args.mla,
                    "rounds": args.rounds,
                }
                q = ctx.Queue()
                proc = ctx.Process(target=_child, args=(q, a))
                proc.start()
                status, res = q.get()
                proc.join()
                if status != "ok":
                    print(res, file=sys.stderr)
                    return 1
                results.append(res)
                print(
                    f"streams {streams:>3}  O_DIRECT {'on ' if res['direct'] else 'off'}  memory {memory:<7}  "
                    f"{res['blocks']} blocks x {res['block_bytes'] / 2**20:.2f} MiB  write {res['write_gbs']:.2f} GB/s  "
                    f"read {res['read_gbs']:.2f} GB/s  {'byte-exact' if res['exact'] else 'BYTES DIFFER'}"
                    + (f"  {res['failed']} failed" if res["failed"] else ""),
                    flush=True,
                )
    print()
    print("| transfer streams | O_DIRECT | memory | write GB/s | read GB/s | byte-exact |")
    print("| ---: | --- | --- | ---: | ---: | --- |")
    for r in results:
        print(
            f"| {r['streams']} | {'on' if r['direct'] else 'off'} | {'shared' if r['shared'] else 'private'} | "
            f"{r['write_gbs']:.2f} | {r['read_gbs']:.2f} | {'yes' if r['exact'] and not r['failed'] else 'NO'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.keep_engine:  # the last run's engine: a benchmark leaves nothing running
        import signal

        from ucm.config import default_endpoint
        from ucm.launcher import health

        h = health(default_endpoint(os.path.abspath(args.dir)), 2000)
        if h and h.get("pid"):
            os.kill(h["pid"], signal.SIGTERM)
    return 0 if all(r["exact"] and not r["failed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
