// GPU blocks and the Cache stage (issue 27), over the emulated CUDA runtime
// (see cuda_emu.test.ts): the real engine process and the production CUDA
// backend. A Cache stage buffer is page-locked at its first GPU use, and from
// then on a block moves between it and GPU memory in one DMA: a dump gathers
// straight into the tier buffer its file is written behind from, a load
// scatters from the tier buffer a hit or a file read left it in. The
// emulated copy kernel reaches host memory only when it is page-locked, so a
// buffer used without being locked fails the kernel runs below.
import { EmuDeviceMemory, EmuEvent, buildEmuAddon } from "./helpers/cuda_emu";
import {
  BLOCKS,
  GPU_A,
  NS,
  Node,
  SHARD,
  all,
  gpuCache,
  keys,
  registerCache,
  sameBlocks,
  startNode,
  stopNode,
  waitDone,
} from "./helpers/cuda_emu_node";
import { hello, until } from "./helpers/engine";
import { shardColumns } from "./helpers/fixtures";
import { EngineClient } from "../core/client";

const nodes: Node[] = [];
const mem: Array<EmuDeviceMemory | EmuEvent> = [];

beforeAll(() => {
  buildEmuAddon();
}, 300000);

afterEach(async () => {
  await Promise.all(nodes.splice(0).map((n) => stopNode(n)));
  mem.splice(0).forEach((m) => m.free());
});

async function tier(c: EngineClient): Promise<Record<string, number>> {
  return (await c.call("stats")).tier as Record<string, number>;
}

async function client(n: Node) {
  const c = n.engine.client();
  await hello(c);
  return c;
}

const withTier = (method: string) => ({ cudaCopy: method, hostCacheBytes: "16MiB", writeBehind: true });

/** An engine of `opts` (and its emulator's `env`), a client, a random source cache and an empty destination, registered. */
async function setup(opts: Record<string, unknown>, env: Record<string, string> = {}) {
  const a = await startNode([GPU_A], opts, env);
  nodes.push(a);
  const c = await client(a);
  const src = gpuCache(GPU_A, "random");
  const dst = gpuCache(GPU_A);
  mem.push(...src, ...dst);
  const sids = await registerCache(c, src, 0, GPU_A);
  const dids = await registerCache(c, dst, 0, GPU_A);
  return { a, c, src, dst, sids, dids };
}

