// Write admission on the real engine process: in-flight bytes, second sight,
// and writes shed on a slow disk (helpers/slow_disk.ts, where the machine
// allows one), never queued.
import * as fs from "fs";
import * as path from "path";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";
import { hello, shortTmp } from "./helpers/engine";
import { MiB, NS, engine, engines, finish, key, register, shards, stopEnginesAfterEach } from "./helpers/capacity_kit";

stopEnginesAfterEach();

describe("write admission", () => {
  test("in-flight bytes above maxInflightBytes are dropped at once, counted, never queued", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "a", { storage_backends: store, maxInflightBytes: "1MiB", transferStreamNumber: 1 });
    const c = e.client();
    await hello(c);
    const m = await register(c, 1, 64, 256 * 1024, "random");
    const keys = Array.from({ length: 64 }, (_, i) => key(i, "inflight"));
    const d = await c.call("dump", {
      ns: NS,
      keys,
      shards: shards(
        m,
        keys.map((_, i) => i),
      ),
      commit: true,
    });
    const r = await finish(c, d.task);
    expect(r.status.filter((s) => s === "ok").length).toBe(4); // 4 x 256 KiB fit in 1 MiB
    expect(r.status.filter((s) => s === "dropped").length).toBe(60);
    const s = await c.call("stats");
    expect(s.droppedInflight).toBe(60);
    expect(s.inflightDumpBytes).toBe(0);
    // Dropped blocks are simply not stored: a later dump may store them.
    const again = await c.call("dump", { ns: NS, keys: keys.slice(4, 8), shards: shards(m, [4, 5, 6, 7]), commit: true });
    expect((await finish(c, again.task)).status).toEqual(["ok", "ok", "ok", "ok"]);
  }, 30000);

  test("admitOnSecondSight stores a block the second time it is dumped", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "a", { storage_backends: store, admitOnSecondSight: true });
    const c = e.client();
    await hello(c);
    const m = await register(c, 2, 4, 8192, "random");
    const keys = Array.from({ length: 4 }, (_, i) => key(i, "second"));
    const dump = async () =>
      (await finish(c, (await c.call("dump", { ns: NS, keys, shards: shards(m, [0, 1, 2, 3]), commit: true })).task)).status;
    expect(await dump()).toEqual(["dropped", "dropped", "dropped", "dropped"]);
    expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([false, false, false, false]);
    expect(await dump()).toEqual(["ok", "ok", "ok", "ok"]);
    expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, true, true, true]);
    expect((await c.call("stats")).deferredFirstSight).toBe(4);
  }, 30000);

  test("a key another dump is writing is skipped, not written twice (issue 24)", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "a", { storage_backends: store, transferStreamNumber: 2 });
    const c = e.client();
    await hello(c);
    const m = await register(c, 1, 16, 4 * MiB, "random");
    // The same key twice in one request (two requests of one step with the same prefix, as vLLM sends them).
    const k = key(0, "twice");
    const one = await c.call("dump", { ns: NS, keys: [k, k], shards: shards(m, [0, 1]), commit: true });
    expect((await finish(c, one.task)).status).toEqual(["ok", "skipped"]);
    let s = await c.call("stats");
    expect(s.blocksDumped).toBe(1);
    expect(s.blocksSkippedInFlight).toBe(1);
    // Two clients dumping the same 8 keys at once (every TP rank of an MLA model shares one namespace): each key
    // is written once, whether the second request finds it being written or already stored.
    const other = e.client();
    await hello(other);
    const m2 = await register(other, 1, 16, 4 * MiB, "random");
    const keys = Array.from({ length: 8 }, (_, i) => key(i, "together"));
    const idx = keys.map((_, i) => i);
    const [a, b] = await Promise.all([
      c.call("dump", { ns: NS, keys, shards: shards(m, idx), commit: true }),
      other.call("dump", { ns: NS, keys, shards: shards(m2, idx), commit: true }),
    ]);
    const ra = (await finish(c, a.task)).status;
    const rb = (await finish(other, b.task)).status;
    expect(ra.filter((x) => x === "ok").length + rb.filter((x) => x === "ok").length).toBe(8);
    expect([...ra, ...rb].filter((x) => x === "skipped").length).toBe(8);
    s = await c.call("stats");
    expect(s.blocksDumped).toBe(9);
    const files = fs.readdirSync(path.join(store, NS), { recursive: true }).filter((f) => /[0-9a-f]{64}$/.test(String(f)));
    expect(files.length).toBe(9);
  }, 60000);

  // A real slow disk (helpers/slow_disk.ts): writes held to 1 MB/s for the engine process.
  slowDiskTest(
    "on a slow disk, dumps are answered at once and the excess is shed, not queued",
    async () => {
      const disk = new SlowDisk(96);
      try {
        const mnt = disk.mnt;
        disk.throttle({ writeBps: 1048576 });
        const dir = shortTmp();
        const e = await engine(dir, "slow", { storage_backends: mnt, transferStreamNumber: 2, maxQueueMs: 300, maxInflightBytes: "64MiB" });
        disk.admit(e.proc.pid!);
        const c = e.client();
        await hello(c);
        const m = await register(c, 1, 48, MiB, "random");
        const tasks: unknown[] = [];
        const replyMs: number[] = [];
        for (let r = 0; r < 4; r++) {
          const idx = Array.from({ length: 12 }, (_, j) => r * 12 + j);
          const t0 = Date.now();
          const d = await c.call("dump", { ns: NS, keys: idx.map((i) => key(i, "slow")), shards: shards(m, idx), commit: true });
          replyMs.push(Date.now() - t0);
          tasks.push(d.task);
        }
        // 48 MiB at 1 MB/s would take 48 s; the queue bound sheds what cannot start within 300 ms.
        const t0 = Date.now();
        const results = [];
        for (const t of tasks) results.push(await finish(c, t, 30000));
        const drainMs = Date.now() - t0;
        const all = results.flatMap((r) => r.status);
        const ok = all.filter((s) => s === "ok").length;
        const dropped = all.filter((s) => s === "dropped").length;
        console.log(
          `slow disk: dump replies ${replyMs.join("/")} ms; ${ok} stored, ${dropped} dropped (queue age); drained in ${drainMs} ms`,
        );
        expect(Math.max(...replyMs)).toBeLessThan(2000);
        expect(ok).toBeGreaterThan(0);
        expect(dropped).toBeGreaterThan(24);
        expect(ok + dropped).toBe(48);
        expect(drainMs).toBeLessThan(25000);
        expect((await c.call("stats")).droppedQueueAge).toBe(dropped);
        await e.stop();
        engines.splice(0);
      } finally {
        disk.close();
      }
    },
    90000,
  );
});
