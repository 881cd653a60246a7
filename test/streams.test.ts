// Transfer streams (native/src/io_gate.h): two workers a stream, at most
// transferStreamNumber reads and writes at storage at once. Real addon, real
// block files on a disk, real shared memory.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { BlockStatus, Engine, NativeEngine, ShardListBuilder } from "../core/native";
import { ShmRegion, diskTempDir } from "./helpers/fixtures";

const DIGEST = 0x5354_5245_414d_5321n;
const BLOCK = 1 << 20;

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

  test("a block whose file does not open yet holds no stream: the stream's other worker moves the next block", async () => {
    setUp(1, 2);
    const dumped = await engine.dump(spec(1, 2, (i) => `b${i}`));
    expect(dumped.status[0]).toBe(BlockStatus.Ok);
    // A FIFO at the first block's path: opening it waits for a writer, as an
    // open on an NFS server that stopped answering waits.
    const fifo = path.join(dir, "b0");
    expect(spawnSync("mkfifo", [fifo]).status).toBe(0);
    const stuck = engine.load(spec(0, 1, (i) => `b${i}`));
    let stuckDone = false;
    void stuck.then(() => (stuckDone = true));
    const next = await engine.load(spec(1, 2, (i) => `b${i}`));
    expect(next.status[0]).toBe(BlockStatus.Ok);
    expect(stuckDone).toBe(false);
    // Let the first open return: an empty "file" that fails its checks.
    let fd = -1;
    for (let i = 0; i < 200 && fd < 0; i++) {
      try {
        fd = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
      } catch {
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    expect(fd).toBeGreaterThanOrEqual(0);
    fs.closeSync(fd);
    const r = await stuck;
    expect(r.status[0]).toBe(BlockStatus.Corrupt);
  });
});
