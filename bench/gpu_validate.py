"""GPU validation of the CUDA backend, in one command, on a machine with NVIDIA GPUs.

    python bench/gpu_validate.py [--dir /dev/shm/ucm-gpu] [--layers 32] [--blocks 128]
                                 [--block-tokens 128] [--kv-heads 8] [--head-size 128]
                                 [--runs batch:32,kernel:32,batch:8] [--gpus all]

With the real engine process (node dist/core/cli.js) and the real shim pieces
(ucm.client, ucm.memory, the connector's layout code), it checks, one
PASS/FAIL line each:

- handle: torch's exported CUDA IPC handle (66 bytes: version, type 'c',
  cudaIpcMemHandle_t) is parsed and the engine opens it;
- expandable: memory from expandable segments is refused by the shim with a
  clear reason (never sent to the engine, never an exception elsewhere);
- bus-id: regions name their GPU by PCI bus id and the engine (which sees
  every GPU) finds it; with two GPUs or more, a client that sees only its
  last GPU as "device 0" (CUDA_VISIBLE_DEVICES) still lands on it;
- ordering: a dump waits for the interprocess event of the kernel that
  wrote the blocks (the source is rewritten by a kernel queued, not
  synchronized, before the dump), and the engine's CPU time while it
  waits on a slow kernel stays small (no spinning);
- layouts: an HND-shaped cache and odd shard sizes round-trip byte-exact with
  the shard count the connector's layout code gives;
- event-timeout: a dump whose CUDA event does not complete within
  cudaEventTimeoutMs (a kernel still running) fails its blocks after that
  time, stores nothing, and the engine goes on serving GPU dumps;
- early-release: on the real disk, a dump says `released` (its bytes are in
  pinned host staging, the GPU blocks may be reused) before its writes are
  done; the GPU blocks are overwritten right then, and what is loaded back is
  what was there at the dump;
- byte-exact D2S/S2D of a vLLM-shaped bf16 cache (one tensor per layer,
  (2, blocks, tokens, kv_heads, head_size)) on every GPU;

and measures D2S and S2D GB/s per copy method and thread count, beside two
limits measured in the same run: torch's own pinned copies (one large
cudaMemcpyAsync each way), and the store's host path (the same engine, the
same blocks, from host shared memory instead of the GPU). Goal: 90 % of the
smaller of the two. The default directory is tmpfs.

Writes bench/results/gpu_validate.json and prints a markdown table. Exit
code 0 when every check passed, 1 when a check failed, 2 when there is no GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from page_cache import drop_caches

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHIM = os.path.join(ROOT, "python_shim")
sys.path.insert(0, SHIM)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/dev/shm/ucm-gpu-validate", help="storage directory (default: tmpfs)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--blocks", type=int, default=128, help="blocks per GPU")
    p.add_argument("--block-tokens", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument(
        "--runs", default="batch:32,kernel:32,batch:8", help="cudaCopy:transferStreamNumber pairs to measure"
    )
    p.add_argument("--gpus", default="all", help="how many GPUs to use (default: all visible)")
    p.add_argument(
        "--disk-dir",
        default=os.path.join(ROOT, ".ucm-gpu-disk"),
        help="a directory on a real disk for the disk run ('' to skip)",
    )
    p.add_argument("--disk-threads", default="32", help="transferStreamNumber values for the disk run, e.g. 16,32,64")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per direction")
    p.add_argument("--node", default=shutil.which("node") or "node")
    p.add_argument("--engine", default=os.path.join(ROOT, "dist", "core", "cli.js"), help="the engine's cli.js")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_validate.json"))
    return p.parse_args()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_limit(directory: str, threads: int, file_bytes: int, nfiles: int, odirect: bool) -> tuple[float, float]:
    """What the directory's filesystem does with our I/O shape and nothing else: `threads` threads writing
    (preallocated, as fio does by default) and then reading `nfiles` whole files of `file_bytes` (one
    write/read call each, like a block file), O_DIRECT when asked, page cache dropped before the reads when
    we may. (write GB/s, read GB/s)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    d = os.path.join(directory, ".limit")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    bufs = [mmap.mmap(-1, file_bytes) for _ in range(threads)]  # page aligned, as O_DIRECT wants
    chunk = os.urandom(1 << 20)
    for b in bufs:
        for off in range(0, file_bytes, 1 << 20):
            b[off : off + min(1 << 20, file_bytes - off)] = chunk[: min(1 << 20, file_bytes - off)]
    flag = getattr(os, "O_DIRECT", 0) if odirect else 0

    def write(t: int) -> None:
        for i in range(t, nfiles, threads):
            fd = os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC | flag, 0o600)
            try:
                os.posix_fallocate(fd, 0, file_bytes)  # as fio does by default, and the engine
                view, done = memoryview(bufs[t]), 0
                while done < file_bytes:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)

    def read(t: int) -> None:
        for i in range(t, nfiles, threads):
            fd = os.open(os.path.join(d, f"f{i}"), os.O_RDONLY | flag)
            try:
                done = 0
                while done < file_bytes:
                    n = os.preadv(fd, [memoryview(bufs[t])[done:]], done)
                    if n <= 0:
                        break
                    done += n
            finally:
                os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(write, range(threads)))
        tw = time.perf_counter() - t0
        drop_caches()
        t0 = time.perf_counter()
        list(pool.map(read, range(threads)))
        tr = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    total = nfiles * file_bytes
    return total / tw / 1e9, total / tr / 1e9


