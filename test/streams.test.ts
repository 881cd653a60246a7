// Transfer streams (native/src/io_gate.h): two workers a stream, at most
// transferStreamNumber reads and writes at storage at once. Real addon, real
// block files on a disk, real shared memory.
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { BlockStatus, Engine, NativeEngine, ShardListBuilder } from "../core/native";
import { ShmRegion, diskTempDir, shardColumns } from "./helpers/fixtures";
import { hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

const DIGEST = 0x5354_5245_414d_5321n;
const BLOCK = 1 << 20;
const SHARD = 1 << 20;

describe("transfer streams", () => {
  let engine: NativeEngine;
  let dir: string;
  let region: ShmRegion;
  let id: number;

  afterEach(() => {
    engine.close();
    region.unlink();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function setUp(threads: number, blocks: number) {
    engine = new Engine({ threads });
    dir = diskTempDir();
    region = new ShmRegion(blocks * BLOCK, "random");
    id = engine.openHostRegion(region.name, region.size);
  }

  /** Blocks `from..to` of the region as 4 shards each, at `name(i)` under dir. */
  function spec(from: number, to: number, name: (i: number) => string) {
    const b = new ShardListBuilder();
    const q = BLOCK / 4;
    for (let i = from; i < to; i++)
      b.addBlock(
        path.join(dir, name(i)),
        [0, 1, 2, 3].map((s) => [id, i * BLOCK + s * q, q] as [number, number, number]),
      );
    return b.build(DIGEST);
  }

  test("storage never sees more reads or writes at once than transferStreamNumber", async () => {
    const n = 96;
    setUp(2, n);
    expect(engine.stats().workers).toBeGreaterThan(2);
    const busy = async (run: () => Promise<{ status: ArrayLike<number> }>) => {
      const b0 = engine.stats().storageBusyNs;
      const t0 = process.hrtime.bigint();
      const r = await run();
      const wall = Number(process.hrtime.bigint() - t0);
      expect(Array.from(r.status).every((s) => s === BlockStatus.Ok)).toBe(true);
      return { busy: engine.stats().storageBusyNs - b0, wall };
    };
    // Up to four workers share two streams (stats().workers): with every
    // block in one task all of them have work, and the sum of the time spent
    // in reads or writes can only exceed two streams' worth of wall time if
    // more than two ran at once.
    const dump = await busy(() => engine.dump(spec(0, n, (i) => `b${i}`)));
    const load = await busy(() => engine.load(spec(0, n, (i) => `b${i}`)));
    for (const x of [dump, load]) {
      expect(x.busy).toBeGreaterThan(0);
      expect(x.busy).toBeLessThanOrEqual(2 * x.wall);
    }
    expect(engine.stats().storageWaitNs).toBeGreaterThan(0); // blocks were ready before a stream was
  });
});

// An open that does not return (an NFS server that stopped answering) must
// not hold a stream. Block files are opened without blocking (a FIFO no
// longer waits), so the slow open is made with strace, which delays the
// engine's opens in one fan-out directory.
describe("transfer streams of an engine process", () => {
  const haveStrace = spawnSync("strace", ["-V"]).status === 0;
  const withStrace = haveStrace ? test : test.skip;
  if (!haveStrace) console.log("streams.test.ts: no strace, the slow-open case is skipped");
  const NS = "jest-streams";
  const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}${i}`).digest();
  const keyIn = (fan: number, salt: string) => {
    for (let i = 0; ; i++) if (key(i, salt)[0] === fan) return key(i, salt);
  };

  withStrace("a block whose file does not open yet holds no stream: the stream's other worker moves the next block", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const slow = keyIn(0x5a, "slow");
    const fast = keyIn(0xa5, "fast");
    const shm = new ShmRegion(4 * SHARD, "random");
    const cfg = writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 1 });
    // Each open in the slow block's fan-out directory takes 3 s (an openat whose directory descriptor is it).
    const e = await startEngine(cfg, [], undefined, [
      ...["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-P", path.join(store, NS, "5a")],
      ...["-e", "trace=openat", "-e", "inject=openat:delay_enter=3000000", "--"],
    ]);
    try {
      const c = e.client(30000);
      await hello(c);
      const id = ((await c.call("register", { regions: [{ medium: "host", source: shm.name, size: shm.size }] })).regions as number[])[0];
      const d = await c.call("dump", { ns: NS, keys: [slow, fast], shards: shardColumns([id], SHARD, [0, 1]), commit: true });
      expect((await c.call("wait", { task: d.task, timeout_ms: 20000 })).status).toEqual(["ok", "ok"]);
      const stuck = await c.call("load", { ns: NS, keys: [slow], shards: shardColumns([id], SHARD, [2]) });
      await new Promise((r) => setTimeout(r, 300)); // its worker is in the open now
      const t0 = Date.now();
      const next = await c.call("load", { ns: NS, keys: [fast], shards: shardColumns([id], SHARD, [3]) });
      expect((await c.call("wait", { task: next.task, timeout_ms: 20000 })).status).toEqual(["ok"]);
      expect(Date.now() - t0).toBeLessThan(2000);
      expect((await c.call("check", { task: stuck.task })).done).toBe(false);
      expect((await c.call("wait", { task: stuck.task, timeout_ms: 20000 })).status).toEqual(["ok"]);
      expect(shm.read(2 * SHARD, 2 * SHARD).equals(shm.read(0, 2 * SHARD))).toBe(true);
    } finally {
      // Under strace: stop the engine itself (strace would leave it running).
      const kids = fs.readFileSync(`/proc/${e.proc.pid}/task/${e.proc.pid}/children`, "utf8").trim();
      for (const p of kids.split(/\s+/).filter(Boolean)) process.kill(Number(p), "SIGKILL");
      await e.stop("SIGKILL");
      shm.unlink();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
