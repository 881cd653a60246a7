// Write-behind (writeBehind, on with UCM's "Cache|Posix"): a dump is answered
// once its bytes are in the Cache stage and its file is written after. The
// real engine process, real files, the real addon, and a real slow disk (an
// ext4 on a loop device whose writes the blkio cgroup throttles for the
// engine: test/helpers/slow_disk.ts) standing in for a directory that cannot
// keep up or hangs. Where a block came from is read from the engine's own
// tier figures (`stats`); every byte served is compared with what was dumped.
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { parseConfig } from "../core/config";
import { ShmRegion } from "./helpers/fixtures";
import { NS, SHARD, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, runCli, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

// One layer: a block is one shard of SHARD bytes, its file 4096 + 8192 bytes (block_file.h).
const FILE = 4096 + Math.ceil(SHARD / 4096) * 4096;

type Tier = {
  blocks: number;
  pending: number;
  hits: number;
  unwritten: number;
  written: number;
  shed: number;
  writeFailed: number;
  evicted: number;
};
const tier = async (c: EngineClient) => (await c.call("stats")).tier as Tier;

let disk: SlowDisk | undefined;
let dir: string;
let store: string;
const engines: RunningEngine[] = [];
const shm: ShmRegion[] = [];

beforeEach(() => {
  dir = shortTmp();
});
afterEach(async () => {
  disk?.throttle({ writeBps: 0, readBps: 0 });
  for (const e of engines.splice(0)) await e.stop("SIGKILL");
  shm.splice(0).forEach((r) => r.unlink());
  disk?.close();
  disk = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A slow disk with an empty store on it. */
function slowStore(): SlowDisk {
  disk = new SlowDisk(64);
  store = path.join(disk.mnt, "store");
  fs.mkdirSync(store, { mode: 0o700 });
  return disk;
}

/** An engine on `store`, under the slow disk's limits; `extra` adds to its config. */
async function start(extra: Record<string, unknown>, name = "e"): Promise<{ e: RunningEngine; c: EngineClient }> {
  const e = await startEngine(
    writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/${name}.sock`, transferStreamNumber: 2, ...extra }, `${name}.yaml`),
  );
  engines.push(e);
  disk?.admit(e.proc.pid!);
  const c = e.client();
  await hello(c);
  return { e, c };
}

const behind = (blocks: number) => ({ hostCacheBytes: blocks * FILE, writeBehind: true });

/** Dumps blocks `slots` of `ids` under `keys` and commits them; returns how long the dump took to be answered (ms). */
async function dumpCommit(c: EngineClient, ids: number[], keys: Buffer[], slots: number[], commit = true): Promise<number> {
  const t0 = Date.now();
  const d = await c.call("dump", { ns: NS, keys, shards: shards(ids, slots) });
  expect((await waitDone(c, d.task as number)).status).toEqual(keys.map(() => "ok"));
  const took = Date.now() - t0;
  if (commit) expect((await c.call("commit", { ns: NS, keys })).committed).toEqual(keys.map(() => true));
  return took;
}

async function load(c: EngineClient, ids: number[], keys: Buffer[], slots: number[]): Promise<string[]> {
  const l = await c.call("load", { ns: NS, keys, shards: shards(ids, slots) });
  return (await waitDone(c, l.task as number)).status;
}

const blockOf = (r: ShmRegion, slot: number) => r.read().subarray(slot * SHARD, (slot + 1) * SHARD);

/** Block files under their final names (64 hex digits: the key), by name. */
function finalFiles(): string[] {
  const ns = path.join(store, NS);
  if (!fs.existsSync(ns)) return [];
  return fs
    .readdirSync(ns)
    .flatMap((d) => (fs.statSync(path.join(ns, d)).isDirectory() ? fs.readdirSync(path.join(ns, d)) : []))
    .filter((f) => /^[0-9a-f]{64}$/.test(f))
    .sort();
}
const hex = (keys: Buffer[]) => keys.map((k) => k.toString("hex")).sort();

slowDiskTest(
  "a hung directory: dumps are answered from host memory and served from it; written, renamed and seen by another engine once it is back",
  async () => {
    const hung = slowStore();
    const { c } = await start(behind(64));
    const src = await regions(c, 1, 8, "random", shm);
    const dst = await regions(c, 1, 8, "zero", shm);
    const keys = Array.from({ length: 6 }, (_, i) => key(i, "wb"));
    const discarded = [key(6, "wb"), key(7, "wb")];

    hung.throttle({ writeBps: 1 }); // a 12 KiB write now takes hours
    // Written before answering, one dump would wait for good; answered from memory, at once.
    expect(await dumpCommit(c, src.ids, keys, [0, 1, 2, 3, 4, 5])).toBeLessThan(2000);
    await dumpCommit(c, src.ids, discarded, [6, 7], false);
    expect(await tier(c)).toMatchObject({ blocks: 6, pending: 2, unwritten: 8, written: 0 });
    // Found and served from memory, byte-exact, while no file is there (two writes are stuck in the kernel).
    expect((await c.call("lookup", { ns: NS, keys })).found).toEqual(keys.map(() => true));
    expect(await load(c, dst.ids, keys, [0, 1, 2, 3, 4, 5])).toEqual(keys.map(() => "ok"));
    for (let s = 0; s < 6; s++) expect(blockOf(dst.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
    expect((await tier(c)).hits).toBe(6);
    expect(finalFiles()).toEqual([]);
    // Uncommitted blocks are neither found nor served; discarded (the client leaves), they are never written.
    expect((await c.call("lookup", { ns: NS, keys: discarded })).found).toEqual([false, false]);
    await c.call("goodbye");
    await hello(c);
    await until("the discarded blocks left the tier", async () => (await tier(c)).pending === 0);
    // What an operator reads while it hangs.
    const e = engines[0];
    const table = await runCli(["stats", "--endpoint", e.endpoint]);
    expect(table.out).toMatch(/write-behind\s+6 blocks \(.*\) not written yet, oldest \d+ ms; 0 written, 0 shed/);

    hung.throttle({ writeBps: 0 });
    await until("every committed block is written", async () => (await tier(c)).unwritten === 0, 20_000, 50);
    expect(finalFiles()).toEqual(hex(keys));
    expect(await tier(c)).toMatchObject({ written: 6, shed: 0, writeFailed: 0 });
    // No temporary file left over: the discarded ones' files were removed (or never made).
    const tmp = path.join(store, NS, ".tmp");
    expect(fs.existsSync(tmp) ? fs.readdirSync(tmp) : []).toEqual([]);
    // Another engine, without a tier, on the same directory: every block from its file, byte-exact.
    const other = await start({}, "other");
    const dst2 = await regions(other.c, 1, 8, "zero", shm);
    expect(await load(other.c, dst2.ids, keys, [0, 1, 2, 3, 4, 5])).toEqual(keys.map(() => "ok"));
    for (let s = 0; s < 6; s++) expect(blockOf(dst2.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
    expect(await load(other.c, dst2.ids, discarded, [6, 7])).toEqual(["not_found", "not_found"]);
  },
  60_000,
);

slowDiskTest(
  "a directory that cannot keep up: the oldest unwritten blocks are shed, dumps and loads never wait, and nothing shed is ever written",
  async () => {
    const slow = slowStore();
    const { c } = await start(behind(8));
    const n = 24;
    const src = await regions(c, 1, n, "random", shm);
    const dst = await regions(c, 1, n, "zero", shm);
    const keys = Array.from({ length: n }, (_, i) => key(i, "shed"));
    slow.throttle({ writeBps: 1 });
    for (let b = 0; b < n; b += 4) {
      const slots = [b, b + 1, b + 2, b + 3];
      expect(
        await dumpCommit(
          c,
          src.ids,
          slots.map((i) => keys[i]),
          slots,
        ),
      ).toBeLessThan(2000);
    }
    const t = await tier(c);
    // 8 fit; two more are held by the writes stuck in the kernel; the rest went before a write began.
    expect(t.shed).toBeGreaterThanOrEqual(n - 8 - 2);
    expect(t.blocks).toBe(8);
    // The newest 8 are served from memory at once, byte-exact.
    const newest = Array.from({ length: 8 }, (_, i) => n - 8 + i);
    const t0 = Date.now();
    expect(
      await load(
        c,
        dst.ids,
        newest.map((i) => keys[i]),
        newest,
      ),
    ).toEqual(newest.map(() => "ok"));
    expect(Date.now() - t0).toBeLessThan(2000);
    for (const s of newest) expect(blockOf(dst.regs[0], s).equals(blockOf(src.regs[0], s))).toBe(true);
    // A shed block is a miss, never other bytes.
    const oldest = [2, 3];
    expect(
      await load(
        c,
        dst.ids,
        oldest.map((i) => keys[i]),
        oldest,
      ),
    ).toEqual(["not_found", "not_found"]);
    for (const s of oldest) expect(blockOf(dst.regs[0], s).equals(Buffer.alloc(SHARD))).toBe(true);

    slow.throttle({ writeBps: 0 });
    await until("every block kept is written", async () => (await tier(c)).unwritten === 0, 20_000, 50);
    const after = await tier(c);
    expect(after.written + after.shed).toBe(n);
    const files = finalFiles();
    expect(files.length).toBe(after.written);
    // Whatever is on disk loads byte-exact from a fresh engine without a tier.
    const other = await start({}, "other");
    const dst2 = await regions(other.c, 1, n, "zero", shm);
    const all = Array.from({ length: n }, (_, i) => i);
    const status = await load(other.c, dst2.ids, keys, all);
    for (const i of all) {
      const onDisk = files.includes(keys[i].toString("hex"));
      expect(status[i]).toBe(onDisk ? "ok" : "not_found");
      if (onDisk) expect(blockOf(dst2.regs[0], i).equals(blockOf(src.regs[0], i))).toBe(true);
    }
  },
  60_000,
);

slowDiskTest(
  "SIGKILL while writing behind: no partial file under a block's name; every block found loads byte-exact",
  async () => {
    const slow = slowStore();
    const { e, c } = await start(behind(64));
    const n = 16;
    const src = await regions(c, 1, n, "random", shm);
    const keys = Array.from({ length: n }, (_, i) => key(i, "kill"));
    slow.throttle({ writeBps: 48 * 1024 }); // about 4 files a second
    await dumpCommit(
      c,
      src.ids,
      keys,
      keys.map((_, i) => i),
    );
    await until("some blocks are written", async () => (await tier(c)).written >= 2, 20_000, 20);
    await e.stop("SIGKILL");
    slow.throttle({ writeBps: 0 });

    const other = await start({}, "other");
    const found = ((await other.c.call("lookup", { ns: NS, keys })).found as boolean[]).map((f, i) => (f ? i : -1)).filter((i) => i >= 0);
    expect(found.length).toBeGreaterThanOrEqual(2);
    expect(found.length).toBeLessThan(n);
    expect(hex(found.map((i) => keys[i]))).toEqual(finalFiles());
    const dst = await regions(other.c, 1, n, "zero", shm);
    expect(
      await load(
        other.c,
        dst.ids,
        found.map((i) => keys[i]),
        found,
      ),
    ).toEqual(found.map(() => "ok"));
    for (const i of found) expect(blockOf(dst.regs[0], i).equals(blockOf(src.regs[0], i))).toBe(true);
  },
  60_000,
);

slowDiskTest(
  "SIGTERM writes what is held in memory before the engine exits",
  async () => {
    const slow = slowStore();
    const { e, c } = await start(behind(64));
    const n = 16;
    const src = await regions(c, 1, n, "random", shm);
    const keys = Array.from({ length: n }, (_, i) => key(i, "term"));
    slow.throttle({ writeBps: 96 * 1024 }); // about 8 files a second: 2 s for all of them
    await dumpCommit(
      c,
      src.ids,
      keys,
      keys.map((_, i) => i),
    );
    expect((await tier(c)).unwritten).toBeGreaterThan(n / 2);
    expect(await e.stop("SIGTERM")).toBe(0);
    expect(e.output()).toMatch(new RegExp(`wrote the \\d+ block\\(s\\) held in memory only to the directory before stopping`));
    expect(finalFiles()).toEqual(hex(keys));

    slow.throttle({ writeBps: 0 });
    const other = await start({}, "other");
    const dst = await regions(other.c, 1, n, "zero", shm);
    expect(
      await load(
        other.c,
        dst.ids,
        keys,
        keys.map((_, i) => i),
      ),
    ).toEqual(keys.map(() => "ok"));
    expect(dst.regs[0].read().equals(src.regs[0].read())).toBe(true);
  },
  60_000,
);

test("writeBehind: on by default with UCM's Cache|Posix, off when the file says so; without a Cache stage a warning", () => {
  const sdir = path.join(dir, "s");
  fs.mkdirSync(sdir, { mode: 0o700 });
  const pipeline = (extra: Record<string, unknown>) =>
    parseConfig({
      ucm_connectors: [
        {
          ucm_connector_name: "UcmPipelineStore",
          ucm_connector_config: { storage_backends: sdir, store_pipeline: "Cache|Posix", cache_buffer_capacity_gb: 1, ...extra },
        },
      ],
    });
  expect(pipeline({}).config.writeBehind).toBe(true);
  expect(pipeline({ writeBehind: false }).config.writeBehind).toBe(false);
  const seed = (cc: Record<string, unknown>) =>
    parseConfig({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: { storage_backends: sdir, ...cc } });
  expect(seed({}).config.writeBehind).toBe(false);
  expect(seed({ writeBehind: true, hostCacheBytes: "1GiB" }).warnings).toEqual([]);
  expect(seed({ writeBehind: true }).warnings).toEqual([
    'ucm_connector_config.writeBehind: true needs a Cache stage (hostCacheBytes, or store_pipeline "Cache|Posix"); without one every dump is written before it is answered',
  ]);
});
