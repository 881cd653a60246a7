"""GPU validation of the CUDA backend, in one command, on a machine with NVIDIA GPUs.

    python bench/gpu_validate.py [--dir /dev/shm/ucm-gpu] [--layers 32] [--blocks 128]
                                 [--block-tokens 128] [--kv-heads 8] [--head-size 128]
                                 [--threads 32] [--methods kernel,batch] [--gpus all]

What it does, with the real engine process (node dist/core/cli.js) and the
real shim pieces (ucm.client, ucm.memory):

1. Allocates, on every GPU used, a KV cache shaped like vLLM's on CUDA: one
   bf16 tensor per layer of shape (2, num_blocks, block_tokens, kv_heads,
   head_size), K and V on the leading axis, so a block is 2 x layers shards.
2. Registers them with the engine through CUDA IPC handles (one region per
   layer tensor, each on its own device) and an interprocess event per device.
3. Ordering check: overwrites the source blocks with a kernel and dumps right
   away, without synchronizing; the dump carries the event, so the stored
   bytes must be the new ones.
4. Dumps every block (D2S), loads them into a second, zeroed KV cache (S2D)
   and compares byte for byte (torch.equal per layer).
5. Measures D2S and S2D GB/s per copy method beside torch's own pinned-copy
   bandwidth (one large cudaMemcpyAsync device->pinned and back, measured in
   the same run), and prints the ratio. Goal: at least 90 % with fast storage
   (the default directory is tmpfs).

Writes bench/results/gpu_validate.json and prints a markdown table. Exit
code 0 when every check passed, 1 when a check failed, 2 when there is no GPU.
The engine is found as `node` on PATH, or --node.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/dev/shm/ucm-gpu-validate", help="storage directory (default: tmpfs)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--blocks", type=int, default=128, help="blocks per GPU")
    p.add_argument("--block-tokens", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=32, help="transferStreamNumber")
    p.add_argument("--methods", default="kernel,batch", help="cudaCopy methods to measure")
    p.add_argument("--gpus", default="all", help="how many GPUs to use (default: all visible)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per direction")
    p.add_argument("--node", default=shutil.which("node") or "node")
    p.add_argument("--engine", default=os.path.join(ROOT, "dist", "core", "cli.js"), help="the engine's cli.js")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_validate.json"))
    return p.parse_args()


def start_engine(node: str, cli: str, workdir: str, storage: str, threads: int, method: str, pinned: int):
    cfg = os.path.join(workdir, f"ucm-{method}.yaml")
    sock = os.path.join(workdir, f"e-{method}.sock")
    with open(cfg, "w") as f:
        f.write("ucm_connector_name: UcmNfsStore\nucm_connector_config:\n"
                f"  storage_backends: {storage}\n  transferStreamNumber: {threads}\n  endpoint: ipc://{sock}\n"
                f"  cudaCopy: {method}\n  pinnedStagingBytes: {pinned}\n  maxInflightBytes: 1TiB\n  maxQueueMs: 0\n"
                "  lookupCacheTtlS: 0\n  logLevel: warn\n")
    log = open(os.path.join(workdir, f"engine-{method}.log"), "w+")
    proc = subprocess.Popen([node, cli, "serve", "--config", cfg, "--log-level", "info"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        log.seek(0)
        text = log.read()
        if "listening on" in text:
            return proc, f"ipc://{sock}", text
        if proc.poll() is not None:
            raise SystemExit(f"engine exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("engine did not start within 30 s")


def main() -> int:
    a = parse()
    import torch

    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device visible to torch; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    from ucm.client import EngineClient
    from ucm.memory import RegionRegistry, ShardList

    ngpu = torch.cuda.device_count() if a.gpus == "all" else min(int(a.gpus), torch.cuda.device_count())
    devices = [torch.device("cuda", i) for i in range(ngpu)]
    shard = a.block_tokens * a.kv_heads * a.head_size * 2  # bf16
    per_block = 2 * a.layers * shard
    pinned = max(per_block + 8192, 1 << 20) * a.threads  # every thread's share holds one block
    shape = (2, a.blocks, a.block_tokens, a.kv_heads, a.head_size)
    print(f"{ngpu} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"KV cache per GPU: {a.layers} layers x {shape} bf16; block = {2 * a.layers} shards of {shard // 1024} KiB = "
          f"{per_block / 2**20:.1f} MiB; {a.blocks} blocks = {a.blocks * per_block / 2**30:.2f} GiB per GPU")

    src = {d: [torch.randn(shape, device=d, dtype=torch.float32).to(torch.bfloat16) for _ in range(a.layers)] for d in devices}
    dst = {d: [torch.zeros(shape, device=d, dtype=torch.bfloat16) for _ in range(a.layers)] for d in devices}
    torch.cuda.synchronize()

    # The physical limit: torch's own pinned copies, one big transfer each way.
    limit = {}
    for d in devices:
        dev_buf = torch.empty(a.blocks * per_block, dtype=torch.uint8, device=d)
        host = torch.empty(a.blocks * per_block, dtype=torch.uint8, pin_memory=True)
        for name, fn in (("D2H", lambda: host.copy_(dev_buf, non_blocking=True)), ("H2D", lambda: dev_buf.copy_(host, non_blocking=True))):
            fn()
            torch.cuda.synchronize(d)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize(d)
                times.append(time.perf_counter() - t)
            limit.setdefault(name, []).append(dev_buf.numel() / statistics.median(times) / 1e9)
        del dev_buf, host
    torch_d2h, torch_h2d = sum(limit["D2H"]), sum(limit["H2D"])  # GPUs copy in parallel
    print(f"torch pinned copy: D2H {torch_d2h:.2f} GB/s, H2D {torch_h2d:.2f} GB/s (all GPUs)")

    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ucm-gpu-")
    results = {"gpus": ngpu, "device": torch.cuda.get_device_name(0), "layers": a.layers, "blocks_per_gpu": a.blocks,
               "block_bytes": per_block, "shards_per_block": 2 * a.layers, "threads": a.threads, "dir": a.dir,
               "torch_pinned_d2h_GBps": torch_d2h, "torch_pinned_h2d_GBps": torch_h2d, "methods": {}}
    ok_all = True
    for method in [m for m in a.methods.split(",") if m]:
        storage = os.path.join(a.dir, method)
        shutil.rmtree(storage, ignore_errors=True)
        os.makedirs(storage)
        proc, endpoint, log = start_engine(a.node, a.engine, work, storage, a.threads, method, pinned)
        print(f"[{method}] engine: " + next((l for l in log.splitlines() if "CUDA backend" in l), "?"))
        try:
            c = EngineClient(endpoint, 60000, name="gpu-validate")
            c.ensure_session()
            regs = RegionRegistry(c)
            ns = {d: f"gpu-validate-{method}-{d.index}" for d in devices}
            for d in devices:
                c.call("namespace", ns=ns[d])

            def shards(tensors, blocks):
                sl = ShardList(2 * a.layers)
                located = [regs.locate(t) for t in tensors]
                for b in blocks:
                    for t, (rid, base) in zip(tensors, located):
                        for kv in range(2):
                            sl.add(rid, base + (kv * a.blocks + b) * shard, shard)
                return sl.wire()

            def keys(d, rnd):
                return [f"{method}:{d.index}:{rnd}:{b}".encode().ljust(32, b".")[:64] for b in range(a.blocks)]

            def run(op, cache, rnd):
                t0 = time.perf_counter()
                tasks = []
                for d in devices:
                    extra = {"commit": True, "event": regs.record_event(d)} if op == "dump" else {}
                    r = c.call(op, ns=ns[d], keys=keys(d, rnd), shards=shards(cache[d], range(a.blocks)), **extra)
                    tasks.append(r["task"])
                failed = 0
                for t in tasks:
                    r = c.call("wait", task=t, timeout_ms=120000, deadline_ms=130000)
                    failed += len(r.get("failed", [])) if r.get("done") else a.blocks
                return time.perf_counter() - t0, failed

            # Ordering: overwrite on the GPU and dump at once; the event orders them.
            for d in devices:
                with torch.cuda.device(d):
                    for layer in src[d]:
                        layer.mul_(-1)  # queued, not synchronized
            _, f0 = run("dump", src, "order")
            _, f1 = run("load", dst, "order")
            torch.cuda.synchronize()
            order_ok = f0 == 0 and f1 == 0 and all(torch.equal(x, y) for d in devices for x, y in zip(src[d], dst[d]))

            d2s, s2d, exact = [], [], True
            for rnd in range(a.repeat):
                for d in devices:
                    for layer in dst[d]:
                        layer.zero_()
                torch.cuda.synchronize()
                t, f = run("dump", src, rnd)
                d2s.append((ngpu * a.blocks * per_block) / t / 1e9)
                if f:
                    exact = False
                t, f = run("load", dst, rnd)
                s2d.append((ngpu * a.blocks * per_block) / t / 1e9)
                torch.cuda.synchronize()
                exact = exact and f == 0 and all(torch.equal(x, y) for d in devices for x, y in zip(src[d], dst[d]))
            stats = c.call("stats")
            c.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        m = {"order_ok": order_ok, "byte_exact": exact, "d2s_GBps": d2s, "s2d_GBps": s2d,
             "d2s_best": max(d2s), "s2d_best": max(s2d),
             "d2s_vs_torch": max(d2s) / torch_d2h, "s2d_vs_torch": max(s2d) / torch_h2d,
             "pinned_bytes": stats.get("pinnedBytes")}
        results["methods"][method] = m
        ok_all = ok_all and order_ok and exact
        shutil.rmtree(storage, ignore_errors=True)

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(f"| method | ordering | byte-exact | D2S GB/s (best of {a.repeat}) | vs torch D2H | S2D GB/s | vs torch H2D |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for method, m in results["methods"].items():
        print(f"| {method} | {'ok' if m['order_ok'] else 'FAILED'} | {'yes' if m['byte_exact'] else 'NO'} | {m['d2s_best']:.2f} | "
              f"{100 * m['d2s_vs_torch']:.0f} % | {m['s2d_best']:.2f} | {100 * m['s2d_vs_torch']:.0f} % |")
    print(f"\ntorch pinned copies: D2H {torch_d2h:.2f} GB/s, H2D {torch_h2d:.2f} GB/s; results in {a.out}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
