// Faults: damaged block files, a full disk, two engines sharing one
// directory. Nothing wrong may ever be served. (A killed engine:
// in_flight.test.ts; hostile input: fuzz.test.ts.)
import { execFileSync, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { constants } from "../core/native";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

const NS = "rel-ns";
const SHARD = 8192;

const key = (i: number, salt = "r") => crypto.createHash("sha256").update(`${salt}${i}`).digest();

interface Mem {
  regs: ShmRegion[];
  ids: number[];
}

async function register(c: EngineClient, n: number, blocks: number, fill: "random" | "zero", track: ShmRegion[]): Promise<Mem> {
  const regs = Array.from({ length: n }, () => new ShmRegion(blocks * SHARD, fill));
  track.push(...regs);
  const r = await c.call("register", { regions: regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) });
  return { regs, ids: r.regions as number[] };
}

function shards(m: Mem, blocks: number[]) {
  return shardColumns(m.ids, SHARD, blocks);
}

async function finish(c: EngineClient, task: unknown) {
  const r = await c.call("wait", { task, timeout_ms: 30000 });
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; failed: number[]; errno: number[] };
}

function blockFile(store: string, ns: string, k: Buffer): string {
  const hex = k.toString("hex");
  return path.join(store, ns, hex.slice(0, 2), hex);
}

const shm: ShmRegion[] = [];
afterEach(() => shm.splice(0).forEach((r) => r.unlink()));

describe("with a running engine", () => {
  let dir: string;
  let store: string;
  let engine: RunningEngine;
  let c: EngineClient;
  beforeEach(async () => {
    dir = shortTmp();
    store = path.join(dir, "store");
    fs.mkdirSync(store);
    engine = await startEngine(
      writeConfig(dir, { storage_backends: store, transferStreamNumber: 4, endpoint: `ipc://${dir}/e.sock`, lookupCacheTtlS: 0 }),
    );
    c = engine.client();
    await hello(c);
  });
  afterEach(async () => {
    await engine.stop("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function stored(n: number, salt: string) {
    const src = await register(c, 2, n, "random", shm);
    const keys = Array.from({ length: n }, (_, i) => key(i, salt));
    await finish(
      c,
      (
        await c.call("dump", {
          ns: NS,
          keys,
          shards: shards(
            src,
            keys.map((_, i) => i),
          ),
        })
      ).task,
    );
    expect((await c.call("commit", { ns: NS, keys })).committed).toEqual(new Array(n).fill(true));
    return { src, keys };
  }

  const damage: Array<[string, (f: string) => void, string]> = [
    ["one payload byte flipped", (f) => flip(f, constants.headerSize + 5000), "payload checksum"],
    ["one header byte flipped", (f) => flip(f, 24), "header checksum"],
    ["truncated", (f) => fs.truncateSync(f, constants.headerSize + 10), "file size"],
    ["replaced with zeros", (f) => fs.writeFileSync(f, Buffer.alloc(fs.statSync(f).size)), "magic"],
  ];
  function flip(file: string, at: number) {
    const fd = fs.openSync(file, "r+");
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    b[0] ^= 0x10;
    fs.writeSync(fd, b, 0, 1, at);
    fs.closeSync(fd);
  }
  test.each(damage)("a block %s is reported failed, never copied, removed so lookup stops reporting it", async (_name, hurt, what) => {
    const { keys } = await stored(3, `dmg-${what}`);
    hurt(blockFile(store, NS, keys[1]));
    const dst = await register(c, 2, 3, "zero", shm);
    const r = await finish(c, (await c.call("load", { ns: NS, keys, shards: shards(dst, [0, 1, 2]) })).task);
    expect(r.status).toEqual(["ok", "corrupt", "ok"]);
    expect(r.failed).toEqual([1]);
    for (const reg of dst.regs) expect(reg.read(SHARD, SHARD).equals(Buffer.alloc(SHARD))).toBe(true);
    // The damaged file is removed in the background.
    await until("the damaged file removed", () => !fs.existsSync(blockFile(store, NS, keys[1])));
    expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, false, true]);
    expect(engine.output()).toMatch(new RegExp(`\\[W\\] block .* failed verification \\(${what}\\)`));
  });
});

