// Native transfer core at full size, beside fio on the same directory.
//
// Shape: QwQ-32B at TP=2, block_size 128: 64 layers x (K, V) shards per block,
// each 4 kv heads x 128 head size x 128 tokens x bf16 = 128 KiB; a block is
// 16 MiB. Dumps then loads --gib GiB (default 4) with --threads workers
// (default 32, transferStreamNumber's default), then runs fio with the same
// I/O size and thread count: write with O_DIRECT, read cold (page cache
// dropped, O_DIRECT). Prints a markdown table.
//
//   node dist/bench/native_bench.js --dir /path/on/disk [--gib 4] [--threads 32]
import { execFileSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { BlockStatus, Engine, ShardListBuilder, blockFileSize } from "../core/native";

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const LAYERS = 64;
const SHARD = 4 * 128 * 128 * 2; // kv heads x head size x tokens x bf16
const BLOCK = LAYERS * 2 * SHARD;
const gib = Number(arg("gib", "4"));
const threads = Number(arg("threads", "32"));
const odirect = arg("odirect", "1") !== "0";
const baseDir = path.resolve(arg("dir", path.join(__dirname, "../../.test-tmp/bench")));
const nblocks = Math.round((gib * 2 ** 30) / BLOCK);

function dropCaches(): boolean {
  try {
    execFileSync("sync");
    fs.writeFileSync("/proc/sys/vm/drop_caches", "3");
    return true;
  } catch {
    return false;
  }
}

function fio(dir: string, rw: "write" | "read"): number {
  const fileSize = blockFileSize(BLOCK);
  const perJob = Math.ceil(nblocks / threads) * fileSize;
  const out = execFileSync(
    "fio",
    [
      "--name=ucm",
      `--directory=${dir}`,
      `--rw=${rw}`,
      `--bs=${fileSize}`,
      `--size=${perJob}`,
      `--numjobs=${threads}`,
      "--direct=1",
      "--ioengine=psync",
      "--group_reporting",
      "--output-format=json",
    ],
    { encoding: "utf8", maxBuffer: 1 << 26 },
  );
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return (rw === "write" ? job.write.bw_bytes : job.read.bw_bytes) / 1e9;
}

function makeRegion(name: string, size: number): string {
  const file = path.join("/dev/shm", name);
  const fd = fs.openSync(file, "w+", 0o600);
  fs.ftruncateSync(fd, size);
  // Fill with a pattern so pages are real and checksums see data.
  const chunk = Buffer.alloc(1 << 20);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  for (let off = 0; off < size; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
  fs.closeSync(fd);
  return "/" + name;
}

async function main(): Promise<void> {
  if (!Number.isInteger(nblocks) || nblocks < 1) throw new Error(`--gib ${gib} gives no blocks`);
  const dir = fs.mkdtempSync(path.join(fs.mkdirSync(baseDir, { recursive: true }) ?? baseDir, "run-"));
  const fioDir = path.join(dir, "fio");
  fs.mkdirSync(fioDir);
  const regionBytes = nblocks * SHARD;
  const names: string[] = [];
  const engine = new Engine({ threads, odirect });
  try {
    // One region per layer per K/V, as vLLM's per-layer caches are separate tensors.
    const ids: number[] = [];
    for (let r = 0; r < LAYERS * 2; r++) {
      const n = `ucm-bench-${process.pid}-${r}`;
      names.push(n);
      ids.push(engine.openHostRegion(makeRegion(n, regionBytes), regionBytes));
    }
    const build = (prefix: string) => {
      const b = new ShardListBuilder();
      for (let k = 0; k < nblocks; k++)
        b.addBlock(
          path.join(dir, `${prefix}${k}`),
          ids.map((id) => [id, k * SHARD, SHARD] as const),
        );
      return b.build(42n);
    };
    const total = nblocks * BLOCK;
    // Warm-up: every worker touches its staging buffer once, as in a running engine.
    const warm = new ShardListBuilder();
    for (let k = 0; k < threads; k++)
      warm.addBlock(
        path.join(dir, `warm${k}`),
        ids.map((id) => [id, (k % nblocks) * SHARD, SHARD] as const),
      );
    await engine.dump(warm.build(42n));
    await engine.remove(Array.from({ length: threads }, (_, k) => path.join(dir, `warm${k}`)));
    const t0 = process.hrtime.bigint();
    const d = await engine.dump(build("blk"));
    const dumpS = Number(process.hrtime.bigint() - t0) / 1e9;
    if (!d.status.every((s) => s === BlockStatus.Ok)) throw new Error(`dump failed: ${d.what.find((w) => w)}`);
    const cold = dropCaches();
    const t1 = process.hrtime.bigint();
    const l = await engine.load(build("blk"));
    const loadS = Number(process.hrtime.bigint() - t1) / 1e9;
    if (!l.status.every((s) => s === BlockStatus.Ok)) throw new Error(`load failed: ${l.what.find((w) => w)}`);
    engine.close();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(fioDir, { recursive: true });

    const fioW = fio(fioDir, "write");
    dropCaches();
    const fioR = fio(fioDir, "read");
    fs.rmSync(dir, { recursive: true, force: true });

    const ourW = total / dumpS / 1e9;
    const ourR = total / loadS / 1e9;
    const fsType = execFileSync("stat", ["-f", "-c", "%T", baseDir], { encoding: "utf8" }).trim();
    console.log(
      `\nnative core vs fio: ${nblocks} blocks x ${BLOCK / 2 ** 20} MiB (${(total / 2 ** 30).toFixed(2)} GiB), ` +
        `${LAYERS * 2} shards/block, ${threads} threads, O_DIRECT ${odirect ? "on" : "off"}, dir ${baseDir} (${fsType}), ` +
        `${os.cpus().length} CPUs, page cache ${cold ? "dropped before reads" : "NOT dropped (no permission)"}\n`,
    );
    console.log("| direction | ucm GB/s | fio GB/s | ucm / fio |");
    console.log("| --- | ---: | ---: | ---: |");
    console.log(`| dump (D2S, write) | ${ourW.toFixed(2)} | ${fioW.toFixed(2)} | ${((100 * ourW) / fioW).toFixed(0)} % |`);
    console.log(`| load (S2D, read, cold) | ${ourR.toFixed(2)} | ${fioR.toFixed(2)} | ${((100 * ourR) / fioR).toFixed(0)} % |`);
  } finally {
    try {
      engine.close();
    } catch {
      /* already closed */
    }
    for (const n of names) fs.rmSync(path.join("/dev/shm", n), { force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