class Engine:
    """One engine process with its own config, started and stopped here."""

    def __init__(
        self,
        a: argparse.Namespace,
        work: str,
        name: str,
        storage: str,
        threads: int,
        method: str,
        pinned: int,
        extra: str = "",
    ):
        cfg = os.path.join(work, f"ucm-{name}.yaml")
        sock = os.path.join(work, f"e-{name}.sock")
        self.endpoint = f"ipc://{sock}"
        with open(cfg, "w") as f:
            f.write(
                "ucm_connector_name: UcmNfsStore\nucm_connector_config:\n"
                f"  storage_backends: {storage}\n  transferStreamNumber: {threads}\n  endpoint: ipc://{sock}\n"
                f"  cudaCopy: {method}\n  pinnedStagingBytes: {pinned}\n  maxInflightBytes: 1TiB\n  maxQueueMs: 0\n"
                "  lookupCacheTtlS: 0\n  logLevel: warn\n" + extra
            )
        self.log_path = os.path.join(work, f"engine-{name}.log")
        self.log = open(self.log_path, "w+")
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the engine sees every GPU, as the shim's launcher arranges
        self.proc = subprocess.Popen(
            [a.node, a.engine, "serve", "--config", cfg, "--log-level", "info"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            text = self.text()
            if "listening on" in text:
                self.banner = next((l for l in text.splitlines() if "CUDA backend" in l), "?")
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"engine exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        self.proc.kill()
        raise SystemExit("engine did not start within 30 s")

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, bool | None, str]] = []

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.rows.append((name, ok, detail))
        word = "PASS" if ok else ("SKIP" if ok is None else "FAIL")
        print(f"{word} {name}: {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(ok is not False for _, ok, _ in self.rows)


EXPANDABLE_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from ucm.memory import RegionRegistry, UnsupportedMemory
x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
try:
    RegionRegistry(None).export(x)
    print("EXPORTED")
except UnsupportedMemory as e:
    print("REFUSED", e)
"""

BUS_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from ucm.client import EngineClient
from ucm.memory import RegionRegistry
from ucm.shards import ShardList
endpoint, storage_ns = sys.argv[2], sys.argv[3]
c = EngineClient(endpoint, 60000, name="gpu-validate-child")
regs = RegionRegistry(c)
x = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
rid, base = regs.locate(x)
sl = ShardList(1)
sl.add(rid, base, x.numel() * 4)
r = c.call("dump", ns=storage_ns, keys=[b"bus-id-check".ljust(32, b".")], shards=sl.wire(), commit=True)
w = c.call("wait", task=r["task"], timeout_ms=60000)
print("CHILD", torch.cuda.get_device_properties(0).pci_bus_id, w.get("status"))
"""


def main() -> int:
    a = parse()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_validate: no CUDA device visible to torch; run this on a machine with an NVIDIA GPU", file=sys.stderr
        )
        return 2
    from ucm.client import EngineClient
    from ucm.integration.vllm.layout import block_runs
    from ucm.memory import RegionRegistry, cuda_ipc_handle
    from ucm.shards import ShardList

    checks = Checks()
    ngpu = torch.cuda.device_count() if a.gpus == "all" else min(int(a.gpus), torch.cuda.device_count())
    devices = [torch.device("cuda", i) for i in range(ngpu)]
    shard = a.block_tokens * a.kv_heads * a.head_size * 2  # bf16
    per_block = 2 * a.layers * shard
    shape = (2, a.blocks, a.block_tokens, a.kv_heads, a.head_size)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,pci.bus_id", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"{ngpu} GPU(s): {smi}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(
        f"KV cache per GPU: {a.layers} layers x {shape} bf16; block = {2 * a.layers} shards of {shard // 1024} KiB = "
        f"{per_block / 2**20:.1f} MiB; {a.blocks} blocks = {a.blocks * per_block / 2**30:.2f} GiB per GPU"
    )

    src = {
        d: [torch.randn(shape, device=d, dtype=torch.float32).to(torch.bfloat16) for _ in range(a.layers)]
        for d in devices
    }
    dst = {d: [torch.zeros(shape, device=d, dtype=torch.bfloat16) for _ in range(a.layers)] for d in devices}
    torch.cuda.synchronize()

    # Limit 1: torch's own pinned copies, one big transfer each way.
    limit = {}
    for d in devices:
        dev_buf = torch.empty(a.blocks * per_block, dtype=torch.uint8, device=d)
        host = torch.empty(a.blocks * per_block, dtype=torch.uint8, pin_memory=True)
        for name, fn in (
            ("D2H", functools.partial(host.copy_, dev_buf, non_blocking=True)),
            ("H2D", functools.partial(dev_buf.copy_, host, non_blocking=True)),
        ):
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

    # handle: torch's format, parsed by the shim.
    raw = bytes(src[devices[0]][0].untyped_storage()._share_cuda_()[1])
    try:
        parsed = cuda_ipc_handle(raw)
        checks.add(
            "handle",
            len(parsed) == 64 and raw[:2] == b"\x02c",
            f"torch exports {len(raw)} bytes (head {raw[:2]!r}); the shim sends the {len(parsed)}-byte cudaIpcMemHandle_t",
        )
    except Exception as e:  # noqa: BLE001
        checks.add("handle", False, f"{type(e).__name__}: {e}")

    # expandable: refused by the shim, with the reason.
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    out = subprocess.run(
        [sys.executable, "-c", EXPANDABLE_CHILD, SHIM], env=env, capture_output=True, text=True, timeout=300
    )
    line = (out.stdout.strip().splitlines() or [out.stderr.strip()[-300:]])[-1]
    checks.add("expandable", line.startswith("REFUSED") and "expandable" in line, line[:240])

    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ucm-gpu-")
    results = {
        "gpus": ngpu,
        "device": torch.cuda.get_device_name(0),
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "layers": a.layers,
        "blocks_per_gpu": a.blocks,
        "block_bytes": per_block,
        "shards_per_block": 2 * a.layers,
        "dir": a.dir,
        "torch_pinned_d2h_GBps": torch_d2h,
        "torch_pinned_h2d_GBps": torch_h2d,
        "runs": {},
    }

    def keys(tag: str, d: torch.device) -> list[bytes]:
        return [f"{tag}:{d.index}:{b}".encode().ljust(32, b".")[:64] for b in range(a.blocks)]

    def shards_for(regs: RegionRegistry, tensors, blocks) -> dict:
        sl = ShardList(2 * len(tensors))
        located = [regs.locate(t) for t in tensors]
        stride = a.block_tokens * a.kv_heads * a.head_size * 2
        for b in blocks:
            for t, (rid, base) in zip(tensors, located):
                for kv in range(2):
                    sl.add(rid, base + (kv * t.shape[1] + b) * stride, stride)
        return sl.wire()

    def transfer(
        c: EngineClient, op: str, ns: dict, cache, tag: str, regs: RegionRegistry, event: bool
    ) -> tuple[float, int]:
        t0 = time.perf_counter()
        tasks = []
        for d in devices:
            extra = {"commit": True} if op == "dump" else {}
            if op == "dump" and event:
                extra["event"] = regs.record_event(d)
            r = c.call(op, ns=ns[d], keys=keys(tag, d), shards=shards_for(regs, cache[d], range(a.blocks)), **extra)
            tasks.append(r["task"])
        failed = 0
        for t in tasks:
            r = c.call("wait", task=t, timeout_ms=120000, deadline_ms=130000)
            failed += len(r.get("failed", [])) if r.get("done") else a.blocks
        return time.perf_counter() - t0, failed

    def early_release(c: EngineClient, regs: RegionRegistry, ns: dict, threads: int) -> None:
        """A dump of as many blocks as staging shares: `check` says released once every block's bytes left the
        GPU, before the disk writes end. The blocks are overwritten on the GPU at that moment (vLLM reusing them
        for another request); the load must give back the bytes of the dump's time."""
        d0 = devices[0]
        n = min(threads, a.blocks)
        ek = keys("early", d0)[:n]
        before = [t[:, :n].clone() for t in src[d0]]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = c.call("dump", ns=ns[d0], keys=ek, shards=shards_for(regs, src[d0], range(n)), commit=True)
        t_rel = None
        while True:
            st = c.call("check", task=r["task"])
            if st.get("done"):
                break
            if st.get("released"):
                t_rel = time.perf_counter() - t0
                for t in src[d0]:
                    t[:, :n].fill_(0)
                torch.cuda.synchronize()
                break
            time.sleep(0.0005)
        w = c.call("wait", task=r["task"], timeout_ms=120000)
        t_done = time.perf_counter() - t0
        for t in dst[d0]:
            t[:, :n].zero_()
        torch.cuda.synchronize()
        r = c.call("load", ns=ns[d0], keys=ek, shards=shards_for(regs, dst[d0], range(n)))
        w2 = c.call("wait", task=r["task"], timeout_ms=120000)
        torch.cuda.synchronize()
        exact = (
            not w.get("failed")
            and not w2.get("failed")
            and all(torch.equal(x[:, :n], y) for x, y in zip(dst[d0], before))
        )
        for t, b in zip(src[d0], before):
            t[:, :n].copy_(b)
        torch.cuda.synchronize()
        if t_rel is None:
            checks.add(
                "early-release",
                None if exact else False,
                f"{n} blocks: the dump was done ({1000 * t_done:.0f} ms) before a check saw it released "
                f"(inconclusive); loaded byte-exact {exact}",
            )
        else:
            checks.add(
                "early-release",
                exact and t_rel < t_done,
                f"{n} blocks of {per_block >> 20} MiB to disk: released after {1000 * t_rel:.1f} ms, writes done after "
                f"{1000 * t_done:.1f} ms; the GPU blocks were zeroed at release and the load gave back the dump's "
                f"bytes: {exact}",
            )
        results["early_release"] = {"blocks": n, "released_s": t_rel, "done_s": t_done, "exact": exact}

    try:
        # Limit 2: the store's host path: same engine code, same block shape, host shared memory.
        storage = os.path.join(a.dir, "host")
        shutil.rmtree(storage, ignore_errors=True)
        os.makedirs(storage)
        threads0 = int(a.runs.split(",")[0].split(":")[1])
        eng = Engine(a, work, "host", storage, threads0, "batch", max(per_block + 8192, 1 << 20) * threads0)
        try:
            c = EngineClient(eng.endpoint, 60000, name="gpu-validate-host")
            regs = RegionRegistry(c)
            hsrc = {d: [t.cpu() for t in src[d]] for d in devices}
            hdst = {d: [torch.zeros_like(t) for t in hsrc[d]] for d in devices}
            ns = {d: f"gpu-validate-host-{d.index}" for d in devices}
            hd2s, hs2d = [], []
            for rnd in range(a.repeat):
                t, f = transfer(c, "dump", ns, hsrc, f"h{rnd}", regs, False)
                hd2s.append(ngpu * a.blocks * per_block / t / 1e9)
                t, f2 = transfer(c, "load", ns, hdst, f"h{rnd}", regs, False)
                hs2d.append(ngpu * a.blocks * per_block / t / 1e9)
            host_ok = f == 0 and f2 == 0 and all(torch.equal(x, y) for d in devices for x, y in zip(hsrc[d], hdst[d]))
            c.close()
            del hsrc, hdst
        finally:
            eng.stop()
        shutil.rmtree(storage, ignore_errors=True)
        host_d2s, host_s2d = max(hd2s), max(hs2d)
        print(
            f"store host path ({threads0} threads): D2S {host_d2s:.2f} GB/s, S2D {host_s2d:.2f} GB/s, byte-exact {host_ok}"
        )
        fs_w, fs_r = io_limit(a.dir, threads0, per_block + 4096, ngpu * a.blocks, odirect=False)
        print(
            f"filesystem of {a.dir} ({threads0} threads, one {per_block + 4096}-byte file per call): "
            f"write {fs_w:.2f} GB/s, read {fs_r:.2f} GB/s"
        )
        results.update(host_d2s_GBps=hd2s, host_s2d_GBps=hs2d, fs_write_GBps=fs_w, fs_read_GBps=fs_r)
        limit_d2s, limit_s2d = min(torch_d2h, fs_w), min(torch_h2d, fs_r)

        for run in [r for r in a.runs.split(",") if r]:
            method, threads = run.split(":")[0], int(run.split(":")[1])
            name = f"{method}-{threads}"
            storage = os.path.join(a.dir, name)
            shutil.rmtree(storage, ignore_errors=True)
            os.makedirs(storage)
            pinned = max(per_block + 8192, 1 << 20) * threads  # every thread's share holds one block
            eng = Engine(a, work, name, storage, threads, method, pinned)
            print(f"[{name}] engine: {eng.banner}")
            try:
                c = EngineClient(eng.endpoint, 60000, name="gpu-validate")
                regs = RegionRegistry(c)
                ns = {d: f"gpu-validate-{name}-{d.index}" for d in devices}
                first = not results["runs"]

                if first:
                    try:
                        # bus-id: the region spec carries the bus id, the engine resolved it (else register fails).
                        spec = regs.export(src[devices[0]][0])
                        regs.locate(src[devices[0]][0])
                        checks.add(
                            "bus-id",
                            True,
                            f"region registered by PCI bus id {spec['pci_bus_id']} "
                            f"(nvidia-smi: {smi.split(', ')[-1] if smi else '?'})",
                        )
                        if ngpu >= 2:
                            last = ngpu - 1
                            cenv = dict(os.environ, CUDA_VISIBLE_DEVICES=str(last))
                            out = subprocess.run(
                                [sys.executable, "-c", BUS_CHILD, SHIM, eng.endpoint, ns[devices[0]]],
                                env=cenv,
                                capture_output=True,
                                text=True,
                                timeout=300,
                            )
                            ok = "'ok'" in out.stdout
                            checks.add(
                                "bus-id-renumbered",
                                ok,
                                f"client with CUDA_VISIBLE_DEVICES={last}: {out.stdout.strip()[-200:] or out.stderr.strip()[-300:]}",
                            )
                        else:
                            checks.add("bus-id-renumbered", None, "one GPU: no other numbering to try")

                        # ordering + CPU: a slow kernel, then one that rewrites the source, both queued; the dump of
                        # four blocks goes in at once and must store the rewritten bytes, its threads sleeping meanwhile.
                        d0 = devices[0]
                        few = range(4)
                        # Registered before the kernels are queued: exporting memory may synchronize.
                        wire_src, wire_dst = shards_for(regs, src[d0], few), shards_for(regs, dst[d0], few)
                        regs.record_event(d0)
                        for layer in src[d0]:
                            # The rewrite kernel loaded now: CUDA loads a kernel's module at its first launch
                            # (lazy loading) and that waits for the GPU, which would hold this thread behind the
                            # slow kernel below until it had run.
                            layer.mul_(-1).mul_(-1)
                        torch.cuda.synchronize(d0)
                        t_launch = time.perf_counter()
                        with torch.cuda.device(d0):
                            # One long kernel (a few seconds at any clock): many short ones would not do, the launch
                            # queue holds about a thousand, so the CPU would wait here until most had run.
                            torch.cuda._sleep(int(4e9))
                            for layer in src[d0]:
                                layer.mul_(-1)
                        # Nothing here may synchronize with the GPU (no list indexing, no .item()): the dump
                        # must be in the engine while the kernels still run.
                        t_queued = time.perf_counter()
                        wk = keys("wait", d0)[:4]
                        r = c.call(
                            "dump", ns=ns[d0], keys=wk, shards=wire_src, commit=True, event=regs.record_event(d0)
                        )
                        w0 = time.perf_counter()
                        print(
                            f"  (no-spin: kernels queued in {t_queued - t_launch:.3f} s, dump submitted in {w0 - t_queued:.3f} s)",
                            flush=True,
                        )
                        time.sleep(0.1)
                        cpu0 = cpu_seconds(eng.proc.pid)
                        time.sleep(0.5)  # the engine's threads wait for the event meanwhile
                        cpu = cpu_seconds(eng.proc.pid) - cpu0
                        still = not c.call("check", task=r["task"]).get("done")
                        w1 = c.call("wait", task=r["task"], timeout_ms=60000)
                        waited = time.perf_counter() - w0
                        r = c.call("load", ns=ns[d0], keys=wk, shards=wire_dst)
                        w2 = c.call("wait", task=r["task"], timeout_ms=60000)
                        torch.cuda.synchronize()
                        order_ok = (
                            not w1.get("failed")
                            and not w2.get("failed")
                            and all(torch.equal(x[:, 0:4], y[:, 0:4]) for x, y in zip(src[d0], dst[d0]))
                        )
                        checks.add(
                            "ordering",
                            order_ok,
                            "blocks rewritten by kernels queued before the dump were stored as rewritten",
                        )
                        # Inconclusive (not a failure) when the GPU work was over before the window ended.
                        checks.add(
                            "no-spin",
                            (cpu < 0.05) if still else None,
                            f"engine CPU {cpu:.3f} s over 0.5 s while a 4-block dump waited for the kernel's event "
                            f"({'still waiting then' if still else 'but it had finished by then: inconclusive'}; "
                            f"done after {waited:.2f} s)",
                        )
                        results["wait_cpu_s"], results["wait_s"] = cpu, waited

                        # cancel: a dump still waiting for its event is stopped at once and never stored
                        # (vLLM preempting a request whose blocks are about to be reused).
                        with torch.cuda.device(d0):
                            torch.cuda._sleep(int(2e9))
                        ck = keys("cancel", d0)[:2]
                        r = c.call(
                            "dump",
                            ns=ns[d0],
                            keys=ck,
                            shards=shards_for(regs, src[d0], range(2)),
                            commit=True,
                            event=regs.record_event(d0),
                        )
                        t0 = time.perf_counter()
                        cr = c.call("cancel", task=r["task"])
                        took = time.perf_counter() - t0
                        w3 = c.call("wait", task=r["task"], timeout_ms=60000)
                        found = c.call("lookup", ns=ns[d0], keys=ck)["found"]
                        torch.cuda.synchronize()
                        checks.add(
                            "cancel",
                            cr.get("cancelled") is True
                            and took < 0.5
                            and w3.get("status") == ["cancelled", "cancelled"]
                            and found == [False, False],
                            f"cancel answered in {1000 * took:.0f} ms while the dump waited for its event; "
                            f"blocks {w3.get('status')}, stored {found}",
                        )

                        # layouts: HND view (heads before tokens) with an odd head size, via the connector's layout code.
                        hs = 72  # 144-byte rows
                        base = torch.randn((2, 16, a.kv_heads, a.block_tokens, hs), device=d0).to(torch.bfloat16)
                        # logical (2, blocks, tokens, heads, head) in HND memory order
                        hnd = base.permute(0, 1, 3, 2, 4)
                        out_t = torch.zeros_like(base).permute(0, 1, 3, 2, 4)
                        tr_src, tr_dst = block_runs("hnd", hnd, 16), block_runs("hnd", out_t, 16)

                        def runs_wire(tr, blocks, regs=regs):
                            rid, off0 = regs.locate(tr.tensor)
                            sl = ShardList(len(tr.runs))
                            for b in blocks:
                                for off, n in tr.runs:
                                    sl.add(rid, off0 + b * tr.block_stride + off, n)
                            return sl.wire()

                        lk = [f"hnd:{b}".encode().ljust(32, b".") for b in range(16)]
                        r = c.call("dump", ns=ns[d0], keys=lk, shards=runs_wire(tr_src, range(16)), commit=True)
                        w1 = c.call("wait", task=r["task"], timeout_ms=60000)
                        r = c.call("load", ns=ns[d0], keys=lk, shards=runs_wire(tr_dst, range(16)))
                        w2 = c.call("wait", task=r["task"], timeout_ms=60000)
                        torch.cuda.synchronize()
                        checks.add(
                            "layouts",
                            not w1.get("failed") and not w2.get("failed") and torch.equal(hnd, out_t),
                            f"HND cache, head size {hs}: {len(tr_src.runs)} shard(s) per block of "
                            f"{sum(n for _, n in tr_src.runs)} bytes, byte-exact",
                        )
                    except Exception as e:  # noqa: BLE001 - report and go on to the measurements
                        import traceback

                        traceback.print_exc()
                        checks.add("checks", False, f"aborted: {type(e).__name__}: {e}")

                d2s, s2d, exact = [], [], True
                cpu0, wall0 = cpu_seconds(eng.proc.pid), time.perf_counter()
                for rnd in range(a.repeat):
                    for d in devices:
                        for layer in dst[d]:
                            layer.zero_()
                    torch.cuda.synchronize()
                    t, f = transfer(c, "dump", ns, src, rnd, regs, True)
                    d2s.append((ngpu * a.blocks * per_block) / t / 1e9)
                    exact = exact and f == 0
                    t, f = transfer(c, "load", ns, dst, rnd, regs, False)
                    s2d.append((ngpu * a.blocks * per_block) / t / 1e9)
                    torch.cuda.synchronize()
                    exact = exact and f == 0 and all(torch.equal(x, y) for d in devices for x, y in zip(src[d], dst[d]))
                busy = (cpu_seconds(eng.proc.pid) - cpu0) / (time.perf_counter() - wall0)
                c.close()
            finally:
                eng.stop()
            shutil.rmtree(storage, ignore_errors=True)
            checks.add(f"byte-exact {name}", exact, f"{a.repeat} rounds of {ngpu * a.blocks} blocks each way")
            goal_d2s, goal_s2d = limit_d2s, limit_s2d
            results["runs"][name] = {
                "method": method,
                "threads": threads,
                "byte_exact": exact,
                "d2s_GBps": d2s,
                "s2d_GBps": s2d,
                "d2s_best": max(d2s),
                "s2d_best": max(s2d),
                "d2s_vs_limit": max(d2s) / goal_d2s,
                "s2d_vs_limit": max(s2d) / goal_s2d,
                "engine_cores_busy": busy,
                "banner": eng.banner,
            }

        # event-timeout: every CUDA wait is bounded. A kernel that runs for seconds stands in for a forward pass
        # that never ends; the dump queued behind it fails after cudaEventTimeoutMs and stores nothing.
        try:
            storage = os.path.join(a.dir, "timeout")
            shutil.rmtree(storage, ignore_errors=True)
            os.makedirs(storage)
            eng = Engine(
                a, work, "timeout", storage, 4, "batch", (per_block + 8192) * 4, extra="  cudaEventTimeoutMs: 500\n"
            )
            try:
                c = EngineClient(eng.endpoint, 60000, name="gpu-validate-timeout")
                regs = RegionRegistry(c)
                d0 = devices[0]
                ns0 = "gpu-validate-timeout"
                tk = keys("timeout", d0)[:2]
                torch.cuda.synchronize()
                with torch.cuda.device(d0):
                    torch.cuda._sleep(int(1.2e10))  # seconds at the H100/H200 clock
                t0 = time.perf_counter()
                r = c.call(
                    "dump",
                    ns=ns0,
                    keys=tk,
                    shards=shards_for(regs, src[d0], range(2)),
                    commit=True,
                    event=regs.record_event(d0),
                )
                w = c.call("wait", task=r["task"], timeout_ms=60000)
                took = time.perf_counter() - t0
                kernel_running = not torch.cuda.current_stream(d0).query()
                torch.cuda.synchronize()
                found = c.call("lookup", ns=ns0, keys=tk)["found"]
                r = c.call("dump", ns=ns0, keys=tk, shards=shards_for(regs, src[d0], range(2)), commit=True)
                after = c.call("wait", task=r["task"], timeout_ms=60000)
                said = "did not complete within 500 ms" in eng.text()
                c.close()
            finally:
                eng.stop()
            shutil.rmtree(storage, ignore_errors=True)
            checks.add(
                "event-timeout",
                w.get("status") == ["io_error", "io_error"]
                and took < 2.5
                and found == [False, False]
                and said
                and after.get("status") == ["ok", "ok"],
                f"a dump behind a kernel of seconds ended {w.get('status')} after {1000 * took:.0f} ms "
                f"(cudaEventTimeoutMs 500; kernel still running then: {kernel_running}); stored {found}; "
                f"log line {'present' if said else 'MISSING'}; the next dump {after.get('status')}",
            )
            results["event_timeout_s"] = took
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            checks.add("event-timeout", False, f"{type(e).__name__}: {e}")

        # tier: the Cache stage (hostCacheBytes). GPU dumps committed into it, then loads served from it, against
        # torch's own pinned host-to-device copy of one GPU (goal 90 %); every load a tier hit by the engine's count.
        try:
            storage = os.path.join(a.dir, "tier")
            shutil.rmtree(storage, ignore_errors=True)
            os.makedirs(storage)
            d0 = devices[0]
            tier_bytes = 2 * a.blocks * (per_block + 8192)
            eng = Engine(
                a,
                work,
                "tier",
                storage,
                threads0,
                "batch",
                (per_block + 8192) * threads0,
                extra=f"  hostCacheBytes: {tier_bytes}\n",
            )
            try:
                c = EngineClient(eng.endpoint, 60000, name="gpu-validate-tier")
                regs = RegionRegistry(c)
                ns0 = {d0: "gpu-validate-tier"}
                one = [d0]
                saved_devices = devices
                devices = one  # transfer() walks `devices`
                try:
                    t, f = transfer(c, "dump", ns0, src, "tier", regs, True)
                    hits0 = c.call("stats")["tier"]["hits"]
                    loads, exact = [], f == 0
                    for _ in range(a.repeat):
                        for layer in dst[d0]:
                            layer.zero_()
                        torch.cuda.synchronize()
                        t, f = transfer(c, "load", ns0, dst, "tier", regs, False)
                        torch.cuda.synchronize()
                        loads.append(a.blocks * per_block / t / 1e9)
                        exact = exact and f == 0 and all(torch.equal(x, y) for x, y in zip(src[d0], dst[d0]))
                    tier_after = c.call("stats")["tier"]
                    hits = tier_after["hits"] - hits0
                    # Page-locked tier buffers: blocks moved between them and the GPU in one DMA (no staging copy).
                    pinned = tier_after.get("pinned", 0)
                finally:
                    devices = saved_devices
                c.close()
            finally:
                eng.stop()
            shutil.rmtree(storage, ignore_errors=True)
            h2d_one = limit["H2D"][0]
            checks.add(
                "tier",
                exact and hits == a.repeat * a.blocks and pinned > 0,
                f"{a.blocks} blocks of {per_block >> 20} MiB loaded from the Cache stage {a.repeat} times: best "
                f"{max(loads):.2f} GB/s = {100 * max(loads) / h2d_one:.0f} % of torch's pinned H2D copy on one GPU "
                f"({h2d_one:.2f} GB/s; goal 90 %); tier hits {hits} of {a.repeat * a.blocks}; {pinned} tier buffers "
                f"page-locked (one DMA each way); byte-exact {exact}",
            )
            results["tier"] = {
                "s2d_GBps": loads,
                "torch_h2d_one_GBps": h2d_one,
                "hits": hits,
                "pinned": pinned,
                "exact": exact,
            }
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            checks.add("tier", False, f"{type(e).__name__}: {e}")

        # The public API, as a user calls it: ucm.store.NfsStore with CUDA tensors, 16 MiB blocks, tmpfs.
        try:
            from ucm.store import NfsStore

            os.environ["UCM_ENGINE_CMD"] = f"{a.node} {a.engine}"
            storage = os.path.join(a.dir, "api")
            shutil.rmtree(storage, ignore_errors=True)
            os.makedirs(storage)
            d0, n = devices[0], a.blocks
            blk = torch.randint(0, 256, (n, per_block), dtype=torch.uint8, device=d0)
            out_b = torch.zeros_like(blk)
            cfg = {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_connector_config": {
                    "storage_backends": storage,
                    "transferStreamNumber": threads0,
                    "endpoint": f"ipc://{work}/api.sock",
                    "pinnedStagingBytes": (per_block + 8192) * threads0,
                    "maxInflightBytes": "1TiB",
                    "maxQueueMs": 0,
                },
            }
            store = NfsStore(cfg, namespace="gpu-validate-api")
            api = {"dump": [], "load": []}
            ok = True
            for rnd in range(a.repeat):
                ks = [f"api:{rnd}:{i}".encode().ljust(32, b".") for i in range(n)]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                task = store.dump(ks, [0] * n, [blk[i] for i in range(n)])
                ok = ok and store.wait(task) == 0
                store.commit(ks)
                api["dump"].append(n * per_block / (time.perf_counter() - t0) / 1e9)
                out_b.zero_()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                task = store.load(ks, [0] * n, [out_b[i] for i in range(n)])
                ok = ok and store.wait(task) == 0
                api["load"].append(n * per_block / (time.perf_counter() - t0) / 1e9)
                torch.cuda.synchronize()
                ok = ok and torch.equal(blk, out_b)
            pid = EngineClient(f"ipc://{work}/api.sock", 5000).raw("health")["pid"]
            store.close()
            os.kill(pid, 15)
            shutil.rmtree(storage, ignore_errors=True)
            del blk, out_b
            checks.add(
                "public-api",
                ok,
                f"NfsStore dump+commit {max(api['dump']):.2f} GB/s "
                f"({100 * max(api['dump']) / limit_d2s:.0f} % of limit), load {max(api['load']):.2f} GB/s "
                f"({100 * max(api['load']) / limit_s2d:.0f} %), {threads0} threads, byte-exact",
            )
            results["public_api"] = {"dump_GBps": api["dump"], "load_GBps": api["load"], "threads": threads0}
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            checks.add("public-api", False, f"{type(e).__name__}: {e}")

        # A real disk: the same engine and GPU blocks, O_DIRECT, cold loads, beside the same I/O without us.
        if a.disk_dir:
            results["disk"] = {}
            for dthreads in [int(x) for x in a.disk_threads.split(",") if x]:
                name = f"disk-{dthreads}"
                try:
                    os.makedirs(a.disk_dir, exist_ok=True)
                    df = (
                        subprocess.run(["df", "-hT", a.disk_dir], capture_output=True, text=True)
                        .stdout.strip()
                        .splitlines()[-1]
                    )
                    dw, dr = io_limit(a.disk_dir, dthreads, per_block + 4096, ngpu * a.blocks, odirect=True)
                    storage = os.path.join(a.disk_dir, "store")
                    shutil.rmtree(storage, ignore_errors=True)
                    os.makedirs(storage)
                    eng = Engine(a, work, name, storage, dthreads, "batch", (per_block + 8192) * dthreads)
                    try:
                        c = EngineClient(eng.endpoint, 120000, name="gpu-validate-disk")
                        regs = RegionRegistry(c)
                        ns = {d: f"gpu-validate-disk-{d.index}" for d in devices}
                        ds, ls, exact = [], [], True
                        for rnd in range(a.repeat):
                            t, f = transfer(c, "dump", ns, src, f"disk{rnd}", regs, True)
                            ds.append(ngpu * a.blocks * per_block / t / 1e9)
                            cold = drop_caches()
                            for d in devices:
                                for layer in dst[d]:
                                    layer.zero_()
                            torch.cuda.synchronize()
                            t, f2 = transfer(c, "load", ns, dst, f"disk{rnd}", regs, False)
                            ls.append(ngpu * a.blocks * per_block / t / 1e9)
                            torch.cuda.synchronize()
                            exact = (
                                exact
                                and f == 0
                                and f2 == 0
                                and all(torch.equal(x, y) for d in devices for x, y in zip(src[d], dst[d]))
                            )
                        if dthreads == int(a.disk_threads.split(",")[0]):
                            early_release(c, regs, ns, dthreads)
                        c.close()
                    finally:
                        eng.stop()
                    shutil.rmtree(storage, ignore_errors=True)
                    checks.add(
                        name,
                        exact,
                        f"{df}: {dthreads} threads, best of {a.repeat}: GPU->disk {max(ds):.2f} GB/s vs "
                        f"O_DIRECT write {dw:.2f} ({100 * max(ds) / dw:.0f} %), disk->GPU {max(ls):.2f} GB/s "
                        f"{'(cold)' if cold else '(page cache not dropped)'} vs O_DIRECT read {dr:.2f} "
                        f"({100 * max(ls) / dr:.0f} %), byte-exact",
                    )
                    results["disk"][name] = {
                        "df": df,
                        "threads": dthreads,
                        "d2s_GBps": ds,
                        "s2d_GBps": ls,
                        "direct_write_GBps": dw,
                        "direct_read_GBps": dr,
                        "cold": cold,
                    }
                except Exception as e:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    checks.add(name, False, f"{type(e).__name__}: {e}")
                finally:
                    shutil.rmtree(a.disk_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks.rows]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(
        f"Limits: torch pinned copies D2H {torch_d2h:.2f} / H2D {torch_h2d:.2f} GB/s; {a.dir} write {fs_w:.2f} / "
        f"read {fs_r:.2f} GB/s. Ratios below are to the smaller limit of each direction. (For reference, the store's "
        f"host-memory path on the same directory: D2S {host_d2s:.2f} / S2D {host_s2d:.2f} GB/s.)"
    )
    print(
        f"| copies | threads | byte-exact | D2S GB/s (best of {a.repeat}) | vs limit | S2D GB/s | vs limit | engine cores busy |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for m in results["runs"].values():
        print(
            f"| {m['method']} | {m['threads']} | {'yes' if m['byte_exact'] else 'NO'} | {m['d2s_best']:.2f} | "
            f"{100 * m['d2s_vs_limit']:.0f} % | {m['s2d_best']:.2f} | {100 * m['s2d_vs_limit']:.0f} % | {m['engine_cores_busy']:.1f} |"
        )
    print(
        f"\n{sum(1 for _, ok, _ in checks.rows if ok)} checks passed, {sum(1 for _, ok, _ in checks.rows if ok is False)} failed; "
        f"results in {a.out}"
    )
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
