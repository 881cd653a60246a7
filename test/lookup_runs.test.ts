// The prefix lookup (`lookup` with `runs`, docs/PROTOCOL.md): the keys of
// several requests in one lookup, each run answered up to its first miss, on
// the real engine process. With lookupCacheTtlS 0 every key the engine has
// not seen missing is a stat, so runs longer than the first window of keys
// go through several rounds.
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion } from "./helpers/fixtures";
import { NS, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

describe.each([
  ["blocks known to the engine", 60],
  ["every block a stat (lookupCacheTtlS 0)", 0],
])("lookup with runs: %s", (_what, ttl) => {
  let dir: string;
  let engine: RunningEngine;
  let c: EngineClient;
  const shm: ShmRegion[] = [];

  beforeAll(async () => {
    dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    engine = await startEngine(writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock`, lookupCacheTtlS: ttl }));
    c = engine.client();
    await hello(c);
  });
  afterAll(async () => {
    await engine.stop("SIGKILL");
    shm.splice(0).forEach((r) => r.unlink());
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Stores `keys` in namespace `ns`, committed. */
  async function store(ns: string, keys: Buffer[]) {
    const src = await regions(c, 1, keys.length, "random", shm);
    const d = await c.call("dump", {
      ns,
      keys,
      shards: shards(
        src.ids,
        keys.map((_, i) => i),
      ),
      commit: true,
    });
    expect((await waitDone(c, d.task as number)).status).toEqual(new Array(keys.length).fill("ok"));
  }

  test("each run is found up to its first miss, and nothing after it", async () => {
    const a = Array.from({ length: 4 }, (_, i) => key(i, `a${ttl}`));
    const b = Array.from({ length: 30 }, (_, i) => key(i, `b${ttl}`));
    const m = Array.from({ length: 3 }, (_, i) => key(i, `m${ttl}`));
    // a: blocks 0, 1 and 3 stored (2 missing); b: all 30 (longer than the first rounds' windows); m: none.
    await store(NS, [a[0], a[1], a[3], ...b]);
    const r = await c.call("lookup", { ns: NS, keys: [...a, ...b, ...m], runs: [4, 30, 3] });
    expect(r.found).toEqual([true, true, false, false, ...new Array(30).fill(true), false, false, false]);
    // Without runs the same keys are answered one by one.
    const plain = await c.call("lookup", { ns: NS, keys: [...a, ...m] });
    expect(plain.found).toEqual([true, true, false, true, false, false, false]);
  });

  test("with several namespaces a block counts when every one holds it, and an empty run is allowed", async () => {
    const k = Array.from({ length: 12 }, (_, i) => key(i, `ns${ttl}`));
    await store("runs-r0", k);
    await store("runs-r1", [...k.slice(0, 9), ...k.slice(10)]); // block 9 missing on rank 1 only
    const r = await c.call("lookup", { ns: ["runs-r0", "runs-r1"], keys: [...k, ...k.slice(0, 2)], runs: [12, 0, 2] });
    expect(r.found).toEqual([...new Array(9).fill(true), false, false, false, true, true]);
  });

  test("with bits the answer is bytes, one a key, the same answer as the booleans", async () => {
    const a = Array.from({ length: 12 }, (_, i) => key(i, `bits${ttl}`));
    await store(NS, [...a.slice(0, 5), ...a.slice(6)]); // block 5 missing
    const ks = [...a, key(99, `bits${ttl}`), ...a.slice(0, 3)];
    const runs = [12, 1, 3];
    const asBools = await c.call("lookup", { ns: NS, keys: ks, runs });
    const asBits = await c.call("lookup", { ns: NS, keys: ks, runs, bits: true });
    expect(Buffer.isBuffer(asBits.found)).toBe(true);
    expect(Array.from(asBits.found as Buffer)).toEqual((asBools.found as boolean[]).map(Number));
    expect(Array.from(asBits.found as Buffer)).toEqual([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
    const plain = await c.call("lookup", { ns: NS, keys: a.slice(4, 7), bits: true });
    expect(Array.from(plain.found as Buffer)).toEqual([1, 0, 1]);
  });
});

describe("lookup with runs: malformed runs are refused, naming the problem", () => {
  let dir: string;
  let engine: RunningEngine;
  let c: EngineClient;

  beforeAll(async () => {
    dir = shortTmp();
    fs.mkdirSync(path.join(dir, "store"));
    engine = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock` }));
    c = engine.client();
    await hello(c);
  });
  afterAll(async () => {
    await engine.stop("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const two = [key(1, "bad"), key(2, "bad")];
  test.each([
    [{ runs: "2" }, /runs must be an array of run lengths, got string/],
    [{ runs: [1] }, /runs add up to 1 keys, but keys holds 2/],
    [{ runs: [2, 1] }, /runs add up to 3 keys, but keys holds 2/],
    [{ runs: [2, -1] }, /runs\[1\] must be a non-negative integer, got number -1/],
    [{ runs: [3] }, /runs\[0\] must be at most 2, got 3/],
    [{ runs: [0, 0, 2] }, /runs holds 3 runs, more than one per key \(2 keys\)/],
    [{ runs: [2], bits: 1 }, /bits must be a boolean, got number 1/],
  ])("%j", async (extra, message) => {
    const r = await c.raw({ op: "lookup", ns: NS, keys: two, ...extra });
    expect(r.ok).toBe(false);
    expect((r.error as { code: string }).code).toBe("bad_message");
    expect((r.error as { message: string }).message).toMatch(message);
    // The engine keeps serving.
    expect((await c.call("lookup", { ns: NS, keys: two, runs: [2] })).found).toEqual([false, false]);
  });
});
