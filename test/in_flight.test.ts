// Tasks held in flight by a throttled disk (helpers/slow_disk.ts): what
// wait, check, cancel and a SIGKILL of the engine see while blocks are still
// being written or read. The throttle, not the machine's speed, decides that
// the task is still running when the test acts on it.
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { constants } from "../core/native";
import { ShmRegion } from "./helpers/fixtures";
import { NS, SHARD, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

let dir: string;
let disk: SlowDisk | undefined;
const engines: RunningEngine[] = [];
const shm: ShmRegion[] = [];

afterEach(async () => {
  for (const e of engines.splice(0)) await e.stop("SIGKILL");
  disk?.close();
  disk = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** An engine whose storage is a fresh slow disk, in that disk's cgroup (no limit set yet). */
async function slowEngine(streams = 4): Promise<{ e: RunningEngine; c: EngineClient; store: string }> {
  dir = shortTmp();
  disk = new SlowDisk(128);
  // maxQueueMs 0: blocks held behind the throttle must wait, not be shed.
  const cfg = writeConfig(dir, {
    storage_backends: disk.mnt,
    transferStreamNumber: streams,
    endpoint: `ipc://${dir}/e.sock`,
    maxQueueMs: 0,
  });
  const e = await startEngine(cfg);
  engines.push(e);
  disk.admit(e.proc.pid!);
  const c = e.client(60000);
  await hello(c);
  return { e, c, store: disk.mnt };
}

slowDiskTest("wait with a timeout and check answer done: false while the task runs, and the whole result once it ends", async () => {
  const { c } = await slowEngine();
  const src = await regions(c, 1, 16, "random", shm);
  disk!.throttle({ writeBps: 64 * 1024 }); // 16 blocks of 8 KiB + header: seconds
  const keys = Array.from({ length: 16 }, (_, i) => key(i, "wait"));
  const task = (
    await c.call("dump", {
      ns: NS,
      keys,
      shards: shards(
        src.ids,
        keys.map((_, i) => i),
      ),
    })
  ).task as number;
  expect(await c.call("wait", { task, timeout_ms: 0 })).toMatchObject({ done: false });
  expect(await c.call("check", { task })).toMatchObject({ done: false });
  const t0 = Date.now();
  expect(await c.call("wait", { task, timeout_ms: 300 })).toMatchObject({ done: false });
  expect(Date.now() - t0).toBeGreaterThanOrEqual(250); // the timeout was waited out, not answered at once
  disk!.throttle({ writeBps: 0 });
  const r = await waitDone(c, task);
  expect(r.status).toEqual(new Array(16).fill("ok"));
  expect(await c.call("check", { task })).toMatchObject({ done: true, status: r.status });
});

slowDiskTest("cancel: answered while the load runs; afterwards it writes no more memory; queued blocks end cancelled", async () => {
  const { c } = await slowEngine();
  const n = 256;
  const src = await regions(c, 1, n, "random", shm);
  const dst = await regions(c, 1, n, "zero", shm);
  const keys = Array.from({ length: n }, (_, i) => key(i, "cancel"));
  const all = keys.map((_, i) => i);
  await waitDone(c, (await c.call("dump", { ns: NS, keys, shards: shards(src.ids, all), commit: true })).task as number);
  disk!.throttle({ readBps: 128 * 1024 }); // O_DIRECT reads of 8 KiB + header: about 10 blocks a second
  const l = await c.call("load", { ns: NS, keys, shards: shards(dst.ids, all) });
  const r = await c.call("cancel", { task: l.task });
  expect(r.cancelled).toBe(true);
  const snapshot = dst.regs[0].read();
  disk!.throttle({ readBps: 0 });
  const w = await waitDone(c, l.task as number);
  expect(dst.regs[0].read().equals(snapshot)).toBe(true); // nothing landed after the cancel was answered
  expect(w.status.every((s) => s === "ok" || s === "cancelled")).toBe(true);
  expect(w.status.filter((s) => s === "cancelled").length).toBeGreaterThan(n / 2);
  w.status.forEach((s, b) => {
    const want = s === "ok" ? src.regs[0].read(b * SHARD, SHARD) : Buffer.alloc(SHARD);
    expect(dst.regs[0].read(b * SHARD, SHARD).equals(want)).toBe(true);
  });
  expect(await c.call("cancel", { task: l.task })).toMatchObject({ cancelled: false, done: true });
  await expect(c.call("cancel", { task: 999999 })).rejects.toThrow(/unknown_task|not a task of this client/);
});

/** Temporary files of `ns` in `store`, and how many are shorter than a whole block of `payload` bytes. */
function temps(store: string, ns: string, payload: number): { all: number; torn: number } {
  const tmp = path.join(store, ns, ".tmp");
  const names = fs.existsSync(tmp) ? fs.readdirSync(tmp) : [];
  let torn = 0;
  for (const n of names) {
    try {
      if (fs.statSync(path.join(tmp, n)).size < constants.headerSize + payload) torn++;
    } catch {
      // removed meanwhile
    }
  }
  return { all: names.length, torn };
}

function visibleBlocks(store: string, ns: string): number {
  const root = path.join(store, ns);
  return fs
    .readdirSync(root)
    .filter((d) => /^[0-9a-f]{2}$/.test(d))
    .reduce((sum, d) => sum + fs.readdirSync(path.join(root, d)).length, 0);
}

slowDiskTest(
  "engine killed with SIGKILL while dumps are being written: torn temporaries are never visible and are swept by the next engine",
  async () => {
    const streams = 4;
    const first = await slowEngine(streams);
    const store = first.store;
    let { e, c } = first;
    const layers = 4;
    const payload = layers * SHARD;
    const n = 400;
    const src = await regions(c, layers, n, "random", shm);
    const keys = Array.from({ length: n }, (_, i) => key(i, "kill"));
    const dump = async (from: number, to: number) =>
      (
        await c.call("dump", {
          ns: NS,
          keys: keys.slice(from, to),
          shards: shards(
            src.ids,
            Array.from({ length: to - from }, (_, j) => from + j),
          ),
        })
      ).task as number;
    // 100 blocks stored and committed at full speed.
    for (let t = 0; t < 5; t++) {
      await waitDone(c, await dump(t * 20, t * 20 + 20));
      await c.call("commit", { ns: NS, keys: keys.slice(t * 20, t * 20 + 20) });
    }
    // Then the disk slows down and 300 more are dumped, never committed.
    disk!.throttle({ writeBps: 64 * 1024 });
    const tasks: number[] = [];
    for (let t = 5; t < 20; t++) tasks.push(await dump(t * 20, t * 20 + 20));
    // A worker opens its temporary file before it may write; while the
    // stream's other worker writes, the file stays empty.
    await until("a temporary file still being written", () => temps(store, NS, payload).torn > 0);
    expect(await c.call("wait", { task: tasks[tasks.length - 1], timeout_ms: 0 })).toMatchObject({ done: false });
    await e.stop("SIGKILL");
    const left = temps(store, NS, payload);
    expect(left.torn).toBeGreaterThan(0);
    expect(visibleBlocks(store, NS)).toBe(100);
    disk!.throttle({ writeBps: 0 });

    // The next engine (outside the slow disk's cgroup) removes what the dead one left.
    e = await startEngine(writeConfig(dir, { storage_backends: store, transferStreamNumber: streams, endpoint: `ipc://${dir}/e.sock` }));
    engines.push(e);
    c = e.client(60000);
    await hello(c);
    await until("the temporary area emptied", () => temps(store, NS, payload).all === 0);
    await until("the sweep's log line", () => new RegExp(`removed ${left.all} temporary block file`).test(e.output()));

    // Exactly the committed blocks exist, and each loads byte-exact.
    const found = (await c.call("lookup", { ns: NS, keys })).found as boolean[];
    expect(found.slice(0, 100).every(Boolean)).toBe(true);
    expect(found.slice(100).some(Boolean)).toBe(false);
    expect(visibleBlocks(store, NS)).toBe(100);
    const dst = await regions(c, layers, 100, "zero", shm);
    const idx = Array.from({ length: 100 }, (_, i) => i);
    const r = await waitDone(c, (await c.call("load", { ns: NS, keys: keys.slice(0, 100), shards: shards(dst.ids, idx) })).task as number);
    expect(r.failed).toEqual([]);
    for (let s = 0; s < layers; s++) expect(dst.regs[s].read().equals(src.regs[s].read(0, 100 * SHARD))).toBe(true);
  },
  120000,
);