describe("GPU blocks through the Cache stage", () => {
  for (const method of ["batch", "kernel"]) {
    test(`dumps gather into page-locked tier buffers and loads scatter from them, byte-exact (${method} copies)`, async () => {
      const { a, c, src, dst, sids, dids } = await setup(withTier(method));
      const ks = keys(`tier-${method}`);
      const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, all), commit: true });
      expect((await waitDone(c, d.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
      let t = await tier(c);
      // Every block gathered straight into its tier buffer, each buffer locked once.
      expect(t.pinned).toBe(BLOCKS);
      expect(t.pinnedBytes).toBeGreaterThanOrEqual(BLOCKS * 2 * SHARD);
      const order = [6, 1, 3];
      const l = await c.call("load", { ns: NS, keys: order.map((i) => ks[i]), shards: shardColumns(dids, SHARD, order) });
      expect((await waitDone(c, l.task as number)).status).toEqual(["ok", "ok", "ok"]);
      expect(sameBlocks(dst, src, order)).toBe(true);
      expect(dst[0].read(0, SHARD).equals(Buffer.alloc(SHARD))).toBe(true); // block 0 not loaded
      t = await tier(c);
      expect(t.hits).toBe(3);
      expect(t.pinned).toBe(BLOCKS); // the same buffers, already locked
      expect(t.abandoned).toBe(0);
      // The files written behind hold the same bytes: another engine (its tier empty) reads them into
      // tier buffers of its own, locks them, scatters from them; then serves a second load from them.
      await until("the files written behind", async () => (await tier(c)).unwritten === 0);
      const b = await startNode([GPU_A], { ...withTier(method), storage_backends: a.store });
      nodes.push(b);
      const cb = await client(b);
      const dst2 = gpuCache(GPU_A);
      mem.push(...dst2);
      const dids2 = await registerCache(cb, dst2, 0, GPU_A);
      for (const round of [1, 2]) {
        dst2.forEach((m) => m.write(0, Buffer.alloc(m.size)));
        const l2 = await cb.call("load", { ns: NS, keys: ks, shards: shardColumns(dids2, SHARD, all) });
        expect((await waitDone(cb, l2.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
        expect(sameBlocks(dst2, src, all)).toBe(true);
        const tb = await tier(cb);
        expect({ round, misses: tb.misses, hits: tb.hits, pinned: tb.pinned }).toEqual({
          round,
          misses: BLOCKS,
          hits: round === 1 ? 0 : BLOCKS,
          pinned: BLOCKS,
        });
      }
    });
  }

  test("a tier buffer that cannot be page-locked: blocks go through pinned staging, one notice, byte-exact", async () => {
    const { a, c, src, dst, sids, dids } = await setup(withTier("kernel"), {
      UCM_CUDA_EMU_FAIL: "cudaHostRegister=cudaErrorMemoryAllocation",
    });
    const ks = keys("unlocked");
    const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, all), commit: true });
    expect((await waitDone(c, d.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
    const l = await c.call("load", { ns: NS, keys: ks, shards: shardColumns(dids, SHARD, all) });
    expect((await waitDone(c, l.task as number)).status).toEqual(new Array(BLOCKS).fill("ok"));
    expect(sameBlocks(dst, src, all)).toBe(true);
    const t = await tier(c);
    expect({ pinned: t.pinned, hits: t.hits }).toEqual({ pinned: 0, hits: BLOCKS });
    const notice = /cudaHostRegister\(\d+ bytes of the Cache stage\).*cudaErrorMemoryAllocation.*through pinned staging/g;
    await until("the notice", () => notice.test(a.engine.output()));
    expect(a.engine.output().match(notice)?.length).toBe(1);
  });

  test("a copy into a tier buffer that never finishes: the buffer is given up, never reused; the engine keeps serving", async () => {
    const { a, c, sids } = await setup({ ...withTier("batch"), cudaEventTimeoutMs: 1000 }, { UCM_CUDA_EMU_STALL_COPIES: "1" });
    const d = await c.call("dump", { ns: NS, keys: keys("stall").slice(0, 2), shards: shardColumns(sids, SHARD, [0, 1]), commit: true });
    expect((await waitDone(c, d.task as number)).status).toEqual(["io_error", "io_error"]);
    expect(a.engine.output()).toMatch(/the gather did not finish within cudaEventTimeoutMs \(1000 ms\): a hung copy/);
    const t = await tier(c);
    expect({ abandoned: t.abandoned, blocks: t.blocks, unwritten: t.unwritten }).toEqual({ abandoned: 2, blocks: 0, unwritten: 0 });
    expect((await c.call("health")).status).toBe("serving");
  });

  test("a copy out of a tier buffer that never finishes: that block leaves the tier, its buffer is never reused", async () => {
    // The dump's 4 copies (2 blocks x 2 layers) run; every copy after them never does.
    const { a, c, sids, dids } = await setup({ ...withTier("batch"), cudaEventTimeoutMs: 1000 }, { UCM_CUDA_EMU_STALL_COPIES: "after:4" });
    const ks = keys("stall-load").slice(0, 2);
    const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, [0, 1]), commit: true });
    expect((await waitDone(c, d.task as number)).status).toEqual(["ok", "ok"]);
    expect((await tier(c)).blocks).toBe(2);
    const l = await c.call("load", { ns: NS, keys: [ks[0]], shards: shardColumns(dids, SHARD, [0]) });
    expect((await waitDone(c, l.task as number)).status).toEqual(["io_error"]);
    expect(a.engine.output()).toMatch(/the scatter did not finish within cudaEventTimeoutMs \(1000 ms\): a hung copy/);
    const t = await tier(c);
    // The block whose copy hung is no longer served from the tier (its buffer may still be read); the other is.
    expect({ abandoned: t.abandoned, blocks: t.blocks, hits: t.hits }).toEqual({ abandoned: 1, blocks: 1, hits: 1 });
    expect((await c.call("health")).status).toBe("serving");
  });
});
