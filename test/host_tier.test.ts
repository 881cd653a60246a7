// The Cache stage (hostCacheBytes, UCM's "Cache|Posix"): the real engine
// process, real files, the real addon. What the tier serves is checked byte
// for byte, and where a load came from is read from the engine's own tier
// figures (`stats`).
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion } from "./helpers/fixtures";
import { NS, SHARD, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, runCli, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

let dir: string;
let store: string;
let engine: RunningEngine | undefined;
const shm: ShmRegion[] = [];

beforeEach(() => {
  dir = shortTmp();
  store = path.join(dir, "store");
  fs.mkdirSync(store);
});
afterEach(async () => {
  await engine?.stop("SIGKILL");
  engine = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

// One layer: a block is one shard of SHARD bytes, its file 4096 + 8192 bytes (block_file.h).
const FILE = 4096 + Math.ceil(SHARD / 4096) * 4096;

async function start(extra: Record<string, unknown>): Promise<EngineClient> {
  engine = await startEngine(
    writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 2, ...extra }),
  );
  const c = engine.client();
  await hello(c);
  return c;
}

type Tier = { hits: number; misses: number; blocks: number; pending: number; usedBytes: number; capacityBytes: number; evicted: number };
const tier = async (c: EngineClient) => (await c.call("stats")).tier as Tier;

async function dump(c: EngineClient, ids: number[], keys: Buffer[], slots: number[], commit: boolean) {
  const d = await c.call("dump", { ns: NS, keys, shards: shards(ids, slots) });
  expect((await waitDone(c, d.task as number)).status).toEqual(keys.map(() => "ok"));
  if (commit) expect((await c.call("commit", { ns: NS, keys })).committed).toEqual(keys.map(() => true));
}

async function load(c: EngineClient, ids: number[], keys: Buffer[], slots: number[]) {
  const l = await c.call("load", { ns: NS, keys, shards: shards(ids, slots) });
  return (await waitDone(c, l.task as number)).status;
}

const blockOf = (r: ShmRegion, slot: number) => r.read().subarray(slot * SHARD, (slot + 1) * SHARD);

test("a committed dump is served from the tier byte-exact, even once its file is gone; an uncommitted one never", async () => {
  const c = await start({ hostCacheBytes: 64 * FILE });
  const src = await regions(c, 1, 4, "random", shm);
  const dst = await regions(c, 1, 4, "zero", shm);
  const committed = [key(0, "t"), key(1, "t")];
  const uncommitted = [key(2, "t")];
  await dump(c, src.ids, committed, [0, 1], true);
  await dump(c, src.ids, uncommitted, [2], false);
  expect(await tier(c)).toMatchObject({ blocks: 2, pending: 1, hits: 0 });

  expect(await load(c, dst.ids, committed, [0, 1])).toEqual(["ok", "ok"]);
  expect(await tier(c)).toMatchObject({ hits: 2 });
  for (const s of [0, 1]) expect(blockOf(dst.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
  // What an operator reads: `ucm-engine stats`.
  const table = await runCli(["stats", "--endpoint", engine!.endpoint]);
  expect(table.out).toMatch(/cache stage\s+2 blocks \(9.00 KiB\), .* 1 waiting for their commit; loads: 2 hits \(9.00 KiB\), 0 misses/);

  // Dumped but not committed: neither found nor loaded, from the tier or anywhere.
  expect((await c.call("lookup", { ns: NS, keys: uncommitted })).found).toEqual([false]);
  expect(await load(c, dst.ids, uncommitted, [2])).toEqual(["not_found"]);
  expect(blockOf(dst.regs[0], 2).equals(Buffer.alloc(SHARD))).toBe(true);

  // Files removed underneath (another node's eviction): the tier still holds the committed bytes.
  fs.rmSync(path.join(store, NS), { recursive: true, force: true });
  dst.regs[0].write(0, Buffer.alloc(4 * SHARD));
  expect(await load(c, dst.ids, committed, [0, 1])).toEqual(["ok", "ok"]);
  for (const s of [0, 1]) expect(blockOf(dst.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
  expect(await tier(c)).toMatchObject({ hits: 4 });
});

test("a discarded dump leaves the tier with its file", async () => {
  const c = await start({ hostCacheBytes: 64 * FILE });
  const src = await regions(c, 1, 2, "random", shm);
  await dump(c, src.ids, [key(0, "d"), key(1, "d")], [0, 1], false);
  expect(await tier(c)).toMatchObject({ pending: 2 });
  await c.call("goodbye");
  await hello(c);
  await until("the discarded blocks left the tier", async () => (await tier(c)).pending === 0);
  expect((await tier(c)).blocks).toBe(0);
});

test("a block read from the directory enters the tier once verified; a corrupt one never", async () => {
  const keys = [key(0, "r"), key(1, "r")];
  // Stored by an engine without a tier, then read by one with a tier.
  let c = await start({});
  const src = await regions(c, 1, 2, "random", shm);
  await dump(c, src.ids, keys, [0, 1], true);
  await engine!.stop();
  c = await start({ hostCacheBytes: 64 * FILE });
  // Block 1's payload corrupted on disk: it must fail verification, and stay out of the tier.
  const files = fs.readdirSync(path.join(store, NS)).filter((x) => x.length === 2);
  const file1 = files
    .flatMap((d) => fs.readdirSync(path.join(store, NS, d)).map((f) => path.join(store, NS, d, f)))
    .find((f) => path.basename(f).startsWith(keys[1].toString("hex")))!;
  const bytes = fs.readFileSync(file1);
  bytes[4096 + 100] ^= 0xff;
  fs.writeFileSync(file1, bytes);

  const dst = await regions(c, 1, 2, "zero", shm);
  expect(await load(c, dst.ids, keys, [0, 1])).toEqual(["ok", "corrupt"]);
  expect(await tier(c)).toMatchObject({ hits: 0, misses: 2, blocks: 1 });
  dst.regs[0].write(0, Buffer.alloc(2 * SHARD));
  expect(await load(c, dst.ids, [keys[0]], [0])).toEqual(["ok"]);
  expect(blockOf(dst.regs[0], 0).equals(blockOf(src.regs[0], 0))).toBe(true);
  expect(await tier(c)).toMatchObject({ hits: 1, blocks: 1 });
});

test("the least recently used block leaves first; the tier never holds more than its capacity", async () => {
  const c = await start({ hostCacheBytes: 3 * FILE });
  const src = await regions(c, 1, 5, "random", shm);
  const dst = await regions(c, 1, 5, "zero", shm);
  const keys = [0, 1, 2].map((i) => key(i, "lru"));
  await dump(c, src.ids, keys, [0, 1, 2], true);
  expect(await tier(c)).toMatchObject({ blocks: 3, usedBytes: 3 * FILE, capacityBytes: 3 * FILE });
  // Block 0 used again: block 1 is now the least recently used, and makes way for block 3.
  expect(await load(c, dst.ids, [keys[0]], [0])).toEqual(["ok"]);
  const k3 = key(3, "lru");
  await dump(c, src.ids, [k3], [3], true);
  let t = await tier(c);
  expect(t).toMatchObject({ blocks: 3, evicted: 1 });
  expect(t.usedBytes).toBeLessThanOrEqual(3 * FILE);
  const hits = t.hits;
  // Block 2 comes from the tier, block 1 from its file (a miss, byte-exact; read into the tier, it evicts the
  // least recently used one then).
  for (const [k, s, fromTier] of [
    [keys[2], 2, true],
    [keys[1], 1, false],
  ] as Array<[Buffer, number, boolean]>) {
    const before = (await tier(c)).hits;
    expect(await load(c, dst.ids, [k], [s])).toEqual(["ok"]);
    expect({ s, fromTier: (await tier(c)).hits > before }).toEqual({ s, fromTier });
    expect(blockOf(dst.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
  }
  t = await tier(c);
  expect(t.hits).toBe(hits + 1);
  expect(t.usedBytes).toBeLessThanOrEqual(3 * FILE);
});

test("a client's block_bytes at registration prepares the stage before any dump; a size no block may have is refused by name", async () => {
  const c = await start({ hostCacheBytes: 64 * FILE });
  const reg = new ShmRegion(4 * SHARD, "random");
  shm.push(reg);
  const spec = { medium: "host", source: reg.name, size: reg.size };
  expect(await tier(c)).toMatchObject({ usedBytes: 0 });
  await c.call("register", { regions: [spec], block_bytes: SHARD });
  // The filling thread makes every buffer the capacity holds, of this block's file size, with no block yet.
  await until("the stage prepared", async () => (await tier(c)).usedBytes === 64 * FILE, 5000);
  expect(await tier(c)).toMatchObject({ blocks: 0, pending: 0, usedBytes: 64 * FILE });
  // Said once, however many clients tell it.
  await c.call("register", { regions: [spec], block_bytes: SHARD });
  const said = engine!
    .output()
    .split("\n")
    .filter((l) => l.includes("Cache stage: preparing"));
  expect(said).toEqual([expect.stringContaining(`for blocks of ${SHARD} bytes (a client's registration)`)]);

  await expect(c.call("register", { regions: [spec], block_bytes: 2 ** 41 })).rejects.toThrow(
    /block_bytes 2199023255552 is above this engine's maxBlockBytes/,
  );
  await expect(c.call("register", { regions: [spec], block_bytes: "big" })).rejects.toThrow(/block_bytes/);
  await expect(c.call("register", { regions: [spec], block_bytes: 0 })).rejects.toThrow(/block_bytes must be positive, got 0/);
});

test("block_bytes alone (no memory to register yet) prepares the stage; a registration of nothing at all is refused", async () => {
  const c = await start({ hostCacheBytes: 16 * FILE });
  expect(await c.call("register", { block_bytes: SHARD })).toMatchObject({ regions: [] });
  await until("the stage prepared", async () => (await tier(c)).usedBytes === 16 * FILE, 5000);
  await expect(c.call("register", {})).rejects.toThrow(/regions must be a non-empty array \(or block_bytes given\), got nothing/);
  await expect(c.call("register", { regions: [], events: [] })).rejects.toThrow(/regions must be a non-empty array/);
});

test("without block_bytes nothing is prepared until the first dump, then the rest of the capacity is", async () => {
  const c = await start({ hostCacheBytes: 64 * FILE });
  const src = await regions(c, 1, 4, "random", shm);
  await new Promise((r) => setTimeout(r, 300));
  expect(await tier(c)).toMatchObject({ usedBytes: 0 });
  await dump(c, src.ids, [key(0, "p")], [0], true);
  await until("the rest prepared", async () => (await tier(c)).usedBytes === 64 * FILE, 5000);
  expect(await tier(c)).toMatchObject({ blocks: 1 });
});
