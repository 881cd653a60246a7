// How the native core does its I/O, seen from outside: the system calls it
// makes for O_DIRECT and fsync (strace of a process running the addon), and
// what close and cancel do to blocks still queued or being read (held there
// by a throttled disk, helpers/slow_disk.ts, with this process in its cgroup).
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { BlockStatus, Engine } from "../core/native";
import { diskTempDir } from "./helpers/fixtures";
import { Layout, layout, spec } from "./helpers/native_kit";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

const NATIVE_JS = path.resolve(__dirname, "../dist/core/native.js");

/** strace, installed with apt-get where it is missing and we may; why not, when it cannot be had. */
function straceMissing(): string | null {
  if (spawnSync("strace", ["-V"]).status === 0) return null;
  if (process.getuid?.() !== 0 || spawnSync("sh", ["-c", "command -v apt-get"]).status !== 0)
    return "no strace, and no apt-get as root to install it";
  const r = spawnSync("sh", ["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace"], {
    encoding: "utf8",
  });
  return r.status === 0 ? null : `no strace (apt-get install strace failed: ${r.stderr.trim().split("\n").pop()})`;
}
const noStrace = straceMissing();
const straceTest = (title: string, fn: () => void) =>
  noStrace ? test.skip(`${title} [needs strace: ${noStrace}]`, fn) : test(title, fn, 60000);

/**
 * Dumps `blocks` blocks into `dir` in a child process running the addon under
 * strace; returns, for each block file, the flags it was created with and
 * the fdatasync calls on it.
 */
function tracedDump(dir: string, opts: { odirect: boolean; fsync: boolean }, blocks = 4) {
  const code = `
    const fs = require("fs"), path = require("path"), crypto = require("crypto");
    const { Engine, ShardListBuilder } = require(${JSON.stringify(NATIVE_JS)});
    const SH = 3 * 4096 + 17, n = ${blocks}, name = "/ucm-strace-" + process.pid;
    fs.writeFileSync("/dev/shm" + name, crypto.randomBytes(n * SH));
    const e = new Engine({ threads: 2, odirect: ${opts.odirect}, fsync: ${opts.fsync} });
    const id = e.openHostRegion(name, n * SH);
    const b = new ShardListBuilder();
    for (let i = 0; i < n; i++) b.addBlock(path.join(${JSON.stringify(dir)}, "s" + i), [[id, i * SH, SH]]);
    e.dump(b.build(1n)).then((r) => { console.log("STATUS " + Array.from(r.status).join(",")); e.close(); fs.rmSync("/dev/shm" + name); });`;
  const trace = path.join(dir, "strace.txt");
  const r = spawnSync("strace", ["-f", "-qq", "-y", "-e", "trace=openat,fdatasync", "-o", trace, process.execPath, "-e", code], {
    encoding: "utf8",
  });
  expect(r.stdout).toContain(`STATUS ${new Array(blocks).fill(BlockStatus.Ok).join(",")}`);
  const lines = fs.readFileSync(trace, "utf8").split("\n");
  return Array.from({ length: blocks }, (_, i) => {
    const file = path.join(dir, `s${i}`);
    // By its path, or (how the store opens files below a storage directory) by name relative to its directory.
    const names = [`"${file}"`, `<${dir}>, "s${i}"`];
    const at = (l: string) => Math.max(...names.map((n) => l.indexOf(n)));
    const opens = lines.filter((l) => l.includes(`openat(`) && at(l) >= 0 && l.includes("O_CREAT"));
    return {
      created: opens.map((l) => /O_[A-Z_|]+/.exec(l.slice(at(l)))![0]),
      // (a call that two threads interleave is logged "<unfinished ...>", then "resumed": count the starts)
      fdatasyncs: lines.filter((l) => l.includes("fdatasync(") && l.includes(`<${file}>`)).length,
    };
  });
}

