// The engine touches a client's memory only while the client still expects
// it to: never after the request's deadline, never after an acknowledged
// cancel, and a client that shrinks its shared memory underneath a copy
// fails its own blocks instead of killing the engine (SIGBUS) for everyone.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

const NS = "jest-client-memory";
const SHARD = 1 << 20;
const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}${i}`).digest();

let dir: string;
let store: string;
let engine: RunningEngine;
let disk: SlowDisk | undefined;
const shm: ShmRegion[] = [];

/**
 * One transfer stream: a big task ahead keeps the next one queued. With
 * `slow`, the store is a throttled disk (helpers/slow_disk.ts) that holds the
 * task ahead for as long as the test needs, whatever the machine's speed.
 */
async function start(slow = false) {
  dir = shortTmp();
  if (slow) disk = new SlowDisk(128);
  store = disk ? disk.mnt : path.join(dir, "store");
  if (!disk) fs.mkdirSync(store);
  engine = await startEngine(
    writeConfig(dir, { storage_backends: store, transferStreamNumber: 1, endpoint: `ipc://${dir}/e.sock`, maxQueueMs: 0 }),
  );
  disk?.admit(engine.proc.pid!);
}
afterEach(async () => {
  await engine.stop("SIGKILL");
  disk?.close();
  disk = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Waits (polling) until `at` (a deadline) has passed on this machine's clock, by `marginMs`. */
async function past(at: number, marginMs = 50) {
  await until("the deadline to pass", () => Date.now() > at + marginMs);
}

async function region(c: EngineClient, blocks: number, fill?: "random") {
  const r = new ShmRegion(blocks * SHARD, fill);
  shm.push(r);
  const id = ((await c.call("register", { regions: [{ medium: "host", source: r.name, size: r.size }] })).regions as number[])[0];
  return { r, id };
}

async function waitDone(c: EngineClient, task: number) {
  const r = await c.call("wait", { task, timeout_ms: 60000 });
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; what?: string[] };
}

/**
 * Keeps the single transfer stream busy: with a large dump, or (loads go before dumps) with a large load of
 * blocks stored first; `slowDown` throttles the disk just before it is submitted.
 */
async function occupy(c: EngineClient, op: "dump" | "load", slowDown: () => void, blocks = 48) {
  const big = await region(c, blocks, "random");
  const ks = Array.from({ length: blocks }, (_, i) => key(i, `busy-${op}`));
  const shards = shardColumns(
    [big.id],
    SHARD,
    ks.map((_, i) => i),
  );
  if (op === "load") await waitDone(c, (await c.call("dump", { ns: NS, keys: ks, shards, commit: true })).task as number);
  slowDown();
  return (await c.call(op, { ns: NS, keys: ks, shards, commit: true })).task as number;
}

slowDiskTest("a load whose deadline passes while queued never writes the client's memory", async () => {
  await start(true);
  const c = engine.client(60000);
  await hello(c);
  const src = await region(c, 2, "random");
  const ks = [key(0, "late"), key(1, "late")];
  const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns([src.id], SHARD, [0, 1]), commit: true });
  expect((await waitDone(c, d.task as number)).status).toEqual(["ok", "ok"]);
  const dst = await region(c, 2);
  const busy = await occupy(c, "load", () => disk!.throttle({ readBps: 1 << 20 }));
  const deadline = Date.now() + 300;
  const l = await c.call("load", { ns: NS, keys: ks, shards: shardColumns([dst.id], SHARD, [0, 1]), deadline_unix_ms: deadline });
  await past(deadline);
  expect((await c.call("check", { task: l.task })).done).toBe(false); // still queued behind the slow load
  disk!.throttle({ readBps: 0 });
  const r = await waitDone(c, l.task as number);
  expect(r.status).toEqual(["cancelled", "cancelled"]);
  expect(dst.r.read().equals(Buffer.alloc(2 * SHARD))).toBe(true);
  await waitDone(c, busy);
  // With time to spare, the same load works.
  const ok = await c.call("load", {
    ns: NS,
    keys: ks,
    shards: shardColumns([dst.id], SHARD, [0, 1]),
    deadline_unix_ms: Date.now() + 30000,
  });
  expect((await waitDone(c, ok.task as number)).status).toEqual(["ok", "ok"]);
  expect(dst.r.read().equals(src.r.read())).toBe(true);
});