describe("disk full", () => {
  const canMount = process.getuid?.() === 0 && spawnSync("mount", ["--version"]).status === 0;
  (canMount ? test : test.skip)(
    `dumps fail with ENOSPC, temp files removed, existing blocks still load, dumps work again when space returns${canMount ? "" : " [needs root to mount a tmpfs]"}`,
    async () => {
      const dir = shortTmp();
      const store = path.join(dir, "small");
      fs.mkdirSync(store);
      // A root that cannot mount a tmpfs fails here: the test must not pass without the full disk.
      execFileSync("mount", ["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", store]);
      const engine = await startEngine(
        writeConfig(dir, { storage_backends: store, transferStreamNumber: 2, endpoint: `ipc://${dir}/e.sock` }),
      );
      try {
        const c = engine.client();
        await hello(c);
        const SH = 64 * 1024;
        const regs = new ShmRegion(32 * SH, "random");
        shm.push(regs);
        const [rid] = (await c.call("register", { regions: [{ medium: "host", source: regs.name, size: regs.size }] })).regions as number[];
        const sh = (blocks: number[]) => ({
          count: 1,
          region: blocks.map(() => rid),
          offset: blocks.map((b) => b * SH),
          length: blocks.map(() => SH),
        });
        const keys = Array.from({ length: 32 }, (_, i) => key(i, "full"));
        // Two blocks fit and are committed.
        await finish(c, (await c.call("dump", { ns: NS, keys: keys.slice(0, 2), shards: sh([0, 1]) })).task);
        await c.call("commit", { ns: NS, keys: keys.slice(0, 2) });
        // Then the disk fills up.
        const r = await finish(
          c,
          (await c.call("dump", { ns: NS, keys: keys.slice(2), shards: sh(keys.slice(2).map((_, i) => i + 2)) })).task,
        );
        const enospc = r.status.filter((s, i) => s === "io_error" && r.errno[i] === 28).length;
        expect(enospc).toBeGreaterThan(0);
        const okKeys = keys.slice(2).filter((_, i) => r.status[i] === "ok");
        expect(fs.readdirSync(path.join(store, NS, ".tmp")).length).toBe(okKeys.length); // failed ones left nothing
        await c.call("commit", { ns: NS, keys: keys.slice(2), success: false });
        expect(fs.readdirSync(path.join(store, NS, ".tmp"))).toEqual([]);
        // Existing blocks still load and lookups work.
        expect((await c.call("lookup", { ns: NS, keys: keys.slice(0, 2) })).found).toEqual([true, true]);
        const out = new ShmRegion(2 * SH, "zero");
        shm.push(out);
        const [oid] = (await c.call("register", { regions: [{ medium: "host", source: out.name, size: out.size }] })).regions as number[];
        const l = await finish(
          c,
          (
            await c.call("load", {
              ns: NS,
              keys: keys.slice(0, 2),
              shards: { count: 1, region: [oid, oid], offset: [0, SH], length: [SH, SH] },
            })
          ).task,
        );
        expect(l.failed).toEqual([]);
        expect(out.read().equals(regs.read(0, 2 * SH))).toBe(true);
        // Space returns: dumps work again.
        execFileSync("mount", ["-o", "remount,size=8m", store]);
        const again = await finish(c, (await c.call("dump", { ns: NS, keys: keys.slice(2, 6), shards: sh([2, 3, 4, 5]) })).task);
        expect(again.status).toEqual(["ok", "ok", "ok", "ok"]);
      } finally {
        await engine.stop("SIGKILL");
        execFileSync("umount", ["-l", store]);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});

describe("two engines (two nodes) sharing one directory", () => {
  test("overlapping dumps and loads at the same time: no torn or mixed block, each sees the other's commits", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "shared");
    fs.mkdirSync(store);
    const a = await startEngine(
      writeConfig(dir, { storage_backends: store, transferStreamNumber: 4, endpoint: `ipc://${dir}/a.sock`, lookupCacheTtlS: 0 }, "a.yaml"),
    );
    const b = await startEngine(
      writeConfig(dir, { storage_backends: store, transferStreamNumber: 4, endpoint: `ipc://${dir}/b.sock`, lookupCacheTtlS: 0 }, "b.yaml"),
    );
    try {
      const ca = a.client();
      const cb = b.client();
      await hello(ca);
      await hello(cb);
      const n = 64;
      const q = 3; // shards (layers) a block
      // The two nodes hold different bytes for the same keys, so that a block
      // that mixes the two writers' shards, or one node's bytes served for
      // the other's, can be told apart from either whole version.
      const srcA = await register(ca, q, n, "random", shm);
      const srcB = await register(cb, q, n, "random", shm);
      const keys = Array.from({ length: n }, (_, i) => key(i, "share"));
      const dstA = await register(ca, q, n, "zero", shm);
      const dstB = await register(cb, q, n, "zero", shm);
      const whose = (dst: Mem, i: number): "a" | "b" | "mixed" => {
        const got = Array.from({ length: q }, (_, s) => dst.regs[s].read(i * SHARD, SHARD));
        if (got.every((g, s) => g.equals(srcA.regs[s].read(i * SHARD, SHARD)))) return "a";
        if (got.every((g, s) => g.equals(srcB.regs[s].read(i * SHARD, SHARD)))) return "b";
        return "mixed";
      };
      const rounds = 6;
      const work = async (c: EngineClient, src: Mem, dst: Mem, offset: number) => {
        for (let r = 0; r < rounds; r++) {
          const ks = Array.from({ length: 16 }, (_, j) => (offset + r * 16 + j) % n);
          const d = await c.call("dump", { ns: NS, keys: ks.map((i) => keys[i]), shards: shards(src, ks) });
          const lk = Array.from({ length: 16 }, (_, j) => (offset + 32 + r * 16 + j) % n);
          const l = await c.call("load", { ns: NS, keys: lk.map((i) => keys[i]), shards: shards(dst, lk) });
          await finish(c, d.task);
          await c.call("commit", { ns: NS, keys: ks.map((i) => keys[i]) });
          const lr = await finish(c, l.task);
          lr.status.forEach((s, j) => {
            expect(["ok", "not_found"]).toContain(s);
            const i = lk[j];
            if (s === "ok") expect({ block: i, whose: whose(dst, i) }).toEqual({ block: i, whose: expect.stringMatching(/^[ab]$/) });
            for (let x = 0; x < q; x++) dst.regs[x].write(i * SHARD, Buffer.alloc(SHARD));
          });
        }
      };
      await Promise.all([work(ca, srcA, dstA, 0), work(cb, srcB, dstB, 8)]);
      // Each sees everything either committed.
      const fa = (await ca.call("lookup", { ns: NS, keys })).found as boolean[];
      const fb = (await cb.call("lookup", { ns: NS, keys })).found as boolean[];
      expect(fa).toEqual(fb);
      expect(fa.every(Boolean)).toBe(true);
      // Every visible file verifies and holds one writer's block whole; both writers' blocks are there.
      const all = keys.map((_, i) => i);
      expect((await finish(ca, (await ca.call("load", { ns: NS, keys, shards: shards(dstA, all) })).task)).failed).toEqual([]);
      expect((await finish(cb, (await cb.call("load", { ns: NS, keys, shards: shards(dstB, all) })).task)).failed).toEqual([]);
      const owners = all.map((i) => whose(dstA, i));
      expect(owners.filter((o) => o === "mixed")).toEqual([]);
      expect(new Set(owners)).toEqual(new Set(["a", "b"]));
      expect(all.map((i) => whose(dstB, i))).toEqual(owners); // both nodes read the same file
      expect(fs.readdirSync(path.join(store, NS, ".tmp"))).toEqual([]);
    } finally {
      await a.stop("SIGKILL");
      await b.stop("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("the storage directory emptied (rm -rf) under a running engine", () => {
  test("nothing wrong is served: blocks it saw load as not_found, the next lookup asks the disk, the first dump fails and the next one stores", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    // The default lookupCacheTtlS (60 s): blocks seen are trusted that long without a stat.
    const e = await startEngine(writeConfig(dir, { storage_backends: store, transferStreamNumber: 2, endpoint: `ipc://${dir}/e.sock` }));
    try {
      const c = e.client();
      await hello(c);
      const src = await register(c, 2, 3, "random", shm);
      const keys = [0, 1, 2].map((i) => key(i, "emptied"));
      expect((await finish(c, (await c.call("dump", { ns: NS, keys, shards: shards(src, [0, 1, 2]), commit: true })).task)).status).toEqual(
        ["ok", "ok", "ok"],
      );
      expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, true, true]);
      for (const f of fs.readdirSync(store)) fs.rmSync(path.join(store, f), { recursive: true, force: true });
      // Still answered from what the engine saw; the loads find nothing and leave memory alone.
      expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, true, true]);
      const dst = await register(c, 2, 3, "zero", shm);
      const l = await finish(c, (await c.call("load", { ns: NS, keys, shards: shards(dst, [0, 1, 2]) })).task);
      expect(l.status).toEqual(["not_found", "not_found", "not_found"]);
      for (const r of dst.regs) expect(r.read().equals(Buffer.alloc(3 * SHARD))).toBe(true);
      // Doubted now: the next lookup asks the filesystem.
      expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([false, false, false]);
      // The first dump goes into directories that are gone (ENOENT) and makes the engine recreate them.
      const first = await finish(c, (await c.call("dump", { ns: NS, keys, shards: shards(src, [0, 1, 2]), commit: true })).task);
      expect(first.status).toEqual(["io_error", "io_error", "io_error"]);
      expect(first.errno).toEqual([2, 2, 2]);
      const again = await finish(c, (await c.call("dump", { ns: NS, keys, shards: shards(src, [0, 1, 2]), commit: true })).task);
      expect(again.status).toEqual(["ok", "ok", "ok"]);
      expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, true, true]);
      const back = await finish(c, (await c.call("load", { ns: NS, keys, shards: shards(dst, [0, 1, 2]) })).task);
      expect(back.status).toEqual(["ok", "ok", "ok"]);
      for (let q = 0; q < 2; q++) expect(dst.regs[q].read().equals(src.regs[q].read())).toBe(true);
    } finally {
      await e.stop("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("access", () => {
  test("the socket directory is 0700 and the socket 0600 (default endpoint)", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "s");
    fs.mkdirSync(store);
    const e = await startEngine(writeConfig(dir, { storage_backends: store }));
    try {
      const sock = e.endpoint.slice("ipc://".length);
      expect(fs.statSync(path.dirname(sock)).mode & 0o777).toBe(0o700);
      // /tmp/ucm-<uid>: this user's, writable by nobody else (0700 when the engine made it; an existing one keeps its mode).
      const parent = fs.statSync(path.dirname(path.dirname(sock)));
      expect(parent.uid).toBe(process.getuid!());
      expect(parent.mode & 0o022).toBe(0);
      expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    } finally {
      await e.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