describe("what the native core asks of the kernel", () => {
  for (const odirect of [true, false]) {
    straceTest(`odirect ${odirect}: on a real disk directory every block file is created ${odirect ? "with" : "without"} O_DIRECT`, () => {
      const d = diskTempDir();
      try {
        for (const f of tracedDump(d, { odirect, fsync: false })) {
          expect(f.created).toHaveLength(1);
          expect(f.created[0].split("|").includes("O_DIRECT")).toBe(odirect);
          expect(f.fdatasyncs).toBe(0);
        }
      } finally {
        fs.rmSync(d, { recursive: true, force: true });
      }
    });
  }

  for (const fsync of [true, false]) {
    straceTest(
      `fsync ${fsync ? "on: each block file is flushed (fdatasync) before it counts as written" : "off: no block file is flushed"}`,
      () => {
        const d = diskTempDir();
        try {
          for (const f of tracedDump(d, { odirect: true, fsync })) expect(f.fdatasyncs).toBe(fsync ? 1 : 0);
        } finally {
          fs.rmSync(d, { recursive: true, force: true });
        }
      },
    );
  }

  test("O_DIRECT on and off: byte-exact round trips with an odd shard size", async () => {
    for (const odirect of [true, false]) {
      const e = new Engine({ threads: 4, odirect });
      const d = diskTempDir();
      const made: Layout[] = [];
      try {
        const src = layout(e, 4, 8, 3 * 4096 + 17, "random");
        const dst = layout(e, 4, 8, 3 * 4096 + 17, "zero");
        made.push(src, dst);
        const names = src.blocks.map((_, b) => `d${b}`);
        expect(Array.from((await e.dump(spec(d, src, names))).status).every((s) => s === BlockStatus.Ok)).toBe(true);
        expect(Array.from((await e.load(spec(d, dst, names))).status).every((s) => s === BlockStatus.Ok)).toBe(true);
        src.regions.forEach((reg, i) => expect(dst.regions[i].read().equals(reg.read())).toBe(true));
      } finally {
        e.close();
        made.flatMap((l) => l.regions).forEach((r) => r.unlink());
        fs.rmSync(d, { recursive: true, force: true });
      }
    }
  });
});

describe("blocks held in flight by a slow disk", () => {
  let disk: SlowDisk | undefined;
  const made: Layout[] = [];
  afterEach(() => {
    disk?.close(); // this process leaves the disk's cgroup
    disk = undefined;
    made
      .splice(0)
      .flatMap((l) => l.regions)
      .forEach((r) => r.unlink());
  });

  slowDiskTest("close settles queued work as cancelled and refuses new work", async () => {
    disk = new SlowDisk(64);
    disk.admit(process.pid); // the addon's threads are this process's
    disk.throttle({ writeBps: 256 * 1024 });
    const e = new Engine({ threads: 1 });
    const src = layout(e, 1, 64, 1 << 16, "random");
    made.push(src);
    const p = e.dump(
      spec(
        disk.mnt,
        src,
        src.blocks.map((_, b) => `q${b}`),
      ),
    );
    e.close();
    const r = await p;
    const st = Array.from(r.status);
    expect(st.length).toBe(64);
    expect(st.every((s) => s === BlockStatus.Ok || s === BlockStatus.Cancelled)).toBe(true);
    expect(st.filter((s) => s === BlockStatus.Cancelled).length).toBeGreaterThan(32);
    expect(() => e.lookup([])).toThrow(/engine is closed/);
  });

  slowDiskTest("after cancel resolves, no block of the load writes memory any more; queued blocks end cancelled", async () => {
    disk = new SlowDisk(128);
    const e = new Engine({ threads: 1 });
    const n = 64;
    const shard = 256 * 1024;
    const src = layout(e, 2, n, shard, "random");
    const dst = layout(e, 2, n, shard, "zero");
    made.push(src, dst);
    try {
      const names = Array.from({ length: n }, (_, i) => `c${i}`);
      expect(Array.from((await e.dump(spec(disk.mnt, src, names))).status).every((s) => s === BlockStatus.Ok)).toBe(true);
      disk.admit(process.pid);
      disk.throttle({ readBps: 1 << 20 }); // a block of 512 KiB: half a second
      const done = e.load({ ...spec(disk.mnt, dst, names), cancelId: 77 });
      expect(await e.cancel(77, 10000)).toBe("stopped");
      const after = dst.regions.map((r) => r.read());
      disk.throttle({ readBps: 0 });
      const r = await done;
      // Nothing changed once cancel said so.
      dst.regions.forEach((reg, i) => expect(reg.read().equals(after[i])).toBe(true));
      const st = Array.from(r.status);
      expect(st.every((s) => s === BlockStatus.Ok || s === BlockStatus.Cancelled)).toBe(true);
      expect(st.filter((s) => s === BlockStatus.Cancelled).length).toBeGreaterThan(n / 2);
      st.forEach((s, b) => {
        for (let q = 0; q < 2; q++) {
          const got = dst.regions[q].read(b * shard, shard);
          expect(got.equals(s === BlockStatus.Ok ? src.regions[q].read(b * shard, shard) : Buffer.alloc(shard))).toBe(true);
        }
      });
      expect(await e.cancel(77, 5000)).toBe("finished"); // done: the id is free again
      await expect(e.cancel(78, 5000)).resolves.toBe("finished");
    } finally {
      e.close();
    }
  });
});