slowDiskTest("a dump whose deadline passes while queued never reads the memory and never commits", async () => {
  await start(true);
  const c = engine.client(60000);
  await hello(c);
  const src = await region(c, 2, "random");
  const busy = await occupy(c, "dump", () => disk!.throttle({ writeBps: 1 << 20 }));
  const ks = [key(0, "lated"), key(1, "lated")];
  const deadline = Date.now() + 300;
  const d = await c.call("dump", {
    ns: NS,
    keys: ks,
    shards: shardColumns([src.id], SHARD, [0, 1]),
    commit: true,
    deadline_unix_ms: deadline,
  });
  await past(deadline);
  expect((await c.call("check", { task: d.task })).done).toBe(false); // still queued behind the slow dump
  // The client gave up and reuses its memory.
  src.r.write(0, crypto.randomBytes(2 * SHARD));
  disk!.throttle({ writeBps: 0 });
  expect((await waitDone(c, d.task as number)).status).toEqual(["cancelled", "cancelled"]);
  await waitDone(c, busy);
  expect((await c.call("lookup", { ns: NS, keys: ks })).found).toEqual([false, false]);
  // No temporary file of these keys was ever left behind.
  const ours = new Set(ks.map((k) => k.toString("hex")));
  expect(fs.readdirSync(path.join(store, NS, ".tmp")).filter((f) => ours.has(f.split(".")[0]))).toEqual([]);
});

test("a request that arrives after its deadline is refused, naming the field", async () => {
  await start();
  const c = engine.client(60000);
  await hello(c);
  const dst = await region(c, 1);
  // The engine is stopped while the request waits in its socket.
  process.kill(engine.proc.pid!, "SIGSTOP");
  const late = c.call("load", {
    ns: NS,
    keys: [key(0, "x")],
    shards: shardColumns([dst.id], SHARD, [0]),
    deadline_unix_ms: Date.now() + 100,
  });
  await new Promise((r) => setTimeout(r, 400));
  process.kill(engine.proc.pid!, "SIGCONT");
  await expect(late).rejects.toMatchObject({ code: "expired", message: expect.stringMatching(/deadline_unix_ms \d+ has passed/) });
});

slowDiskTest("after cancel of a dump is acknowledged, its memory is never read again", async () => {
  await start(true);
  const c = engine.client(60000);
  await hello(c);
  const src = await region(c, 8, "random");
  const busy = await occupy(c, "dump", () => disk!.throttle({ writeBps: 1 << 20 }));
  const ks = Array.from({ length: 8 }, (_, i) => key(i, "cd"));
  const d = await c.call("dump", {
    ns: NS,
    keys: ks,
    shards: shardColumns(
      [src.id],
      SHARD,
      ks.map((_, i) => i),
    ),
    commit: true,
  });
  const cr = await c.call("cancel", { task: d.task });
  expect(cr.cancelled).toBe(true);
  src.r.write(0, crypto.randomBytes(8 * SHARD)); // reused at once
  disk!.throttle({ writeBps: 0 });
  const r = await waitDone(c, d.task as number);
  expect(r.status).toEqual(new Array(8).fill("cancelled"));
  await waitDone(c, busy);
  expect((await c.call("lookup", { ns: NS, keys: ks })).found).toEqual(new Array(8).fill(false));
});

test("shared memory shrunk under the engine fails that client's blocks; the engine and other clients go on", async () => {
  await start();
  const bad = engine.client(60000);
  await hello(bad);
  const victim = await region(bad, 4, "random");
  fs.truncateSync(victim.r.file, 0); // the mapping's pages are gone: a plain copy would be SIGBUS
  const ks = Array.from({ length: 4 }, (_, i) => key(i, "shrunk"));
  const d = await bad.call("dump", { ns: NS, keys: ks, shards: shardColumns([victim.id], SHARD, [0, 1, 2, 3]), commit: true });
  const dr = await waitDone(bad, d.task as number);
  expect(dr.status).toEqual(["io_error", "io_error", "io_error", "io_error"]);
  const l = await bad.call("load", { ns: NS, keys: [key(9, "x")], shards: shardColumns([victim.id], SHARD, [0]) });
  expect((await waitDone(bad, l.task as number)).status).toEqual(["not_found"]);
  expect(engine.output()).toMatch(/the client's shared memory shrank under the copy/);

  const good = engine.client(60000);
  await hello(good);
  const src = await region(good, 2, "random");
  const dst = await region(good, 2);
  const gk = [key(0, "good"), key(1, "good")];
  const gd = await good.call("dump", { ns: NS, keys: gk, shards: shardColumns([src.id], SHARD, [0, 1]), commit: true });
  expect((await waitDone(good, gd.task as number)).status).toEqual(["ok", "ok"]);
  // The victim's load of a stored block into shrunk memory fails too, without a crash.
  const vl = await bad.call("load", { ns: NS, keys: gk, shards: shardColumns([victim.id], SHARD, [0, 1]) });
  expect((await waitDone(bad, vl.task as number)).status).toEqual(["io_error", "io_error"]);
  const gl = await good.call("load", { ns: NS, keys: gk, shards: shardColumns([dst.id], SHARD, [0, 1]) });
  expect((await waitDone(good, gl.task as number)).status).toEqual(["ok", "ok"]);
  expect(dst.r.read().equals(src.r.read())).toBe(true);
  expect((await good.call("health")).status).toBe("serving");
});
