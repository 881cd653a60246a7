// Hostile input: thousands of random and mutated messages from one client
// over a raw ZeroMQ socket, every reply read and checked. The run is seeded
// (printed; UCM_FUZZ_SEED=<seed> repeats it).
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import * as zmq from "zeromq";
import { Packr } from "msgpackr";
import { EngineClient } from "../core/client";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { fetchToken } from "../core/credentials";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: "number" });
const NS = "fuzz-ns";
const SHARD = 8192;
const key = (i: number) => crypto.createHash("sha256").update(`fz${i}`).digest();

/** mulberry32: a small seeded generator, so that a failing run can be repeated. */
function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A client that sends whatever it is given and keeps every reply. */
class RawPeer {
  readonly sock = new zmq.Dealer({ linger: 0 });
  readonly replies: Array<Record<string, unknown>> = [];
  constructor(endpoint: string) {
    this.sock.connect(endpoint);
    void (async () => {
      try {
        for await (const [frame] of this.sock) this.replies.push(packr.unpack(frame) as Record<string, unknown>);
      } catch {
        // closed
      }
    })();
  }
  async request(msg: Record<string, unknown>): Promise<Record<string, unknown>> {
    await this.sock.send(packr.pack(msg));
    let r: Record<string, unknown> | undefined;
    await until(`the reply to ${String(msg.op)} ${String(msg.id)}`, () => (r = this.replies.find((x) => x.id === msg.id)) !== undefined);
    this.replies.splice(this.replies.indexOf(r!), 1);
    return r!;
  }
}

const ERROR_CODES = [
  "bad_message",
  "unknown_op",
  "no_session",
  "unsupported_version",
  "unknown_task",
  "unknown_region",
  "out_of_bounds",
  "too_large",
  "busy",
  "unsupported",
  "expired",
];

let dir: string;
let store: string;
let engine: RunningEngine;
const shm: ShmRegion[] = [];

