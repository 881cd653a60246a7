// A copy the engine began before the client's deadline but that ends after it
// (the engine paused by SIGSTOP, a long stall) must count for nothing: the
// client may have given up and reused that memory. A load is reported failed
// (and stops writing within one chunk once the engine runs again), a dump is
// never committed. The engine is stopped from outside, in the middle of a
// real copy of a large block (helpers/pause.ts).
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { RunningEngine, hello, startEngine, writeConfig } from "./helpers/engine";
import { enginePid, stopWhen, writtenExtent } from "./helpers/pause";

const NS = "jest-copy-deadline";
const BIG = 256 << 20;
const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}${i}`).digest();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let dir: string;
let engine: RunningEngine;
let pid: number;
const shm: ShmRegion[] = [];

// A fresh engine (fresh staging, so its first copy grows its resident memory).
async function start() {
  // The store on tmpfs: reading back a 256 MiB block takes a fraction of a second, so the copy starts well
  // before the deadline even on a loaded machine.
  dir = fs.mkdtempSync("/dev/shm/ucm-cd-");
  const store = path.join(dir, "store");
  fs.mkdirSync(store);
  engine = await startEngine(writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 1 }));
  pid = enginePid(engine.output());
}

async function stop() {
  try {
    process.kill(pid, "SIGCONT");
  } catch {
    // already gone
  }
  await engine.stop("SIGKILL");
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
}

beforeEach(start);
afterEach(stop);

/**
 * Runs `scenario` until the engine was stopped in the middle of its copy: the stop comes from a thread of this
 * process polling from outside, which a loaded machine may deschedule until the copy is over. What is retried is
 * only that precondition, on a fresh engine; the assertions come after it, once.
 */
async function midCopy<T>(scenario: () => Promise<{ midway: boolean; value: T }>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const r = await scenario();
    if (r.midway) return r.value;
    if (attempt === 5) throw new Error("the engine could not be stopped in the middle of a copy in 5 attempts");
    await stop();
    await start();
  }
}

async function region(c: EngineClient, size: number, fill?: "random") {
  const r = new ShmRegion(size, fill);
  shm.push(r);
  const id = ((await c.call("register", { regions: [{ medium: "host", source: r.name, size }] })).regions as number[])[0];
  return { r, id };
}

async function waitDone(c: EngineClient, task: unknown) {
  const r = await c.call("wait", { task, timeout_ms: 60000 });
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; errno: number[] };
}

/** Keeps the engine stopped until `deadline` (unix ms) is 500 ms past, then lets it run. */
async function resumeAfter(deadline: number) {
  await sleep(Math.max(0, deadline + 500 - Date.now()));
  process.kill(pid, "SIGCONT");
}

test("a load paused mid-copy and resumed after its deadline is reported failed and stops within a chunk", async () => {
  const run = await midCopy(async () => {
    const c = engine.client(120000);
    await hello(c);
    const src = await region(c, BIG, "random");
    const k = [key(0, "paused-load")];
    const d = await c.call("dump", { ns: NS, keys: k, shards: shardColumns([src.id], BIG, [0]), commit: true });
    expect((await waitDone(c, d.task)).status).toEqual(["ok"]);
    const dst = await region(c, BIG);
    // Stops the engine once the copy into the client's memory has begun (1 MiB in).
    const stopped = stopWhen(pid, { file: dst.r.file, offset: 1 << 20 });
    const deadline = Date.now() + 4000;
    const l = await c.call("load", { ns: NS, keys: k, shards: shardColumns([dst.id], BIG, [0]), deadline_unix_ms: deadline });
    expect((await stopped).stopped).toBe(true);
    const before = writtenExtent(dst.r.file);
    expect(before).toBeGreaterThan(0);
    return { midway: before < BIG, value: { c, src, k, dst, deadline, l, before } };
  });
  const { c, src, k, dst, deadline, l, before } = run;
  await resumeAfter(deadline);
  const r = await waitDone(c, l.task);
  expect(r.status).toEqual(["cancelled"]);
  // Once running again it finished the chunk it was in, no more (chunks are a few MiB).
  const after = writtenExtent(dst.r.file);
  expect(after - before).toBeLessThanOrEqual(16 << 20);
  expect(engine.output()).not.toMatch(/FATAL|Segmentation/);
  // The same load with time to spare is whole and exact.
  const again = await c.call("load", { ns: NS, keys: k, shards: shardColumns([dst.id], BIG, [0]), deadline_unix_ms: Date.now() + 60000 });
  expect((await waitDone(c, again.task)).status).toEqual(["ok"]);
  expect(crypto.createHash("sha256").update(dst.r.read()).digest()).toEqual(crypto.createHash("sha256").update(src.r.read()).digest());
}, 120000);

test("a dump paused mid-copy and resumed after its deadline is never committed", async () => {
  const { c, src, k, deadline, d } = await midCopy(async () => {
    const c = engine.client(120000);
    await hello(c);
    const src = await region(c, BIG, "random");
    const k = [key(0, "paused-dump")];
    // Stops the engine once its copy out of the client's memory has begun: the fresh staging it copies into
    // (and the client's pages it reads) grow its resident memory, by twice the block once the copy is over.
    const stopped = stopWhen(pid, { rssGrowth: 64 << 20 });
    const deadline = Date.now() + 4000;
    const d = await c.call("dump", { ns: NS, keys: k, shards: shardColumns([src.id], BIG, [0]), commit: true, deadline_unix_ms: deadline });
    const s = await stopped;
    expect(s.stopped).toBe(true);
    return { midway: s.rssGrowth < BIG + BIG / 2, value: { c, src, k, deadline, d } };
  });
  // The client gave up at its deadline and wrote something else into that memory.
  src.r.write(0, crypto.randomBytes(BIG));
  await resumeAfter(deadline);
  const r = await waitDone(c, d.task);
  expect(r.status).toEqual(["cancelled"]);
  expect((await c.call("lookup", { ns: NS, keys: k })).found).toEqual([false]);
  const hex = k[0].toString("hex");
  expect(fs.existsSync(path.join(dir, "store", NS, hex.slice(0, 2), hex))).toBe(false);
  // No temporary file of it is left to commit.
  await sleep(200);
  expect(fs.readdirSync(path.join(dir, "store", NS, ".tmp")).filter((f) => f.startsWith(hex))).toEqual([]);
  expect((await c.call("commit", { ns: NS, keys: k, success: true })).committed).toEqual([false]);
}, 120000);
