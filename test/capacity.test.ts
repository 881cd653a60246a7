// Capacity on the real engine process: sizes in the config, a capacity shared
// by two engines on one directory, eviction racing loads, the ledger across
// restarts. Write admission: admission.test.ts; metrics and operator tools:
// operator_tools.test.ts.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { parseConfig, parseSize } from "../core/config";
import { evict } from "../core/native";
import { storeUsage } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp } from "./helpers/engine";
import { Mem, MiB, NS, engine, engines, finish, key, ledger, register, shards, stopEnginesAfterEach } from "./helpers/capacity_kit";

stopEnginesAfterEach();

describe("configuration", () => {
  const dir = shortTmp();
  test("capacity takes sizes with units, one for all backends or one per backend", () => {
    expect(parseSize("500GiB")).toBe(500 * 2 ** 30);
    expect(parseSize("1.5TB")).toBe(1.5e12);
    expect(parseSize("64M")).toBe(64 * MiB);
    expect(parseSize(4096)).toBe(4096);
    const b = path.join(dir, "b");
    fs.mkdirSync(b, { recursive: true });
    const one = parseConfig({
      ucm_connector_name: "UcmNfsStore",
      ucm_connector_config: { storage_backends: `${dir}:${b}`, capacity: "1GiB" },
    });
    expect(one.config.capacity).toEqual([2 ** 30, 2 ** 30]);
    const two = parseConfig({
      ucm_connector_name: "UcmNfsStore",
      ucm_connector_config: { storage_backends: `${dir}:${b}`, capacity: ["1GiB", 0] },
    });
    expect(two.config.capacity).toEqual([2 ** 30, 0]);
    const dflt = parseConfig({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: { storage_backends: dir } });
    expect(dflt.config.capacity).toEqual([0]);
    expect(dflt.config.metricsPort).toBe(0);
    expect(dflt.config.maxInflightBytes).toBe(4 * 2 ** 30);
  });

  test.each([
    [{ capacity: "lots" }, /ucm_connector_config\.capacity must be a size.*"lots"/],
    [{ capacity: "1MiB" }, /capacity: 1048576 bytes .* below the 16 MiB minimum/],
    [{ capacity: ["1GiB", "1GiB"] }, /capacity lists 2 sizes for 1 storage backends/],
    [{ maxInflightBytes: "12 parsecs" }, /maxInflightBytes must be a size.*"12 parsecs"/],
    [{ maxQueueMs: -1 }, /maxQueueMs must be between 0 and 3600000, got -1/],
    [{ metricsPort: 70000 }, /metricsPort must be between 0 and 65535, got 70000/],
  ])("bad value %j is refused, naming the key and the value", (extra, re) => {
    expect(() => parseConfig({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: { storage_backends: dir, ...extra } })).toThrow(re);
  });
});