beforeEach(async () => {
  dir = shortTmp();
  store = path.join(dir, "store");
  fs.mkdirSync(store);
  engine = await startEngine(
    writeConfig(dir, { storage_backends: store, transferStreamNumber: 4, endpoint: `ipc://${dir}/e.sock`, lookupCacheTtlS: 0 }),
  );
});
afterEach(async () => {
  await engine.stop("SIGKILL");
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

async function register(c: EngineClient | RawPeer, blocks: number, fill: "random" | "zero", id?: number) {
  const regs = [new ShmRegion(blocks * SHARD, fill), new ShmRegion(blocks * SHARD, fill)];
  shm.push(...regs);
  const req = { op: "register", regions: regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) };
  const r = c instanceof RawPeer ? await c.request({ ...req, id }) : await c.call("register", { regions: req.regions });
  return { regs, ids: r.regions as number[] };
}

test("fuzz: thousands of random and mutated messages, each answered with a reply that names the problem; bounded memory; still correct afterwards", async () => {
  const seed = Number(process.env.UCM_FUZZ_SEED ?? crypto.randomInt(2 ** 31));
  console.log(`fuzz seed ${seed} (UCM_FUZZ_SEED=${seed} repeats this run)`);
  const rand = seeded(seed);
  const rnd = (n: number) => Buffer.from(Array.from({ length: n }, () => Math.floor(rand() * 256)));
  const pick = <T>(a: T[]): T => a[Math.floor(rand() * a.length)];
  const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${engine.proc.pid}/status`, "utf8"))![1]) * 1024;

  // Four stored blocks, and another client's task.
  const c = engine.client(60000);
  await hello(c);
  const src = await register(c, 4, "random");
  const keys = [0, 1, 2, 3].map(key);
  const all = shardColumns(src.ids, SHARD, [0, 1, 2, 3]);
  await c.call("wait", { task: (await c.call("dump", { ns: NS, keys, shards: all, commit: true })).task, timeout_ms: 30000 });
  const snapshot = src.regs.map((r) => r.read());
  const foreignTask = (await c.call("dump", { ns: NS, keys: [key(99)], shards: shardColumns(src.ids, SHARD, [0]) })).task;

  // The fuzzing client; a mutated valid load may write into its own scratch memory only.
  const fz = new RawPeer(engine.endpoint);
  try {
    const cred = await fetchToken(engine.endpoint, 10000); // the engine learns this process's pid from the kernel
    expect((await fz.request({ id: 1, op: "hello", version: 1, pid: process.pid, name: "fuzz", cred })).ok).toBe(true);
    const scratch = await register(fz, 4, "zero", 2);
    const before = rss();
    const ops = [
      "register",
      "release",
      "namespace",
      "lookup",
      "dump",
      "load",
      "wait",
      "check",
      "commit",
      "cancel",
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
    const valid = packr.pack({ op: "load", ns: NS, keys: [keys[0]], shards: shardColumns(scratch.ids, SHARD, [0]), id: 2_000_000 });
    const frames: Buffer[][] = [];
    const ids = new Set<number>();
    for (let i = 0; i < 3000; i++) {
      const kind = i % 4;
      // 1 to 63 random bytes: an empty frame ends the sender's own session (docs/PROTOCOL.md), like goodbye.
      if (kind === 0) frames.push([rnd(1 + Math.floor(rand() * 63))]);
      else if (kind === 1) {
        const m = Buffer.from(valid);
        for (let j = 0; j < 3; j++) m[Math.floor(rand() * m.length)] = Math.floor(rand() * 256);
        frames.push([m]);
      } else {
        const msg: Record<string, unknown> = { id: 1_000_000 + i, op: pick(ops) };
        for (const f of ["ns", "keys", "shards", "task", "timeout_ms", "regions", "version", "pid", "success", "description"]) {
          if (rand() < 0.5) msg[f] = pick(pool);
        }
        if (msg.op === "wait" && typeof msg.timeout_ms !== "number") msg.timeout_ms = 0;
        if (kind === 3 && i % 40 === 3)
          frames.push([packr.pack(msg), Buffer.from("extra frame")]); // answered without its id
        else {
          ids.add(1_000_000 + i);
          frames.push([packr.pack(msg)]);
        }
      }
    }
    for (const f of frames) await fz.sock.send(f);
    // Every message is answered, once, whatever it was.
    await until("a reply to each of the 3,000 messages", () => fz.replies.length >= frames.length, 60000);
    await new Promise((r) => setTimeout(r, 100)); // a reply too many would arrive now
    expect(fz.replies.length).toBe(frames.length);
    // Never "internal" (an exception nobody expected): each refusal names a known code and says what was wrong.
    const odd = fz.replies.filter((r) => {
      if (typeof r.ok !== "boolean") return true;
      if (r.ok) return false;
      const err = r.error as { code: unknown; message: unknown };
      return !ERROR_CODES.includes(err.code as string) || typeof err.message !== "string" || err.message.length < 10;
    });
    expect({ seed, odd }).toEqual({ seed, odd: [] });
    const count = new Map<unknown, number>();
    for (const r of fz.replies) count.set(r.id, (count.get(r.id) ?? 0) + 1);
    const unanswered = [...ids].filter((id) => count.get(id) !== 1);
    expect({ seed, unanswered }).toEqual({ seed, unanswered: [] });
    expect(engine.output()).not.toMatch(/internal error/);

    // Another client's task is never reachable.
    expect((await fz.request({ id: 3, op: "wait", task: foreignTask, timeout_ms: 0 })).error).toMatchObject({ code: "unknown_task" });
    expect((await c.call("health")).status).toBe("serving");
    // Still correct: a fresh load of the stored blocks is byte-exact, and the stored blocks' source was never written.
    const dst = await register(c, 4, "zero");
    const l = await c.call("wait", {
      task: (await c.call("load", { ns: NS, keys, shards: shardColumns(dst.ids, SHARD, [0, 1, 2, 3]) })).task,
      timeout_ms: 30000,
    });
    expect(l.status).toEqual(["ok", "ok", "ok", "ok"]);
    for (let s = 0; s < 2; s++) {
      expect(dst.regs[s].read().equals(snapshot[s])).toBe(true);
      expect(src.regs[s].read().equals(snapshot[s])).toBe(true);
    }
    // Nothing was written outside the storage directory; in it, namespaces only, plus the engines' own bookkeeping (.ucm).
    expect(fs.readdirSync(dir).sort()).toEqual(["config.yaml", "e.sock", "e.sock.cred", "store"]);
    expect(fs.readdirSync(store).every((d) => d === ".ucm" || /^[A-Za-z0-9_-][A-Za-z0-9._-]*$/.test(d))).toBe(true);
    expect(rss() - before).toBeLessThan(200 * 2 ** 20);
  } finally {
    fz.sock.close();
  }
}, 120000);
