// The native transfer core through its TypeScript binding: real shared
// memory, real block files in temporary directories.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { spawnSync } from "child_process";
import {
  BLOCK_STATUS_NAMES,
  BlockStatus,
  Engine,
  checkStatusNames,
  NativeEngine,
  ShardListBuilder,
  blockFileSize,
  constants,
  crc32c,
  cudaStatus,
  nativeEngineOptions,
  nativeErrorCode,
  usageAdd,
} from "../core/native";
import { ShmRegion, tempDir } from "./helpers/fixtures";
import { DIGEST, Layout, layout, spec } from "./helpers/native_kit";

/** Reference CRC32C, bit by bit. */
function crc32cRef(data: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of data) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

describe("native core", () => {
  let engine: NativeEngine;
  let dir: string;
  const cleanup: ShmRegion[] = [];

  beforeEach(() => {
    engine = new Engine({ threads: 8 });
    dir = tempDir();
  });
  afterEach(() => {
    engine.close();
    fs.rmSync(dir, { recursive: true, force: true });
    cleanup.splice(0).forEach((r) => r.unlink());
  });

  function track(l: Layout): Layout {
    cleanup.push(...l.regions);
    return l;
  }

  test("crc32c matches the reference on the standard vector and large buffers", () => {
    expect(crc32c(Buffer.from("123456789"))).toBe(0xe3069283);
    for (const n of [0, 1, 7, 8, 100, 24575, 24576, 24577, 100_000, 1 << 20]) {
      const data = crypto.randomBytes(n);
      expect(crc32c(data)).toBe(crc32cRef(data));
    }
  });

  test("round trip of many random blocks with shards over several regions", async () => {
    const src = track(layout(engine, 6, 40, 4096 + 123, "random"));
    const names = src.blocks.map((_, b) => `blk${b}`);
    const dumped = await engine.dump(spec(dir, src, names));
    expect(Array.from(dumped.status)).toEqual(new Array(40).fill(BlockStatus.Ok));
    expect(dumped.bytes).toBe(40 * 6 * (4096 + 123));
    for (const n of names) expect(fs.statSync(path.join(dir, n)).size).toBe(blockFileSize(6 * (4096 + 123)));

    const dst = track(layout(engine, 6, 40, 4096 + 123, "zero"));
    const loaded = await engine.load(spec(dir, dst, names));
    expect(Array.from(loaded.status)).toEqual(new Array(40).fill(BlockStatus.Ok));
    for (let r = 0; r < 6; r++) expect(dst.regions[r].read().equals(src.regions[r].read())).toBe(true);
  });

  test("shards of one block may come from one region at scattered offsets", async () => {
    const region = new ShmRegion(1 << 16, "random");
    cleanup.push(region);
    const id = engine.openHostRegion(region.name, region.size);
    const shards: Array<[number, number, number]> = [
      [id, 5000, 300],
      [id, 17, 1000],
      [id, 60000, 5536],
    ];
    const d = await engine.dump(new ShardListBuilder().addBlock(path.join(dir, "x"), shards).build(DIGEST));
    expect(d.status[0]).toBe(BlockStatus.Ok);
    const out = new ShmRegion(1 << 16, "zero");
    cleanup.push(out);
    const oid = engine.openHostRegion(out.name, out.size);
    const l = await engine.load(
      new ShardListBuilder()
        .addBlock(path.join(dir, "x"), [
          [oid, 0, 300],
          [oid, 300, 1000],
          [oid, 1300, 5536],
        ])
        .build(DIGEST),
    );
    expect(l.status[0]).toBe(BlockStatus.Ok);
    expect(out.read(0, 300).equals(region.read(5000, 300))).toBe(true);
    expect(out.read(300, 1000).equals(region.read(17, 1000))).toBe(true);
    expect(out.read(1300, 5536).equals(region.read(60000, 5536))).toBe(true);
  });

  describe("damaged files are reported and never reach memory", () => {
    const SHARD = 10_000;
    let src: Layout;
    let dst: Layout;
    let file: string;
    beforeEach(async () => {
      src = track(layout(engine, 2, 1, SHARD, "random"));
      dst = track(layout(engine, 2, 1, SHARD, "zero"));
      file = path.join(dir, "b0");
      expect((await engine.dump(spec(dir, src, ["b0"]))).status[0]).toBe(BlockStatus.Ok);
    });
    async function loadAndExpect(status: BlockStatus, what?: string) {
      const r = await engine.load(spec(dir, dst, ["b0"]));
      expect(r.status[0]).toBe(status);
      if (what) expect(r.what[0]).toBe(what);
      expect(r.bytes).toBe(0);
      // Destination untouched: still all zero.
      for (const reg of dst.regions) expect(reg.read().equals(Buffer.alloc(reg.size))).toBe(true);
    }
    function patch(offset: number, fn: (b: number) => number) {
      const fd = fs.openSync(file, "r+");
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, offset);
      b[0] = fn(b[0]);
      fs.writeSync(fd, b, 0, 1, offset);
      fs.closeSync(fd);
    }
    test("a flipped payload byte", async () => {
      patch(constants.headerSize + 12_345, (b) => b ^ 0x01);
      await loadAndExpect(BlockStatus.Corrupt, "payload checksum");
    });
    test("a flipped header byte", async () => {
      patch(20, (b) => b ^ 0x80);
      await loadAndExpect(BlockStatus.Corrupt, "header checksum");
    });
    test("a truncated file", async () => {
      fs.truncateSync(file, constants.headerSize + 100);
      await loadAndExpect(BlockStatus.Corrupt, "file size");
    });
    test("a file replaced by zeros", async () => {
      const size = fs.statSync(file).size;
      fs.writeFileSync(file, Buffer.alloc(size));
      await loadAndExpect(BlockStatus.Corrupt, "magic");
    });
    test("a missing file", async () => {
      fs.rmSync(file);
      await loadAndExpect(BlockStatus.NotFound);
    });
    test("a block read with another layout digest", async () => {
      const r = await engine.load(spec(dir, dst, ["b0"], DIGEST + 1n));
      expect(r.status[0]).toBe(BlockStatus.Mismatch);
      expect(r.what[0]).toBe("layout digest");
    });
    test("a block read with a different shard split of the same size", async () => {
      const reg = dst.regions[0];
      const r = await engine.load(
        new ShardListBuilder()
          .addBlock(file, [
            [dst.ids[0], 0, SHARD],
            [dst.ids[0], 0, SHARD / 2],
            [dst.ids[0], 0, SHARD / 2],
          ])
          .build(DIGEST),
      );
      expect(r.status[0]).toBe(BlockStatus.Mismatch);
      expect(r.what[0]).toBe("shard count");
      expect(reg.read().equals(Buffer.alloc(reg.size))).toBe(true);
    });
    test("a request of another size than the file: mismatch, not corruption", async () => {
      const r = await engine.load(new ShardListBuilder().addBlock(file, [[dst.ids[0], 0, SHARD]]).build(DIGEST));
      expect(r.status[0]).toBe(BlockStatus.Mismatch);
      expect(r.what[0]).toBe("payload length");
    });
  });

  test("a dump never overwrites an existing temporary file", async () => {
    const src = track(layout(engine, 1, 1, 4096, "random"));
    fs.writeFileSync(path.join(dir, "b0"), "someone else's");
    const r = await engine.dump(spec(dir, src, ["b0"]));
    expect(r.status[0]).toBe(BlockStatus.IoError);
    expect(r.errno[0]).toBe(17); // EEXIST
    expect(fs.readFileSync(path.join(dir, "b0"), "utf8")).toBe("someone else's");
  });

  test("I/O errors carry errno: a directory that does not exist", async () => {
    const src = track(layout(engine, 1, 1, 4096, "random"));
    const r = await engine.dump(spec(path.join(dir, "nope"), src, ["b0"]));
    expect(r.status[0]).toBe(BlockStatus.IoError);
    expect(r.errno[0]).toBe(2); // ENOENT
    expect(r.what[0]).toBe("open");
  });

  describe("bad arguments are rejected at once with a clear error", () => {
    let region: ShmRegion;
    let id: number;
    beforeEach(() => {
      region = new ShmRegion(8192, "zero");
      cleanup.push(region);
      id = engine.openHostRegion(region.name, region.size);
    });
    const one = (shards: Array<[number, number, number]>) => new ShardListBuilder().addBlock(path.join(dir, "b"), shards).build(DIGEST);
    test("a shard beyond the end of its region", () => {
      expect(() => engine.dump(one([[id, 8000, 200]]))).toThrow(/shard 0: \[8000, \+200\) lies outside region \d+ of 8192 bytes/);
    });
    test("an offset that overflows", () => {
      expect(() => engine.load(one([[id, 2 ** 53 - 1, 2 ** 53 - 1]]))).toThrow(/lies outside region/);
    });
    test("negative, fractional and NaN numbers", () => {
      expect(() => engine.dump(one([[id, -1, 10]]))).toThrow(/offset must be a non-negative integer/);
      expect(() => engine.dump(one([[id, 0, 1.5]]))).toThrow(/length must be a non-negative integer/);
      expect(() => engine.dump(one([[id, NaN, 10]]))).toThrow(/offset must be a non-negative integer/);
    });
    test("an unknown region", () => {
      expect(() => engine.dump(one([[999, 0, 10]]))).toThrow(/unknown region 999/);
    });
    test("a zero-length shard", () => {
      expect(() => engine.dump(one([[id, 0, 0]]))).toThrow(/length must be positive/);
    });
    test("mismatched arrays", () => {
      const s = one([[id, 0, 10]]);
      expect(() => engine.dump({ ...s, blockShards: Uint32Array.from([2]) })).toThrow(/more shards/);
      expect(() => engine.dump({ ...s, shardOffset: new BigUint64Array(2) })).toThrow(/same length/);
      expect(() => engine.dump({ ...s, layoutDigest: 5 as unknown as bigint })).toThrow(/layoutDigest must be a bigint/);
      expect(() => engine.dump({ ...s, paths: [""] })).toThrow(/paths\[0\]/);
    });
    test("a region that does not exist or is too small", () => {
      expect(() => engine.openHostRegion("/ucm-no-such-region", 10)).toThrow(/cannot open region/);
      expect(() => engine.openHostRegion(region.name, 8193)).toThrow(/less than the 8193 requested/);
      expect(() => engine.openHostRegion("relative", 10)).toThrow(/absolute path/);
    });
    test("a block above maxBlockBytes", () => {
      const small = new Engine({ threads: 1, maxBlockBytes: 4096 });
      const rid = small.openHostRegion(region.name, region.size);
      expect(() => small.dump(one([[rid, 0, 4097]]))).toThrow(/above maxBlockBytes 4096/);
      small.close();
    });
    test("bad engine options", () => {
      expect(() => new Engine({ threads: 0 })).toThrow(/options.threads must be in \[1, 1024\], got 0/);
      expect(() => new Engine({ threads: "4" as unknown as number })).toThrow(/options.threads must be a number/);
    });
    test("the addon takes no option by default: a missing one is a TypeError naming it", () => {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const addon = require(process.env.UCM_NATIVE_ADDON ?? path.resolve(__dirname, "../native/build/Release/ucm_native.node"));
      for (const key of Object.keys(nativeEngineOptions())) {
        const opts: Record<string, unknown> = { ...nativeEngineOptions({ threads: 1 }) };
        delete opts[key];
        expect(() => new addon.Engine(opts)).toThrow(new RegExp(`options.${key} is missing`));
        // A TypeError of the main realm (jest runs this file in a vm context): checked by name.
        expect(() => new addon.Engine(opts)).toThrow(expect.objectContaining({ name: "TypeError" }));
      }
    });
    test("errors carry a stable code", async () => {
      const codeOf = (f: () => unknown): unknown => {
        try {
          f();
        } catch (e) {
          return nativeErrorCode(e);
        }
        return "no error";
      };
      expect(codeOf(() => engine.dump(one([[id, 8000, 200]])))).toBe("out_of_bounds");
      expect(codeOf(() => engine.dump(one([[999, 0, 10]])))).toBe("unknown_region");
      expect(codeOf(() => engine.dump(one([[id, -1, 10]])))).toBe("invalid_argument");
      expect(codeOf(() => engine.dump({ ...one([[id, 0, 10]]), waitEvent: 12345 }))).toBe("unknown_event");
      expect(codeOf(() => engine.openHostRegion("/ucm-no-such-region", 10))).toBe("region_refused");
      const small = new Engine({ threads: 1, maxBlockBytes: 4096 });
      const rid = small.openHostRegion(region.name, region.size);
      expect(codeOf(() => small.dump(one([[rid, 0, 4097]])))).toBe("too_large");
      small.close();
      expect(codeOf(() => small.lookup([]))).toBe("closed");
      const e = await usageAdd(path.join(dir, "no", "such"), 1, 1, 1000).catch((x: unknown) => x);
      expect(nativeErrorCode(e)).toBe("ENOENT");
      expect((e as { errno?: number }).errno).toBe(2);
    });
  });

  test("the addon names block statuses as core/native.ts does; an addon that names them otherwise is refused", () => {
    expect(constants.blockStatus).toEqual(Object.values(BLOCK_STATUS_NAMES));
    expect(() => checkStatusNames("x.node", [...constants.blockStatus].reverse())).toThrow(
      /native addon x.node names block statuses \["dropped",.*core\/native.ts names them \["ok",/,
    );
    expect(() => checkStatusNames("x.node", undefined)).toThrow(/names block statuses undefined/);
  });

  test("a closed region stays mapped for the task that uses it", async () => {
    const src = track(layout(engine, 1, 4, 65536, "random"));
    const p = engine.dump(spec(dir, src, ["a", "b", "c", "d"]));
    engine.closeRegion(src.ids[0]);
    expect(Array.from((await p).status)).toEqual([0, 0, 0, 0]);
    expect(() => engine.dump(spec(dir, src, ["e", "f", "g", "h"]))).toThrow(/unknown region/);
  });

  test("concurrent tasks from several callers", async () => {
    const callers = 6;
    const perCaller = 12;
    const srcs = Array.from({ length: callers }, () => track(layout(engine, 3, perCaller, 8192, "random")));
    const dumps = await Promise.all(
      srcs.map((l, c) =>
        engine.dump(
          spec(
            dir,
            l,
            l.blocks.map((_, b) => `c${c}b${b}`),
          ),
        ),
      ),
    );
    for (const d of dumps) expect(Array.from(d.status).every((s) => s === BlockStatus.Ok)).toBe(true);
    const dsts = Array.from({ length: callers }, () => track(layout(engine, 3, perCaller, 8192, "zero")));
    // Loads from all callers at once, plus lookups interleaved.
    const [loads, found] = await Promise.all([
      Promise.all(
        dsts.map((l, c) =>
          engine.load(
            spec(
              dir,
              l,
              l.blocks.map((_, b) => `c${c}b${b}`),
            ),
          ),
        ),
      ),
      engine.lookup([path.join(dir, "c0b0"), path.join(dir, "missing"), path.join(dir, `c5b11`)]),
    ]);
    expect(Array.from(found)).toEqual([1, 0, 1]);
    for (const l of loads) expect(Array.from(l.status).every((s) => s === BlockStatus.Ok)).toBe(true);
    srcs.forEach((s, c) => s.regions.forEach((r, i) => expect(dsts[c].regions[i].read().equals(r.read())).toBe(true)));
  });

  test("commit renames into place and remove deletes", async () => {
    const src = track(layout(engine, 1, 3, 4096, "random"));
    await engine.dump(spec(dir, src, ["t0", "t1", "t2"]));
    const errs = await engine.commit(
      [path.join(dir, "t0"), path.join(dir, "t1"), path.join(dir, "nope")],
      [path.join(dir, "k0"), path.join(dir, "k1"), path.join(dir, "k2")],
    );
    expect(Array.from(errs)).toEqual([0, 0, 2]);
    expect(Array.from(await engine.lookup([path.join(dir, "k0"), path.join(dir, "t0"), path.join(dir, "k2")]))).toEqual([1, 0, 0]);
    expect(Array.from(await engine.remove([path.join(dir, "k0"), path.join(dir, "never")]))).toEqual([0, 0]);
    expect(fs.existsSync(path.join(dir, "k0"))).toBe(false);
    // Big lookup batches are split over the metadata threads and stay in order.
    const many = Array.from({ length: 1000 }, (_, i) => path.join(dir, i % 2 ? "k1" : "zz"));
    expect(Array.from(await engine.lookup(many))).toEqual(many.map((_, i) => (i % 2 ? 1 : 0)));
  });

  test("an empty task completes at once", async () => {
    const r = await engine.dump(new ShardListBuilder().build(DIGEST));
    expect(r.status.length).toBe(0);
  });

  test("stats", () => {
    const s = engine.stats();
    expect(s.threads).toBe(8);
    expect(typeof s.crc32cHardware).toBe("boolean");
  });
});

describe("CUDA backend", () => {
  const nvcc = ["/usr/local/cuda/bin/nvcc", ...(process.env.PATH ?? "").split(":").map((p) => path.join(p, "nvcc"))].some((p) =>
    fs.existsSync(p),
  );

  test("this build: CUDA compiled in when nvcc was there; without a GPU, device regions are refused with the reason", () => {
    const st = cudaStatus();
    expect(constants.cuda).toBe(st.built);
    if (nvcc) expect(st.built).toBe(true);
    if (!st.usable) {
      expect(st.why.length).toBeGreaterThan(0);
      const e = new Engine({ threads: 1 });
      try {
        expect(() => e.openCudaRegion(0, new Uint8Array(64), 0, 4096)).toThrow(
          st.built ? /no usable GPU in the engine process/ : /built without the CUDA toolkit/,
        );
        expect(() => e.openCudaEvent(0, new Uint8Array(64))).toThrow(/GPU|CUDA/);
      } finally {
        e.close();
      }
    }
  });

  test("a build without the toolkit (UCM_WITH_CUDA=0) compiles, loads and serves host memory", async () => {
    const out = tempDir("ucm-nocuda-");
    try {
      const cmakeJs = require.resolve("cmake-js/bin/cmake-js");
      const r = spawnSync(process.execPath, [cmakeJs, "compile", "--directory", path.resolve(__dirname, "../native"), "--out", out], {
        env: { ...process.env, UCM_WITH_CUDA: "0" },
        encoding: "utf8",
      });
      expect(r.status).toBe(0);
      expect(r.stdout + r.stderr).toContain("ucm: CUDA backend OFF");
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const addon = require(path.join(out, "Release", "ucm_native.node"));
      expect(addon.constants.cuda).toBe(false);
      expect(addon.cudaStatus()).toMatchObject({ built: false, usable: false });
      const e: NativeEngine = new addon.Engine(nativeEngineOptions({ threads: 2 }));
      try {
        expect(() => e.openCudaRegion(0, new Uint8Array(64), 0, 4096)).toThrow(/built without the CUDA toolkit/);
        const d = tempDir();
        const src = layout(e, 2, 2, 8192, "random");
        const dst = layout(e, 2, 2, 8192, "zero");
        try {
          expect(Array.from((await e.dump(spec(d, src, ["a", "b"]))).status)).toEqual([0, 0]);
          expect(Array.from((await e.load(spec(d, dst, ["a", "b"]))).status)).toEqual([0, 0]);
          src.regions.forEach((reg, i) => expect(dst.regions[i].read().equals(reg.read())).toBe(true));
        } finally {
          [...src.regions, ...dst.regions].forEach((x) => x.unlink());
          fs.rmSync(d, { recursive: true, force: true });
        }
      } finally {
        e.close();
      }
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 180000);
});