describe("capacity", () => {
  test("two engines writing concurrently keep the shared directory within its capacity", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const capacity = 64 * MiB;
    const cfg = { storage_backends: store, capacity: "64MiB", evictionGraceS: 0, capacitySyncMs: 50, transferStreamNumber: 4 };
    const [a, b] = [await engine(dir, "a", cfg), await engine(dir, "b", cfg)];
    const shard = 64 * 1024;
    const perBlock = 4096 + 2 * shard; // header + payload
    let peak = 0;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        peak = Math.max(peak, storeUsage(store).bytes);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const write = async (e: RunningEngine, salt: string) => {
      const c = e.client();
      await hello(c);
      const m = await register(c, 2, 8, shard, "random");
      const stored: Buffer[] = [];
      for (let batch = 0; batch < 60; batch++) {
        const keys = Array.from({ length: 8 }, (_, j) => key(batch * 8 + j, salt));
        const d = await c.call("dump", { ns: NS, keys, shards: shards(m, [0, 1, 2, 3, 4, 5, 6, 7]), commit: true });
        (await finish(c, d.task)).status.forEach((s, j) => s === "ok" && stored.push(keys[j]));
      }
      return { c, stored };
    };
    const [ra, rb] = await Promise.all([write(a, "a"), write(b, "b")]);
    sampling = false;
    await sampler;
    // 960 blocks of 132 KiB (124 MiB) went through a 64 MiB directory. An
    // engine sees the other's writes once they are committed and synced, so
    // the bound is the capacity plus what the other has in flight (~1 MiB).
    // Eviction keeps up: most blocks are stored (about 750 of 960 on a quiet 2-core machine; above 500 under
    // heavy load from other processes, which slows eviction more than the writes).
    expect(ra.stored.length + rb.stored.length).toBeGreaterThan(400);
    const tolerance = 1.05;
    expect(peak).toBeLessThanOrEqual(capacity * tolerance);
    await new Promise((r) => setTimeout(r, 300)); // one ledger sync
    const final = storeUsage(store);
    expect(final.bytes).toBeLessThanOrEqual(capacity);
    const sa = await ra.c.call("stats");
    const sb = await rb.c.call("stats");
    const evicted = [sa, sb].reduce((n, s) => n + (s.capacity as Array<{ evictedFiles: number }>)[0].evictedFiles, 0);
    expect(evicted).toBeGreaterThan(0);
    // The most recent blocks of each engine survived (least recently used go first).
    console.log(
      `capacity: ${ra.stored.length + rb.stored.length} of 960 stored, ${evicted} evicted, dropped for capacity ${Number(sa.droppedCapacity) + Number(sb.droppedCapacity)}, peak ${(peak / MiB).toFixed(1)} MiB, final ${(final.bytes / MiB).toFixed(1)} MiB`,
    );
    const recentA = ra.stored.slice(-8);
    const found = (await ra.c.call("lookup", { ns: NS, keys: recentA })).found as boolean[];
    expect(found.filter(Boolean).length).toBeGreaterThanOrEqual(6);
    // Both engines stop; the ledger then matches the directory.
    await Promise.all(engines.splice(0).map((e) => e.stop()));
    const l = ledger(store);
    const after = storeUsage(store);
    const ahead = l.bytes - after.bytes;
    console.log(`capacity: ledger ${(ahead / MiB).toFixed(2)} MiB ahead of the directory after the stop`);
    // What the last eviction pass could not tell apart: blocks on disk when
    // its scan listed them whose ledger update came after the pass began
    // (counted by both). Per engine: the dump it has in flight (8 blocks, its
    // bytes reported when the whole dump is done), what it reported but not
    // yet sent (sent at capacity / 64 or every capacitySyncMs), and one more
    // dump finishing while that send waits for the ledger's lock. Seen here:
    // 0 to 1.9 MiB on a quiet machine, 2.8 MiB in a CI run; the bound is 6 MiB.
    // Directories that grew since the last scan are the only way to fall behind.
    const inFlight = 2 * (2 * 8 * perBlock + capacity / 64);
    expect(ahead).toBeLessThanOrEqual(inFlight);
    expect(ahead).toBeGreaterThanOrEqual(-64 * 1024);
    expect(after.blocks * perBlock).toBe(after.bytes - after.holders);
    // With nothing in flight, a pass puts the ledger exactly on the directory.
    const rescan = await evict({ dir: store, graceMs: 0, timeoutMs: 5000 });
    expect(rescan.error).toBeNull();
    expect({ bytes: rescan.usedBytes, ledger: ledger(store) }).toEqual({
      bytes: after.bytes,
      ledger: { bytes: after.bytes, files: after.blocks },
    });
  }, 120000);

  test("the used-space figure (blocks and the namespace's directories) survives a restart, and a lost ledger is rebuilt by a scan", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const cfg = { storage_backends: store, capacity: "64MiB", capacitySyncMs: 50 };
    let e = await engine(dir, "a", cfg);
    let c = e.client();
    await hello(c);
    const m = await register(c, 2, 16, 32 * 1024, "random");
    const keys = Array.from({ length: 16 }, (_, j) => key(j, "restart"));
    const d = await c.call("dump", {
      ns: NS,
      keys,
      shards: shards(
        m,
        keys.map((_, j) => j),
      ),
      commit: true,
    });
    await finish(c, d.task);
    await e.stop();
    engines.splice(0);
    const onDisk = storeUsage(store);
    expect(onDisk.blocks).toBe(16);
    // The namespace's 257 directories count too (ext4 here: 4 KiB each at least; the scan after a lost ledger
    // below finds the same figure as the engine reported when it made them).
    expect(onDisk.holders).toBeGreaterThanOrEqual(257 * 4096);
    expect(ledger(store)).toEqual({ bytes: onDisk.bytes, files: 16 });
    const usedAfterStart = async () => {
      e = await engine(dir, "a", cfg);
      c = e.client();
      await hello(c);
      const s = await c.call("stats");
      await e.stop();
      engines.splice(0);
      return (s.capacity as Array<{ usedBytes: number; usedFiles: number }>)[0];
    };
    expect(await usedAfterStart()).toMatchObject({ usedBytes: onDisk.bytes, usedFiles: 16 });
    fs.rmSync(path.join(store, ".ucm"), { recursive: true });
    expect(await usedAfterStart()).toMatchObject({ usedBytes: onDisk.bytes, usedFiles: 16 });
  }, 60000);

  test("eviction racing concurrent loads never serves a wrong or torn block: a clean miss at worst", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const cfg = {
      storage_backends: store,
      capacity: "16MiB",
      evictionGraceS: 0,
      capacitySyncMs: 20,
      lookupCacheTtlS: 0,
      transferStreamNumber: 4,
    };
    const [w, r] = [await engine(dir, "w", cfg), await engine(dir, "r", cfg)];
    const cw = w.client();
    const cr = r.client();
    await hello(cw);
    await hello(cr);
    const shard = 32 * 1024;
    const total = 600; // 600 x 68 KiB = 40 MiB through a 16 MiB directory
    const src = await register(cw, 2, total, shard, "random");
    // Each reader has its own destination (two on the other engine, one on the writer).
    const dsts: Array<[EngineClient, Mem]> = [
      [cr, await register(cr, 2, total, shard, "zero")],
      [cr, await register(cr, 2, total, shard, "zero")],
      [cw, await register(cw, 2, total, shard, "zero")],
    ];
    const keys = Array.from({ length: total }, (_, i) => key(i, "race"));
    let written = 0;
    let writing = true;
    const tally = { ok: 0, not_found: 0 };
    const loader = async (c: EngineClient, dst: Mem) => {
      while (writing) {
        if (written < 16) {
          await new Promise((res) => setTimeout(res, 5));
          continue;
        }
        // The oldest blocks are the ones being evicted: read those.
        const hi = written;
        const pick = [...new Set(Array.from({ length: 16 }, () => Math.floor(Math.random() * Math.min(hi, Math.max(64, hi / 2)))))];
        const l = await c.call("load", { ns: NS, keys: pick.map((i) => keys[i]), shards: shards(dst, pick) });
        const res = await finish(c, l.task);
        res.status.forEach((s, j) => {
          expect(["ok", "not_found"]).toContain(s);
          tally[s as "ok" | "not_found"]++;
          const i = pick[j];
          for (let q = 0; q < 2; q++) {
            if (s === "ok") expect(dst.regs[q].read(i * shard, shard).equals(src.regs[q].read(i * shard, shard))).toBe(true);
            dst.regs[q].write(i * shard, Buffer.alloc(shard));
          }
        });
      }
    };
    const loaders = dsts.map(([c, dst]) => loader(c, dst));
    for (let i = 0; i < total; i += 8) {
      const idx = Array.from({ length: 8 }, (_, j) => i + j);
      const d = await cw.call("dump", { ns: NS, keys: idx.map((j) => keys[j]), shards: shards(src, idx), commit: true });
      await finish(cw, d.task);
      written = i + 8;
    }
    writing = false;
    await Promise.all(loaders);
    expect(tally.ok).toBeGreaterThan(0);
    expect(tally.not_found).toBeGreaterThan(0); // eviction did race the readers
    const s = await cw.call("stats");
    expect((s.capacity as Array<{ evictedFiles: number }>)[0].evictedFiles).toBeGreaterThan(0);
    expect(storeUsage(store).bytes).toBeLessThanOrEqual(16 * MiB);
  }, 120000);
});

