// Engine request path: lookup round trip (256 keys, warm metadata) and
// one-block dump tasks per second, through the real engine process over
// ZeroMQ ipc.
//
//   node dist/bench/engine_bench.js [--dir <storage dir>] [--seconds 5] [--window 64] [--capacity 64MiB]
//
// With --capacity the store runs with that capacity (evictionGraceS 0), so
// the task figure includes the ledger and eviction work; dumps shed for
// capacity count as done and are reported.
import { execFileSync, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { EngineClient } from "../core/client";

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const seconds = Number(arg("seconds", "5"));
const window = Number(arg("window", "64"));
const blockBytes = Number(arg("block-bytes", "65536"));
const capacity = arg("capacity", "");

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main(): Promise<void> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "ucmb-"));
  const store = path.resolve(arg("dir", path.join(tmp, "store")));
  fs.mkdirSync(store, { recursive: true });
  const cfg = path.join(tmp, "c.yaml");
  fs.writeFileSync(
    cfg,
    `ucm_connector_name: "UcmNfsStore"\nucm_connector_config:\n  storage_backends: "${store}"\n  transferStreamNumber: 32\n  endpoint: "ipc://${tmp}/e.sock"\n  logLevel: warn\n${capacity ? `  capacity: ${capacity}\n  evictionGraceS: 0\n` : ""}`,
  );
  const proc = spawn(process.execPath, [path.join(__dirname, "../core/cli.js"), "serve", "--config", cfg], { stdio: "inherit" });
  const region = `/ucm-bench-${process.pid}`;
  const nblocks = 4096;
  fs.writeFileSync(path.join("/dev/shm", region.slice(1)), Buffer.alloc(blockBytes * 16, 7));
  const c = new EngineClient(`ipc://${tmp}/e.sock`, 30000);
  try {
    for (let i = 0; ; i++) {
      try {
        await c.call("health", {}, 200);
        break;
      } catch {
        if (i > 100) throw new Error("engine did not start");
      }
    }
    await c.call("hello", { version: 1, pid: process.pid, name: "bench" });
    const [rid] = (await c.call("register", { regions: [{ medium: "host", source: region, size: blockBytes * 16 }] })).regions as number[];
    const ns = "bench";
    const keys = Array.from({ length: 256 }, (_, i) => crypto.createHash("sha256").update(`k${i}`).digest());
    const one = (k: Buffer[], slot: number) => ({
      ns,
      keys: k,
      shards: {
        count: 1,
        region: k.map(() => rid),
        offset: k.map((_, i) => ((slot + i) % 16) * blockBytes),
        length: k.map(() => blockBytes),
      },
    });
    const d = await c.call("dump", one(keys, 0));
    await c.call("wait", { task: d.task, timeout_ms: 60000 });
    await c.call("commit", { ns, keys });

    // Lookup round trips, warm metadata.
    for (let i = 0; i < 200; i++) await c.call("lookup", { ns, keys });
    const rtt: number[] = [];
    const tEnd = Date.now() + seconds * 1000;
    while (Date.now() < tEnd) {
      const t0 = process.hrtime.bigint();
      const r = await c.call("lookup", { ns, keys });
      rtt.push(Number(process.hrtime.bigint() - t0) / 1000);
      if ((r.found as boolean[]).some((f) => !f)) throw new Error("lookup missed a committed key");
    }
    rtt.sort((a, b) => a - b);

    // One-block dump tasks, `window` in flight: submit, wait, commit.
    let next = 0;
    let done = 0;
    let dropped = 0;
    const t1 = Date.now();
    const stopAt = t1 + seconds * 1000;
    async function worker(): Promise<void> {
      while (Date.now() < stopAt && next < nblocks * 64) {
        const k = crypto.createHash("sha256").update(`t${next++}`).digest();
        const t = await c.call("dump", one([k], next));
        const w = await c.call("wait", { task: t.task, timeout_ms: 30000 });
        const st = (w.status as string[])[0];
        if (st === "dropped" && capacity) dropped++;
        else if (st !== "ok") throw new Error(`dump failed: ${String(w.status)}`);
        else await c.call("commit", { ns, keys: [k] });
        done++;
      }
    }
    await Promise.all(Array.from({ length: window }, worker));
    const tps = done / ((Date.now() - t1) / 1000);
    const fsType = fs.existsSync(store) ? execFileSync("stat", ["-f", "-c", "%T", store], { encoding: "utf8" }).trim() : "?";
    console.log(`\nengine request path: ${os.cpus().length} CPUs, store ${store} (${fsType}), ${seconds}s per figure\n`);
    console.log("| figure | value | goal |");
    console.log("| --- | ---: | ---: |");
    console.log(`| lookup 256 keys, round trip p50 | ${pct(rtt, 50).toFixed(0)} us | < 200 us |`);
    console.log(`| lookup 256 keys, round trip p99 | ${pct(rtt, 99).toFixed(0)} us | < 1000 us |`);
    console.log(`| lookups measured | ${rtt.length} | |`);
    console.log(
      `| one-block tasks (${blockBytes / 1024} KiB dump + wait + commit), ${window} in flight | ${tps.toFixed(0)} tasks/s | >= 2000 |`,
    );
    if (capacity) {
      const st = await c.call("stats");
      const cap = (st.capacity as Array<Record<string, number>>)[0];
      console.log(`| capacity ${capacity}: stored / dropped for capacity | ${done - dropped} / ${dropped} | |`);
      console.log(`| evicted blocks (passes) | ${cap.evictedFiles} (${cap.evictionPasses}) | |`);
      console.log(`| used at the end | ${(cap.usedBytes / 2 ** 20).toFixed(1)} MiB of ${(cap.capacity / 2 ** 20).toFixed(0)} MiB | |`);
    }
  } finally {
    c.close();
    proc.kill("SIGTERM");
    await new Promise((r) => proc.on("exit", r));
    fs.rmSync(path.join("/dev/shm", region.slice(1)), { force: true });
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.stack : e);
  process.exit(1);
});
