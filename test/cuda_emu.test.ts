// The engine's GPU code path on a machine without a GPU: the real engine
// process and the production CUDA backend (native/src/cuda_backend.cc, cuda_stager.cc),
// built against the emulated CUDA runtime (native/cuda_emu), over real
// ZeroMQ sockets and real files. The emulation stands in for the GPU and its
// driver; it never replaces a run on real hardware (bench/gpu_validate.py).
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EmuDeviceMemory, EmuEvent, buildEmuAddon, cpuSeconds } from "./helpers/cuda_emu";
import {
  BLOCKS,
  GPU_A,
  GPU_B,
  NS,
  Node,
  SHARD,
  all,
  gpuCache,
  keys,
  registerCache,
  roundTrip,
  sameBlocks,
  startNode,
  stopNode,
  waitDone,
} from "./helpers/cuda_emu_node";
import { hello, until } from "./helpers/engine";
import { shardColumns } from "./helpers/fixtures";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

// Each test's engine and emulated GPU memory, cleaned up after it.
let node: Node | undefined;
const mem: Array<EmuDeviceMemory | EmuEvent> = [];

/** A client of `n`'s engine with a random source cache, an empty destination cache and an event, all registered. */
async function withEvent(n: Node) {
  const c = n.engine.client();
  await hello(c);
  const src = gpuCache(GPU_A, "random");
  const dst = gpuCache(GPU_A);
  const ev = new EmuEvent(GPU_A);
  mem.push(...src, ...dst, ev);
  const sids = await registerCache(c, src, 0, GPU_A);
  const dids = await registerCache(c, dst, 0, GPU_A);
  const evId = ((await c.call("register", { events: [{ device: 0, pci_bus_id: GPU_A, handle: ev.handle() }] })).events as number[])[0];
  return { c, src, dst, sids, dids, ev, evId };
}

beforeAll(() => {
  buildEmuAddon();
}, 300000);

afterEach(async () => {
  await stopNode(node);
  node = undefined;
  mem.splice(0).forEach((m) => m.free());
});

