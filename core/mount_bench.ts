// `ucm-engine bench --dir <path>`: checks a mount with the engine's own I/O
// path before it is deployed. Dumps blocks (temporary file, one write,
// rename), loads them back (read, CRC32C and header checks), times single-key
// and batched lookups, prints a table, and removes everything it wrote.
import { execFileSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { BlockStatus, Engine, ShardListBuilder, TransferSpec, blockFileSize } from "./native";

export interface MountBenchOptions {
  dir: string;
  /** Payload bytes per block. */
  blockBytes: number;
  /** Shards per block (vLLM: layers x K/V). */
  shards: number;
  totalBytes: number;
  threads: number;
  odirect: boolean;
  /** Progress goes here: updated in place on a terminal, a line a second otherwise; null for none. */
  progress: (NodeJS.WritableStream & { isTTY?: boolean }) | null;
}

export interface MountBenchResult {
  dir: string;
  fsType: string;
  blocks: number;
  blockBytes: number;
  threads: number;
  dumpGBps: number;
  loadGBps: number;
  /** Share of the streams' time spent in storage reads and writes during the dumps and the loads (1 = storage never idle). */
  dumpBusy: number;
  loadBusy: number;
  lookup1: { p50Us: number; p99Us: number };
  lookupBatch: { keys: number; p50Us: number; p99Us: number };
  failed: number;
  /** The page cache was dropped before the loads. */
  coldLoad: boolean;
}

/** The filesystem type of the mount holding `dir` (longest matching mount point). */
export function fsTypeOf(dir: string): string {
  try {
    let best = "";
    let type = "unknown";
    for (const line of fs.readFileSync("/proc/mounts", "utf8").split("\n")) {
      const [, mnt, t] = line.split(" ");
      if (!mnt) continue;
      const m = mnt.replace(/\\040/g, " ");
      if ((dir === m || dir.startsWith(m.endsWith("/") ? m : m + "/")) && m.length > best.length) {
        best = m;
        type = t;
      }
    }
    return type;
  } catch {
    return "unknown";
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : 0;
}

export async function runMountBench(o: MountBenchOptions): Promise<MountBenchResult> {
  const dir = path.resolve(o.dir);
  if (!fs.statSync(dir).isDirectory()) throw new Error(`--dir ${dir} is not a directory`);
  const blocks = Math.max(1, Math.round(o.totalBytes / o.blockBytes));
  const shard = Math.floor(o.blockBytes / o.shards);
  if (shard < 1) throw new Error(`block of ${o.blockBytes} bytes cannot have ${o.shards} shards`);
  const blockBytes = shard * o.shards;
  // Scratch space: a dot-directory (never counted as blocks), removed at the end.
  const work = fs.mkdtempSync(path.join(dir, ".ucm-bench-"));
  // Blocks in flight: six lanes of tasks of threads/2 blocks, enough to keep
  // both workers of every stream fed across task boundaries.
  const slots = Math.min(blocks, o.threads * 3);
  const regionBytes = slots * blockBytes;
  const shm = path.join(fs.existsSync("/dev/shm") ? "/dev/shm" : work, `ucm-bench-${process.pid}`);
  const fd = fs.openSync(shm, "w+", 0o600);
  const engine = new Engine({ threads: o.threads, odirect: o.odirect, maxBlockBytes: Math.max(blockBytes, 4096) });
  let lastLine = 0;
  const say = (s: string, final = false) => {
    if (!o.progress) return;
    if (o.progress.isTTY) o.progress.write(`\r${s}\x1b[K`);
    else if (s && (final || Date.now() - lastLine >= 1000)) {
      lastLine = Date.now();
      o.progress.write(`${s}\n`);
    }
  };
  try {
    fs.ftruncateSync(fd, regionBytes);
    const chunk = Buffer.alloc(Math.min(regionBytes, 1 << 20));
    for (let i = 0; i + 4 <= chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
    for (let off = 0; off < regionBytes; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, regionBytes - off), off);
    const region = engine.openHostRegion(shm, regionBytes);
    const file = (i: number) => path.join(work, `b${i.toString(16).padStart(8, "0")}`);
    const spec = (from: number, to: number, p: (i: number) => string): TransferSpec => {
      const b = new ShardListBuilder();
      for (let i = from; i < to; i++) {
        const base = (i % slots) * blockBytes;
        b.addBlock(
          p(i),
          Array.from({ length: o.shards }, (_, s) => [region, base + s * shard, shard] as const),
        );
      }
      return b.build(0x75636d62656e6368n);
    };
    let failed = 0;
    // Keeps `slots` blocks in flight: six lanes of tasks of threads/2 blocks,
    // so the queue never runs dry at a task boundary. Reports progress and
    // how busy the streams kept storage (the engine's storageBusyNs).
    const perTask = Math.max(1, Math.ceil(o.threads / 2));
    const busy: number[] = [];
    const run = async (what: string, submit: (from: number, to: number) => Promise<number>): Promise<number> => {
      const t0 = process.hrtime.bigint();
      const busy0 = engine.stats().storageBusyNs;
      let next = 0;
      let done = 0;
      let bytes = 0;
      const lane = async () => {
        while (next < blocks) {
          const from = next;
          const to = Math.min(blocks, from + perTask);
          next = to;
          const moved = await submit(from, to); // not `bytes += await ...`: lanes would overwrite each other
          bytes += moved;
          done += to - from;
          const s = Number(process.hrtime.bigint() - t0) / 1e9;
          say(`${what}: ${done}/${blocks} blocks, ${(bytes / s / 1e9).toFixed(2)} GB/s`, done === blocks);
        }
      };
      await Promise.all(Array.from({ length: 6 }, lane));
      const ns = Number(process.hrtime.bigint() - t0);
      busy.push((engine.stats().storageBusyNs - busy0) / (ns * o.threads));
      return bytes / (ns / 1e9) / 1e9;
    };
    const dumpGBps = await run("dump", async (from, to) => {
      const r = await engine.dump(spec(from, to, (i) => file(i) + ".tmp"));
      const ok: number[] = [];
      r.status.forEach((st, j) => (st === BlockStatus.Ok ? ok.push(from + j) : failed++));
      const errs = await engine.commit(
        ok.map((i) => file(i) + ".tmp"),
        ok.map(file),
      );
      failed += errs.filter((e) => e !== 0).length;
      return r.bytes;
    });
    // Cold reads where we may (root): nothing of the files left in the page cache.
    let cold = false;
    try {
      execFileSync("sync");
      fs.writeFileSync("/proc/sys/vm/drop_caches", "3");
      cold = true;
    } catch {
      // not root: reads may be served from caches (O_DIRECT avoids the page cache where the filesystem honours it)
    }
    const loadGBps = await run("load", async (from, to) => {
      const r = await engine.load(spec(from, to, file));
      failed += r.status.filter((st) => st !== BlockStatus.Ok).length;
      return r.bytes;
    });
    const paths = Array.from({ length: blocks }, (_, i) => file(i));
    const single: number[] = [];
    const rounds = Math.min(2000, Math.max(200, blocks));
    for (let i = 0; i < rounds; i++) {
      const t = process.hrtime.bigint();
      await engine.lookup([paths[i % blocks]]);
      single.push(Number(process.hrtime.bigint() - t) / 1e3);
      if (i % 50 === 0) say(`lookup: ${i}/${rounds}`);
    }
    const batchKeys = Math.min(256, blocks);
    const batch: number[] = [];
    for (let i = 0; i < 50; i++) {
      const t = process.hrtime.bigint();
      await engine.lookup(paths.slice(0, batchKeys));
      batch.push(Number(process.hrtime.bigint() - t) / 1e3);
    }
    single.sort((a, b) => a - b);
    batch.sort((a, b) => a - b);
    if (o.progress?.isTTY) o.progress.write("\r\x1b[K");
    return {
      dir,
      fsType: fsTypeOf(dir),
      blocks,
      blockBytes,
      threads: o.threads,
      dumpGBps,
      loadGBps,
      dumpBusy: busy[0],
      loadBusy: busy[1],
      lookup1: { p50Us: percentile(single, 0.5), p99Us: percentile(single, 0.99) },
      lookupBatch: { keys: batchKeys, p50Us: percentile(batch, 0.5), p99Us: percentile(batch, 0.99) },
      failed,
      coldLoad: cold,
    };
  } finally {
    engine.close();
    fs.closeSync(fd);
    fs.rmSync(shm, { force: true });
    fs.rmSync(work, { recursive: true, force: true });
  }
}

export function formatMountBench(r: MountBenchResult, odirect: boolean): string {
  const mib = (x: number) => `${(x / 2 ** 20).toFixed(1)} MiB`;
  const pct = (x: number) => `${(100 * x).toFixed(0)} %`;
  const rows: Array<[string, string]> = [
    ["directory", `${r.dir} (${r.fsType})`],
    [
      "blocks",
      `${r.blocks} x ${mib(r.blockBytes)} (file ${mib(blockFileSize(r.blockBytes))}), ${r.threads} streams, O_DIRECT ${odirect ? "on" : "off"}`,
    ],
    ["dump (write + rename)", `${r.dumpGBps.toFixed(2)} GB/s, storage busy ${pct(r.dumpBusy)} of the time`],
    [
      "load (read + verify)",
      `${r.loadGBps.toFixed(2)} GB/s, storage busy ${pct(r.loadBusy)} (${r.coldLoad ? "page cache dropped first" : "page cache not dropped: run as root for cold reads"})`,
    ],
    ["lookup, 1 key", `p50 ${r.lookup1.p50Us.toFixed(0)} us, p99 ${r.lookup1.p99Us.toFixed(0)} us`],
    [`lookup, ${r.lookupBatch.keys} keys`, `p50 ${r.lookupBatch.p50Us.toFixed(0)} us, p99 ${r.lookupBatch.p99Us.toFixed(0)} us`],
    ["failed blocks", String(r.failed)],
  ];
  return table(["measure", "result"], rows);
}

/** A plain text table. */
export function table(head: [string, string], rows: Array<[string, string]>): string {
  const w = Math.max(head[0].length, ...rows.map((r) => r[0].length));
  const lines = [
    `${head[0].padEnd(w)}  ${head[1]}`,
    `${"-".repeat(w)}  ${"-".repeat(Math.max(head[1].length, ...rows.map((r) => r[1].length)))}`,
  ];
  for (const [a, b] of rows) lines.push(`${a.padEnd(w)}  ${b}`);
  return lines.join("\n");
}
