// Faults: a killed engine, damaged block files, a full disk, hostile input,
// two engines sharing one directory. Nothing wrong may ever be served.
import { execFileSync, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { Packr } from "msgpackr";
import { EngineClient } from "../core/client";
import { constants } from "../core/native";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

const packr = new Packr({ useRecords: false, mapsAsObjects: true });
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
    await new Promise((res) => setTimeout(res, 200));
    expect(fs.existsSync(blockFile(store, NS, keys[1]))).toBe(false);
    expect((await c.call("lookup", { ns: NS, keys })).found).toEqual([true, false, true]);
    expect(engine.output()).toMatch(new RegExp(`\\[W\\] block .* failed verification \\(${what}\\)`));
  });

  test("fuzz: thousands of random and mutated messages; bounded memory; still correct afterwards", async () => {
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${engine.proc.pid}/status`, "utf8"))![1]) * 1024;
    const { src, keys } = await stored(4, "fz");
    const other = engine.client();
    await hello(other);
    const otherMem = {
      regs: src.regs,
      ids: (await other.call("register", { regions: src.regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) }))
        .regions as number[],
    };
    const foreignTask = (await other.call("dump", { ns: NS, keys: [key(99, "fz")], shards: shards(otherMem, [0]) })).task;
    const before = rss();
    const rnd = crypto.randomBytes.bind(crypto);
    const ops = [
      "hello",
      "goodbye",
      "register",
      "release",
      "namespace",
      "lookup",
      "dump",
      "load",
      "wait",
      "check",
      "commit",
      "stats",
      "health",
      "zz",
      "",
    ];
    const giant = Array.from({ length: 70000 }, () => 0);
    const pool: unknown[] = [
      null,
      true,
      -1,
      2 ** 53,
      1e300,
      NaN,
      "../../etc/passwd",
      "x".repeat(300),
      rnd(65),
      rnd(0),
      rnd(32),
      [],
      [rnd(32)],
      giant,
      [0, 0, 0],
      { count: 2 ** 31, region: rnd(8), offset: rnd(16), length: [] },
      { a: { b: { c: [1, 2, { d: rnd(4) }] } } },
      foreignTask,
      0xffffffff,
    ];
    const pick = <T>(a: T[]): T => a[Math.floor(Math.random() * a.length)];
    // Mutations of a valid load may legitimately write into the client's own
    // memory: point it at scratch memory, and compare against a snapshot.
    const scratch = await register(c, 2, 4, "zero", shm);
    const snapshot = src.regs.map((r) => r.read());
    const valid = packr.pack({ op: "load", ns: NS, keys: [keys[0]], shards: shards(scratch, [0]), id: 2_000_000 });
    const frames: Buffer[][] = [];
    for (let i = 0; i < 3000; i++) {
      const kind = i % 4;
      if (kind === 0) frames.push([rnd(Math.floor(Math.random() * 64))]);
      else if (kind === 1) {
        const m = Buffer.from(valid);
        for (let j = 0; j < 3; j++) m[Math.floor(Math.random() * m.length)] = Math.floor(Math.random() * 256);
        frames.push([m]);
      } else {
        // Ids far above the client's own, so a reply to a fuzz message is never taken for the answer to a real request.
        const msg: Record<string, unknown> = { id: 1_000_000 + i, op: pick(ops) };
        for (const f of ["ns", "keys", "shards", "task", "timeout_ms", "regions", "version", "pid", "success", "description"]) {
          if (Math.random() < 0.5) msg[f] = pick(pool);
        }
        if (msg.op === "wait" && typeof msg.timeout_ms !== "number") msg.timeout_ms = 0;
        if (msg.op === "hello" || msg.op === "goodbye") msg.op = "check"; // keep the fuzzing client's session
        frames.push([packr.pack(msg)]);
      }
    }
    for (const f of frames) await c.sendRaw(f);
    // Another client's task is never reachable.
    const foreign = await c.raw({ op: "wait", task: foreignTask, timeout_ms: 0 });
    expect(foreign.error).toMatchObject({ code: "unknown_task" });
    await new Promise((r) => setTimeout(r, 500));
    expect((await c.call("health")).status).toBe("serving");
    // Still correct: a fresh load of stored blocks is byte-exact.
    const dst = await register(c, 2, 4, "zero", shm);
    const r = await finish(c, (await c.call("load", { ns: NS, keys, shards: shards(dst, [0, 1, 2, 3]) })).task);
    expect(r.status).toEqual(["ok", "ok", "ok", "ok"]);
    for (let s = 0; s < 2; s++) expect(dst.regs[s].read().equals(snapshot[s])).toBe(true);
    // Nothing was written outside the storage directory.
    expect(fs.readdirSync(dir).sort()).toEqual(["config.yaml", "e.sock", "store"]);
    // Namespaces only, plus the engines' own bookkeeping (.ucm: usage ledger).
    expect(fs.readdirSync(store).every((d) => d === ".ucm" || /^[A-Za-z0-9_-][A-Za-z0-9._-]*$/.test(d))).toBe(true);
    expect(rss() - before).toBeLessThan(200 * 2 ** 20);
  });
});

describe("disk full", () => {
  const canMount = process.getuid?.() === 0 && spawnSync("mount", ["--version"]).status === 0;
  (canMount ? test : test.skip)(
    "dumps fail with ENOSPC, temp files removed, existing blocks still load, dumps work again when space returns",
    async () => {
      const dir = shortTmp();
      const store = path.join(dir, "small");
      fs.mkdirSync(store);
      try {
        execFileSync("mount", ["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", store]);
      } catch (e) {
        console.warn(`disk-full test skipped: cannot mount tmpfs (${(e as Error).message})`);
        return;
      }
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
      // Both hold the same content for the same key (as two nodes computing the same prefix).
      const content = await register(ca, 3, n, "random", shm);
      const contentB = {
        regs: content.regs,
        ids: (await cb.call("register", { regions: content.regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) }))
          .regions as number[],
      };
      const keys = Array.from({ length: n }, (_, i) => key(i, "share"));
      const dstA = await register(ca, 3, n, "zero", shm);
      const dstB = { regs: [] as ShmRegion[], ids: [] as number[] };
      Object.assign(dstB, await register(cb, 3, n, "zero", shm));
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
            for (let q = 0; q < 3; q++) {
              const got = dst.regs[q].read(i * SHARD, SHARD);
              if (s === "ok") expect(got.equals(src.regs[q].read(i * SHARD, SHARD))).toBe(true);
              dst.regs[q].write(i * SHARD, Buffer.alloc(SHARD));
            }
          });
        }
      };
      await Promise.all([work(ca, content, dstA, 0), work(cb, contentB, dstB, 8)]);
      // Each sees everything either committed.
      const fa = (await ca.call("lookup", { ns: NS, keys })).found as boolean[];
      const fb = (await cb.call("lookup", { ns: NS, keys })).found as boolean[];
      expect(fa).toEqual(fb);
      expect(fa.every(Boolean)).toBe(true);
      // Every visible file verifies.
      const all = await finish(
        ca,
        (
          await ca.call("load", {
            ns: NS,
            keys,
            shards: shards(
              dstA,
              keys.map((_, i) => i),
            ),
          })
        ).task,
      );
      expect(all.failed).toEqual([]);
      for (let q = 0; q < 3; q++) expect(dstA.regs[q].read().equals(content.regs[q].read())).toBe(true);
      expect(fs.readdirSync(path.join(store, NS, ".tmp"))).toEqual([]);
    } finally {
      await a.stop("SIGKILL");
      await b.stop("SIGKILL");
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