describe("what the ledger counts", () => {
  test("two commits of one key: the first copy stays, the ledger counts one file, and a rescan agrees", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "a", { storage_backends: store, capacity: "64MiB", capacitySyncMs: 50, capacityRescanS: 2 });
    const [a, b] = [e.client(), e.client()];
    await hello(a);
    await hello(b);
    const shard = 64 * 1024;
    const [ma, mb] = [await register(a, 2, 1, shard, "random"), await register(b, 2, 1, shard, "random")];
    const k = key(0, "twice");
    // Both dump the key before either commits (each finds it not stored), then both commit.
    for (const [c, m] of [
      [a, ma],
      [b, mb],
    ] as const)
      expect((await finish(c, (await c.call("dump", { ns: NS, keys: [k], shards: shards(m, [0]) })).task)).status).toEqual(["ok"]);
    expect((await a.call("commit", { ns: NS, keys: [k] })).committed).toEqual([true]);
    expect((await b.call("commit", { ns: NS, keys: [k] })).committed).toEqual([true]);
    const counters = await b.call("stats");
    expect(counters.commits).toBe(1);
    expect(counters.commitsKeptFirst).toBe(1);
    // The stored block is a's: a load gives a's bytes.
    const dst = await register(a, 2, 1, shard, "zero");
    expect((await finish(a, (await a.call("load", { ns: NS, keys: [k], shards: shards(dst, [0]) })).task)).status).toEqual(["ok"]);
    for (let i = 0; i < 2; i++) expect(dst.regs[i].read().equals(ma.regs[i].read())).toBe(true);
    await new Promise((r) => setTimeout(r, 300)); // the ledger's next sync
    const onDisk = storeUsage(store);
    expect(onDisk).toMatchObject({ blocks: 1, temps: 0 });
    expect(ledger(store)).toEqual({ bytes: onDisk.bytes, files: 1 });
    // A rescan of the directory finds what the ledger says.
    const rescans = () => (e.output().match(/periodic rescan: scanned 1 block file\(s\)/g) ?? []).length;
    const until = Date.now() + 10000;
    while (rescans() < 1 && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
    expect(rescans()).toBeGreaterThanOrEqual(1);
    expect(ledger(store)).toEqual({ bytes: onDisk.bytes, files: 1 });
  }, 60000);

  test("commits renamed while a rescan lists the directory are counted once", async () => {
    // Another engine's commits land while this engine's scan runs: each one a
    // rename from .tmp into the block's fan-out directory. The scan lists .tmp
    // first; a block renamed afterwards into a directory not listed yet was
    // counted twice (CI, 2026-12-05: the ledger 4.1 MiB ahead of a 64 MiB
    // directory after two engines stopped). Renames here come from this
    // process while the addon's scan runs on its own thread, over thousands of
    // block files so the scan lasts long enough to be caught in the middle.
    const store = path.join(shortTmp(), "store");
    const ns = path.join(store, NS);
    const hex = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}${i}`).digest("hex");
    fs.mkdirSync(path.join(ns, ".tmp"), { recursive: true });
    for (let f = 0; f < 256; f++) fs.mkdirSync(path.join(ns, f.toString(16).padStart(2, "0")));
    const payload = Buffer.alloc(3000, 7);
    for (let i = 0; i < 6000; i++) {
      const k = hex(i, "stored");
      fs.writeFileSync(path.join(ns, k.slice(0, 2), k), payload);
    }
    const temps = Array.from({ length: 600 }, (_, i) => hex(i, "landing"));
    const tempPayload = Buffer.alloc(5000, 9);
    for (const k of temps) fs.writeFileSync(path.join(ns, ".tmp", `${k}.t.1`), tempPayload);
    let done = false;
    const t0 = Date.now();
    const pass = evict({ dir: store, graceMs: 0, timeoutMs: 5000 }).finally(() => {
      done = true;
    });
    let renamed = 0;
    while (!done && renamed < temps.length) {
      for (const k of temps.slice(renamed, renamed + 2)) fs.renameSync(path.join(ns, ".tmp", `${k}.t.1`), path.join(ns, k.slice(0, 2), k));
      renamed += 2;
      await new Promise((r) => setTimeout(r, 0));
    }
    const r = await pass;
    const onDisk = storeUsage(store);
    console.log(
      `rescan during commits: ${renamed} of ${temps.length} temporary files renamed before the pass ended (${Date.now() - t0} ms)`,
    );
    expect(renamed).toBeGreaterThan(0);
    expect(renamed).toBeLessThan(temps.length); // the pass ended while commits were still landing
    expect(r.error).toBeNull();
    // A temporary file and its block file are the same bytes, so the bytes
    // are exact whenever the pass ended; the block count may miss the commits
    // that came after the scan (their engine's ledger update adds them).
    expect(r.usedBytes).toBe(onDisk.bytes);
    expect(ledger(store).bytes).toBe(onDisk.bytes);
    expect(r.usedFiles).toBeLessThanOrEqual(onDisk.blocks);
    expect(r.usedFiles).toBeGreaterThanOrEqual(6000);
  }, 60000);

  test("written behind (a Cache stage with writeBehind): once the files are written the ledger equals the directory", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "a", {
      storage_backends: store,
      capacity: "64MiB",
      capacitySyncMs: 50,
      capacityRescanS: 2,
      hostCacheBytes: "16MiB",
      writeBehind: true,
      transferStreamNumber: 2,
    });
    const c = e.client();
    await hello(c);
    const shard = 128 * 1024;
    const m = await register(c, 2, 16, shard, "random");
    const keys = Array.from({ length: 16 }, (_, j) => key(j, "behind"));
    const d = await c.call("dump", { ns: NS, keys, shards: shards(m, [...keys.keys()]) });
    expect((await finish(c, d.task)).status).toEqual(keys.map(() => "ok"));
    expect((await c.call("commit", { ns: NS, keys })).committed).toEqual(keys.map(() => true));
    const tier = async () => (await c.call("stats")).tier as { unwritten: number; written: number; shed: number };
    const until = Date.now() + 20000;
    while ((await tier()).unwritten > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    expect(await tier()).toMatchObject({ unwritten: 0, written: 16, shed: 0 });
    await new Promise((r) => setTimeout(r, 300)); // the ledger's next sync
    const onDisk = storeUsage(store);
    expect(onDisk).toMatchObject({ blocks: 16, temps: 0 });
    expect(ledger(store)).toEqual({ bytes: onDisk.bytes, files: 16 });
    // A rescan of the directory finds what the ledger says.
    const rescans = () => (e.output().match(/periodic rescan: scanned 16 block file\(s\)/g) ?? []).length;
    const end = Date.now() + 10000;
    while (rescans() < 1 && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
    expect(rescans()).toBeGreaterThanOrEqual(1);
    expect(ledger(store)).toEqual({ bytes: onDisk.bytes, files: 16 });
  }, 60000);

  test("dumps never committed count against the capacity until they are discarded (uncommittedTimeoutS)", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const capacity = 16 * MiB;
    const e = await engine(dir, "a", {
      storage_backends: store,
      capacity: "16MiB",
      capacitySyncMs: 50,
      uncommittedTimeoutS: 2,
      transferStreamNumber: 2,
    });
    const c = e.client();
    await hello(c);
    const shard = 256 * 1024;
    const m = await register(c, 2, 32, shard, "random"); // 32 blocks of 512 KiB: twice the capacity
    const keys = Array.from({ length: 32 }, (_, j) => key(j, "uncommitted"));
    let ok = 0;
    for (let j = 0; j < 32; j += 4) {
      const d = await c.call("dump", { ns: NS, keys: keys.slice(j, j + 4), shards: shards(m, [j, j + 1, j + 2, j + 3]) });
      ok += (await finish(c, d.task)).status.filter((s) => s === "ok").length;
    }
    const full = storeUsage(store);
    expect(ok).toBeLessThan(32);
    expect(full.temps).toBe(ok);
    expect(full.bytes).toBeLessThanOrEqual(capacity);
    expect(((await c.call("stats")).droppedCapacity as number) + ok).toBe(32);
    // Never committed: discarded after uncommittedTimeoutS (the sweep runs every 10 s), their room given back.
    const until = Date.now() + 20000;
    while (storeUsage(store).temps > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 200));
    expect(storeUsage(store).temps).toBe(0);
    await new Promise((r) => setTimeout(r, 300));
    expect(ledger(store).bytes).toBe(storeUsage(store).bytes);
    const d = await c.call("dump", { ns: NS, keys: [key(99, "uncommitted")], shards: shards(m, [0]), commit: true });
    expect((await finish(c, d.task)).status).toEqual(["ok"]);
  }, 60000);
});