describe("GPU path over the emulated CUDA runtime", () => {
  for (const method of ["batch", "kernel"]) {
    test(`register, dump, commit, load byte-exact through the engine (${method} copies)`, async () => {
      node = await startNode([GPU_A], { cudaCopy: method });
      expect(node.engine.output()).toMatch(/CUDA backend: 1 GPU\(s\).*emulated/);
      const c = node.engine.client();
      await hello(c);
      const src = gpuCache(GPU_A, "random");
      const dst = gpuCache(GPU_A);
      mem.push(...src, ...dst);
      const sids = await registerCache(c, src, 0, GPU_A);
      const dids = await registerCache(c, dst, 0, GPU_A);
      const ks = keys(method);
      const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, all), commit: true });
      expect((await waitDone(c, d.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
      expect((await c.call("lookup", { ns: NS, keys: ks })).found).toEqual(new Array(BLOCKS).fill(true));
      const order = [6, 1, 3];
      const l = await c.call("load", { ns: NS, keys: order.map((i) => ks[i]), shards: shardColumns(dids, SHARD, order) });
      expect((await waitDone(c, l.task as number)).status).toEqual(["ok", "ok", "ok"]);
      expect(sameBlocks(dst, src, order)).toBe(true);
      // Blocks not loaded stay untouched.
      expect(dst[0].read(0, SHARD).equals(Buffer.alloc(SHARD))).toBe(true);
    });
  }

  test("a dump waits for the client's event: bytes written before it completes are the ones stored", async () => {
    node = await startNode([GPU_A]);
    const { c, src, dst, sids, dids, ev, evId } = await withEvent(node);
    // The "forward pass" is queued, not done: the event is recorded, not completed.
    ev.record();
    const ks = keys("ev");
    const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, all), commit: true, event: evId });
    const cpu0 = cpuSeconds(node.engine.proc.pid!);
    await new Promise((r) => setTimeout(r, 1500));
    const cpu = cpuSeconds(node.engine.proc.pid!) - cpu0;
    expect((await c.call("check", { task: d.task })).done).toBe(false);
    // Four transfer threads waited 1.5 s on the event: they must sleep, not spin.
    expect(cpu).toBeLessThan(0.5);
    // The forward pass writes the blocks, then the GPU reaches the event.
    for (const m of src) m.write(0, crypto.randomBytes(m.size));
    ev.complete();
    expect((await waitDone(c, d.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
    const l = await c.call("load", { ns: NS, keys: ks, shards: shardColumns(dids, SHARD, all) });
    expect((await waitDone(c, l.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
    expect(sameBlocks(dst, src, all)).toBe(true);
  });

  test("a dump waiting for its event holds no pinned staging: a load on the same stream goes by it", async () => {
    // One stream: one share of pinned staging, and a second worker for it.
    node = await startNode([GPU_A], { transferStreamNumber: 1 });
    const { c, src, dst, sids, dids, ev, evId } = await withEvent(node);
    const ks = keys("share");
    const d0 = await c.call("dump", { ns: NS, keys: ks.slice(0, 2), shards: shardColumns(sids, SHARD, [0, 1]), commit: true });
    expect((await waitDone(c, d0.task as number)).status).toEqual(["ok", "ok"]);
    ev.record();
    const d = await c.call("dump", { ns: NS, keys: [ks[2]], shards: shardColumns(sids, SHARD, [2]), commit: true, event: evId });
    const l = await c.call("load", { ns: NS, keys: ks.slice(0, 2), shards: shardColumns(dids, SHARD, [0, 1]) });
    expect((await waitDone(c, l.task as number)).status).toEqual(["ok", "ok"]);
    expect(sameBlocks(dst, src, [0, 1])).toBe(true);
    expect((await c.call("check", { task: d.task })).done).toBe(false);
    ev.complete();
    expect((await waitDone(c, d.task as number)).status).toEqual(["ok"]);
  });

  slowDiskTest(
    "loads get pinned staging before dumps into a slow directory (issue 26)",
    async () => {
      // One stream: one share of pinned staging and two workers. Five dump blocks queue behind a throttled disk;
      // a load submitted after them goes right after the block being written, not after the dump.
      const disk = new SlowDisk(64);
      try {
        const store = path.join(disk.mnt, "store");
        fs.mkdirSync(store);
        node = await startNode([GPU_A], { transferStreamNumber: 1, storage_backends: store });
        disk.admit(node.engine.proc.pid!);
        const { c, src, dst, sids, dids } = await withEvent(node);
        const ks = keys("prio");
        const d0 = await c.call("dump", { ns: NS, keys: ks.slice(0, 2), shards: shardColumns(sids, SHARD, [0, 1]), commit: true });
        expect((await waitDone(c, d0.task as number)).status).toEqual(["ok", "ok"]);
        disk.throttle({ writeBps: 24 * 1024 }); // a block file (about 37 KiB) takes some 1.5 s
        const slow = ks.slice(2, 7);
        const d = await c.call("dump", { ns: NS, keys: slow, shards: shardColumns(sids, SHARD, [2, 3, 4, 5, 6]), commit: true });
        await new Promise((r) => setTimeout(r, 300)); // the first of them is being written, the others wait
        const l = await c.call("load", { ns: NS, keys: ks.slice(0, 2), shards: shardColumns(dids, SHARD, [0, 1]) });
        expect((await waitDone(c, l.task as number, 60000)).status).toEqual(["ok", "ok"]);
        const written = ((await c.call("lookup", { ns: NS, keys: slow })).found as boolean[]).filter(Boolean).length;
        expect(sameBlocks(dst, src, [0, 1])).toBe(true);
        expect(written).toBeLessThanOrEqual(1); // before: the load waited for two or three dump blocks
        disk.throttle({ writeBps: 0 });
        expect((await waitDone(c, d.task as number, 60000)).status).toEqual(new Array(5).fill("ok"));
      } finally {
        await stopNode(node);
        node = undefined;
        disk.close();
      }
    },
    120000,
  );

  test("an event that never completes fails its blocks after cudaEventTimeoutMs; the engine keeps serving", async () => {
    node = await startNode([GPU_A], { cudaEventTimeoutMs: 300 });
    const c = node.engine.client();
    await hello(c);
    const src = gpuCache(GPU_A, "random");
    const ev = new EmuEvent(GPU_A);
    mem.push(...src, ev);
    const sids = await registerCache(c, src, 0, GPU_A);
    const evId = ((await c.call("register", { events: [{ device: 0, pci_bus_id: GPU_A, handle: ev.handle() }] })).events as number[])[0];
    ev.record();
    const d = await c.call("dump", {
      ns: NS,
      keys: keys("lost").slice(0, 2),
      shards: shardColumns(sids, SHARD, [0, 1]),
      commit: true,
      event: evId,
    });
    const r = await waitDone(c, d.task as number);
    expect(r.status).toEqual(["io_error", "io_error"]);
    expect(node.engine.output()).toMatch(/the client's CUDA event did not complete within 300 ms/);
    expect((await c.call("lookup", { ns: NS, keys: keys("lost").slice(0, 2) })).found).toEqual([false, false]);
    expect((await c.call("health")).status).toBe("serving");
  });

  test("a region lands on its GPU by PCI bus id, whatever ordinal the client numbers it with", async () => {
    node = await startNode([GPU_A, GPU_B]);
    const c = node.engine.client();
    await hello(c);
    // A vLLM worker started with CUDA_VISIBLE_DEVICES=1 calls GPU B "device 0".
    const r = await roundTrip(c, mem, GPU_B, "bus");
    expect([r.dump, r.load]).toEqual([r.ok, r.ok]);
    expect(sameBlocks(r.dst, r.src, all)).toBe(true);
    // Only GPU B got a CUDA context in the engine: none on device 0 (staging, streams and events were all made
    // with the block's own GPU current).
    expect(fs.readFileSync(node.trace, "utf8").trim().split("\n")).toEqual([`context 1 ${GPU_B}`]);
    // The ordinal alone names the engine's device 0 (GPU A): refused, with the reason.
    const wrong = gpuCache(GPU_B);
    mem.push(...wrong);
    await expect(registerCache(c, wrong, 0)).rejects.toThrow(/cudaIpcOpenMemHandle: cudaErrorInvalidDevice/);
    // A bus id the engine does not see is named in the error.
    await expect(registerCache(c, wrong, 0, "0000:99:00.0")).rejects.toThrow(/no GPU with PCI bus id '0000:99:00.0'/);
    await expect(registerCache(c, wrong, 0, "GPU-1")).rejects.toThrow(/regions\[0\]\.pci_bus_id must be a PCI bus id/);
  });

  test("two clients exporting the same allocation share one mapping, and it outlives the first client", async () => {
    node = await startNode([GPU_A]);
    const c1 = node.engine.client();
    const c2 = node.engine.client();
    await hello(c1);
    await hello(c2);
    const src = gpuCache(GPU_A, "random");
    const dst = gpuCache(GPU_A);
    mem.push(...src, ...dst);
    const ids1 = await registerCache(c1, src, 0, GPU_A);
    const ids2 = await registerCache(c2, src, 0, GPU_A); // CUDA maps a handle once per process: the engine reuses it
    const ks = keys("two");
    const d1 = await c1.call("dump", { ns: NS, keys: ks.slice(0, 4), shards: shardColumns(ids1, SHARD, [0, 1, 2, 3]), commit: true });
    expect((await waitDone(c1, d1.task as number)).status).toEqual(["ok", "ok", "ok", "ok"]);
    await c1.call("release", { regions: ids1 });
    c1.close();
    const d2 = await c2.call("dump", { ns: NS, keys: ks.slice(4), shards: shardColumns(ids2, SHARD, [4, 5, 6, 7]), commit: true });
    expect((await waitDone(c2, d2.task as number)).status).toEqual(["ok", "ok", "ok", "ok"]);
    const dids = await registerCache(c2, dst, 0, GPU_A);
    const l = await c2.call("load", { ns: NS, keys: ks, shards: shardColumns(dids, SHARD, all) });
    expect((await waitDone(c2, l.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
    expect(sameBlocks(dst, src, all)).toBe(true);
  });
});

describe("CUDA failures are block statuses or refused requests, never a crash", () => {
  async function twoBlocks(n: Node) {
    const c = n.engine.client();
    await hello(c);
    return { c, ...(await roundTrip(c, mem, GPU_A, "fault", [0, 1])) };
  }

  for (const call of ["cudaIpcOpenMemHandle", "cudaSetDevice"]) {
    test(`${call} fails: registration is refused with CUDA's error`, async () => {
      node = await startNode([GPU_A], {}, { UCM_CUDA_EMU_FAIL: `${call}=cudaErrorInvalidValue` });
      const c = node.engine.client();
      await hello(c);
      const m = new EmuDeviceMemory(GPU_A, 4096);
      mem.push(m);
      await expect(registerCache(c, [m], 0, GPU_A)).rejects.toMatchObject({
        code: "unsupported",
        message: expect.stringMatching(/cudaErrorInvalidValue/),
      });
      expect((await c.call("health")).status).toBe("serving");
    });
  }

  test("cudaIpcOpenEventHandle fails: the event registration is refused", async () => {
    node = await startNode([GPU_A], {}, { UCM_CUDA_EMU_FAIL: "cudaIpcOpenEventHandle=cudaErrorInvalidResourceHandle" });
    const c = node.engine.client();
    await hello(c);
    const ev = new EmuEvent(GPU_A);
    mem.push(ev);
    await expect(c.call("register", { events: [{ device: 0, pci_bus_id: GPU_A, handle: ev.handle() }] })).rejects.toThrow(
      /cudaErrorInvalidResourceHandle/,
    );
    expect((await c.call("health")).status).toBe("serving");
  });

  for (const [call, method] of [
    ["cudaHostAlloc", "batch"],
    ["cudaStreamCreateWithFlags", "batch"],
    ["cudaEventQuery", "batch"],
    ["LaunchCopyPieces", "kernel"],
  ]) {
    test(`${call} fails (${method} copies): blocks end io_error, nothing is stored, the engine keeps serving`, async () => {
      node = await startNode([GPU_A], { cudaCopy: method }, { UCM_CUDA_EMU_FAIL: `${call}=cudaErrorIllegalAddress` });
      const r = await twoBlocks(node);
      expect(r.dump).toEqual(["io_error", "io_error"]);
      // Nothing was stored, so the load fails too: as a miss, or at the same call.
      for (const st of r.load) expect(["not_found", "io_error"]).toContain(st);
      expect(r.dst[0].read(0, 2 * SHARD).equals(Buffer.alloc(2 * SHARD))).toBe(true);
      expect(node.engine.output()).toMatch(/cudaErrorIllegalAddress/);
      // Not a missing feature: the method is not switched behind the operator's back.
      expect(node.engine.output()).not.toMatch(/copy kernel instead/);
      expect((await r.c.call("health")).status).toBe("serving");
    });
  }

  test("a copy that never finishes fails its block after cudaEventTimeoutMs; the engine keeps serving (issue 26)", async () => {
    node = await startNode([GPU_A], { cudaEventTimeoutMs: 1000 }, { UCM_CUDA_EMU_STALL_COPIES: "1" });
    const t0 = Date.now();
    const r = await twoBlocks(node);
    expect(r.dump).toEqual(["io_error", "io_error"]);
    expect(Date.now() - t0).toBeLessThan(20000); // bounded, not held for good (the load below waits its own turn too)
    expect(node.engine.output()).toMatch(/the gather did not finish within cudaEventTimeoutMs \(1000 ms\): a hung copy/);
    expect((await r.c.call("health")).status).toBe("serving");
  });

  test("batched copies that fail with another error: one notice naming it, then the copy kernel, byte-exact", async () => {
    node = await startNode([GPU_A], { cudaCopy: "batch" }, { UCM_CUDA_EMU_FAIL: "cudaMemcpyBatchAsync=cudaErrorInvalidValue" });
    const r = await twoBlocks(node);
    expect(r.dump).toEqual(["ok", "ok"]);
    expect(r.load).toEqual(["ok", "ok"]);
    expect(sameBlocks(r.dst, r.src, [0, 1])).toBe(true);
    const notice = /cudaMemcpyBatchAsync failed .*cudaErrorInvalidValue.*copy kernel instead/g;
    await until("the notice", () => notice.test(node!.engine.output()));
    expect(node.engine.output().match(notice)?.length).toBe(1);
  });

  test("a driver without batched copies: one notice, then the copy kernel, byte-exact", async () => {
    node = await startNode([GPU_A], { cudaCopy: "batch" }, { UCM_CUDA_EMU_FAIL: "cudaMemcpyBatchAsync=cudaErrorNotSupported" });
    const r = await twoBlocks(node);
    expect(r.dump).toEqual(["ok", "ok"]);
    expect(r.load).toEqual(["ok", "ok"]);
    expect(sameBlocks(r.dst, r.src, [0, 1])).toBe(true);
    const notice = /cudaMemcpyBatchAsync is not available with this driver.*copy kernel instead/g;
    await until("the notice", () => notice.test(node!.engine.output()));
    expect(node.engine.output().match(notice)?.length).toBe(1);
  });

  test("a driver older than the runtime: the engine says which driver it needs and still serves host memory", async () => {
    node = await startNode([GPU_A], {}, { UCM_CUDA_EMU_DRIVER: "12040" });
    expect(node.engine.output()).toMatch(
      /the NVIDIA driver supports CUDA 12\.4, but this engine was built with CUDA 13\.0, which needs driver 580 or newer/,
    );
    const c = node.engine.client();
    await hello(c);
    const m = new EmuDeviceMemory(GPU_A, 4096);
    mem.push(m);
    await expect(registerCache(c, [m], 0, GPU_A)).rejects.toThrow(/needs driver 580 or newer/);
    expect((await c.call("health")).status).toBe("serving");
  });
});
