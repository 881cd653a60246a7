// The NFS suite's harness: engines started from the built engine's copy
// (dist/core/cli.js serve) and driven over ZeroMQ, shared-memory "KV caches",
// NFS mounts, the server's own view of the export and its counters, fio, and
// the results (one JSON line per test, written as it ends) with the summary
// that run.sh prints on the host. See suite.ts.
import { ChildProcess, execFileSync, spawn, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { stringify } from "yaml";
import { EngineClient } from "../../dist/core/client";
import { ShmRegion, storeUsage } from "../helpers/fixtures";

export const REPO = path.resolve(__dirname, "../..");
export const CLI = path.join(REPO, "dist/core/cli.js");
export const NS = "nfs-ns";
export const KiB = 1024;
export const MiB = 1024 * 1024;
export const SERVER_NFS3 = "127.0.0.1:/srv/export";
export const SERVER_NFS4 = "127.0.0.1:/"; // the export is the v4 root (fsid=0)
export const RUN = "/tmp/nfs-suite"; // configs and sockets (guest tmpfs)

export type Vers = "4.2" | "3";
export type Figures = Record<string, unknown>;

// ---- small utilities ----------------------------------------------------------

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
export const now = () => Date.now();
export const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}:${i}`).digest();
export const round = (x: number, d = 1) => Math.round(x * 10 ** d) / 10 ** d;

export class CheckFailed extends Error {}
export function check(cond: unknown, msg: string): asserts cond {
  if (!cond) throw new CheckFailed(msg);
}

export function sh(cmd: string, args: string[], timeoutMs = 60_000): string {
  return execFileSync(cmd, args, { encoding: "utf8", timeout: timeoutMs, stdio: ["ignore", "pipe", "pipe"], maxBuffer: 1 << 26 });
}
export function trySh(cmd: string, args: string[], timeoutMs = 60_000): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: timeoutMs });
  return { ok: r.status === 0, out: `${r.stdout ?? ""}${r.stderr ?? ""}` };
}

export function log(s: string): void {
  process.stdout.write(`[nfs] ${s}\n`);
}

/** Resolves with fn's value, or rejects after ms (the work itself is not stopped). */
export function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<T>((_, reject) => {
      t = setTimeout(() => reject(new CheckFailed(`${what}: no result within ${ms} ms`)), ms);
    }),
  ]);
}

// ---- results -------------------------------------------------------------------

export interface Result {
  name: string;
  ok: boolean;
  ms: number;
  error?: string;
  figures?: Figures;
}

let OUT = "/mnt/out";
/** Where results, figures and engine logs go (the guest's writable share). */
export function setOut(dir: string): void {
  OUT = dir;
}
export const results: Result[] = [];
export const allFigures: Record<string, Figures> = {};

/** What a test owns: its figures, engines and shared memory, released when it ends. */
export class T {
  readonly fig: Figures = {};
  readonly engines: Engine[] = [];
  readonly shms: Shm[] = [];
  constructor(readonly name: string) {}
  async engine(name: string, cfg: Record<string, unknown>): Promise<Engine> {
    const e = await Engine.start(name, cfg);
    this.engines.push(e);
    return e;
  }
  shm(size: number, fill: "random" | "zero"): Shm {
    const s = new Shm(size, fill);
    this.shms.push(s);
    return s;
  }
  async release(): Promise<void> {
    await Promise.all(this.engines.map((e) => e.stop()));
    for (const s of this.shms) s.unlink();
  }
}

/** Runs one test with a deadline; records and prints its result. Never throws. */
export async function test(name: string, timeoutMs: number, fn: (t: T) => Promise<void>): Promise<boolean> {
  const t = new T(name);
  const t0 = now();
  log(`RUN  ${name}`);
  let error: string | undefined;
  try {
    await within(timeoutMs, name, fn(t));
  } catch (e) {
    error = e instanceof CheckFailed ? e.message : ((e as Error)?.stack ?? String(e));
  } finally {
    await t.release();
  }
  const r: Result = { name, ok: error === undefined, ms: now() - t0, figures: t.fig };
  if (error !== undefined) r.error = error;
  results.push(r);
  allFigures[name] = t.fig;
  fs.appendFileSync(path.join(OUT, "results.jsonl"), JSON.stringify(r) + "\n");
  fs.writeFileSync(path.join(OUT, "figures.json"), JSON.stringify(allFigures, null, 2));
  log(`${r.ok ? "PASS" : "FAIL"} ${name} (${(r.ms / 1000).toFixed(1)} s)${r.ok ? "" : `: ${error}`}`);
  log(`     ${JSON.stringify(t.fig)}`);
  return r.ok;
}

// ---- shared memory regions (the host-memory "KV cache" of a client) ------------

/** A region of the NFS suite: a ShmRegion named /dev/shm/ucm-nfs-... */
export class Shm extends ShmRegion {
  constructor(size: number, fill: "random" | "zero") {
    super(size, fill, "ucm-nfs");
  }
}

/** A client's registered memory: `regs.length` regions (like K and V of a layer) of `slots` blocks. */
export interface Mem {
  regs: Shm[];
  ids: number[];
  shard: number;
}

export async function register(
  t: T,
  c: EngineClient,
  regions: number,
  slots: number,
  shard: number,
  fill: "random" | "zero",
): Promise<Mem> {
  const regs = Array.from({ length: regions }, () => t.shm(slots * shard, fill));
  const r = await c.call("register", { regions: regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) });
  return { regs, ids: r.regions as number[], shard };
}

/** Block j of a request is slot slots[j] of every region of m. */
export function shards(m: Mem, slots: number[]) {
  const region: number[] = [];
  const offset: number[] = [];
  const length: number[] = [];
  for (const s of slots) {
    for (const id of m.ids) {
      region.push(id);
      offset.push(s * m.shard);
      length.push(m.shard);
    }
  }
  return { count: m.ids.length, region, offset, length };
}

/** Slot `a` of `x` holds the same bytes as slot `b` of `y`, in every region. */
export function sameBlock(x: Mem, a: number, y: Mem, b: number): boolean {
  return x.regs.every((r, q) => r.read(a * x.shard, x.shard).equals(y.regs[q].read(b * y.shard, y.shard)));
}
export function zeroSlot(m: Mem, s: number): void {
  for (const r of m.regs) r.write(s * m.shard, Buffer.alloc(m.shard));
}
export function isZero(m: Mem, s: number): boolean {
  return m.regs.every((r) => r.read(s * m.shard, m.shard).every((b) => b === 0));
}
/** Copies slot `a` of `x` into slot `b` of `y` (same contents on two nodes). */
export function copySlot(x: Mem, a: number, y: Mem, b: number): void {
  x.regs.forEach((r, q) => y.regs[q].write(b * y.shard, r.read(a * x.shard, x.shard)));
}

export interface TaskResult {
  done: boolean;
  status: string[];
  errno: number[];
  failed: number[];
}

export async function finish(c: EngineClient, task: unknown, timeoutMs = 120_000): Promise<TaskResult> {
  const r = (await c.call("wait", { task, timeout_ms: timeoutMs }, timeoutMs + 10_000)) as unknown as TaskResult;
  check(r.done === true, `task ${String(task)} not done within ${timeoutMs} ms`);
  return r;
}

export async function dump(
  c: EngineClient,
  m: Mem,
  keys: Buffer[],
  slots: number[],
  commit = true,
  timeoutMs?: number,
): Promise<TaskResult> {
  const d = await c.call("dump", { ns: NS, keys, shards: shards(m, slots), commit }, timeoutMs);
  return finish(c, d.task);
}

export async function load(c: EngineClient, m: Mem, keys: Buffer[], slots: number[]): Promise<TaskResult> {
  const l = await c.call("load", { ns: NS, keys, shards: shards(m, slots) });
  return finish(c, l.task);
}

export async function lookup(c: EngineClient, keys: Buffer[], timeoutMs?: number): Promise<boolean[]> {
  return (await c.call("lookup", { ns: NS, keys }, timeoutMs)).found as boolean[];
}

// ---- engines -------------------------------------------------------------------

export class Engine {
  readonly clients: EngineClient[] = [];
  private out = "";
  readonly exited: Promise<number | null>;
  private constructor(
    readonly name: string,
    readonly proc: ChildProcess,
    readonly endpoint: string,
  ) {
    const logFile = fs.createWriteStream(path.join(OUT, "engines", `${name}.log`), { flags: "a" });
    const take = (d: Buffer) => {
      this.out += d.toString();
      logFile.write(d);
    };
    proc.stdout!.on("data", take);
    proc.stderr!.on("data", take);
    this.exited = new Promise((resolve) => proc.on("exit", (code) => resolve(code)));
    void this.exited.then(() => logFile.end());
  }

  static async start(name: string, cfg: Record<string, unknown>): Promise<Engine> {
    fs.mkdirSync(RUN, { recursive: true });
    const endpoint = `ipc://${RUN}/${name}.sock`;
    const file = path.join(RUN, `${name}.yaml`);
    fs.writeFileSync(file, stringify({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: { endpoint, ...cfg } }));
    const proc = spawn(process.execPath, [CLI, "serve", "--config", file], { stdio: ["ignore", "pipe", "pipe"] });
    const e = new Engine(name, proc, endpoint);
    const t0 = now();
    while (!/listening on /.test(e.out)) {
      if (proc.exitCode !== null) throw new CheckFailed(`engine ${name} exited with ${proc.exitCode} before listening:\n${e.out}`);
      if (now() - t0 > 60_000) throw new CheckFailed(`engine ${name} did not start within 60 s:\n${e.out}`);
      await sleep(50);
    }
    return e;
  }

  output(): string {
    return this.out;
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async client(timeoutMs = 30_000): Promise<EngineClient> {
    const c = new EngineClient(this.endpoint, timeoutMs);
    this.clients.push(c);
    await c.call("hello", { version: 1, pid: process.pid, name: `nfs-suite-${this.name}` });
    return c;
  }

  async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 20_000): Promise<void> {
    for (const c of this.clients.splice(0)) c.close();
    if (!this.alive) return;
    this.proc.kill(signal);
    const t = setTimeout(() => this.proc.kill("SIGKILL"), timeoutMs);
    await this.exited;
    clearTimeout(t);
  }
}
// ---- mounts and the server's view ------------------------------------------------

export interface MountInfo {
  where: string;
  vers: Vers;
  opts: string;
  /** Attribute cache bounds of the mount, seconds. */
  acdirmax: number;
  acregmax: number;
}

export function mountInfo(where: string): MountInfo | undefined {
  for (const line of fs.readFileSync("/proc/mounts", "utf8").split("\n")) {
    const [, mnt, type, opts] = line.split(" ");
    if (mnt !== where || !type?.startsWith("nfs")) continue;
    const o = new Map(opts.split(",").map((kv) => [kv.split("=")[0], kv.split("=")[1] ?? ""] as [string, string]));
    const num = (k: string, d: number) => (o.has(k) ? Number(o.get(k)) : d);
    const ac = o.has("actimeo") ? Number(o.get("actimeo")) : undefined;
    return {
      where,
      vers: (o.get("vers") ?? "").startsWith("4") ? "4.2" : "3",
      opts,
      acdirmax: o.has("noac") ? 0 : (ac ?? num("acdirmax", 60)),
      acregmax: o.has("noac") ? 0 : (ac ?? num("acregmax", 60)),
    };
  }
  return undefined;
}

export function mount(vers: Vers, where: string, extra: string[]): MountInfo {
  fs.mkdirSync(where, { recursive: true });
  const src = vers === "3" ? SERVER_NFS3 : SERVER_NFS4;
  sh("mount", ["-t", "nfs", "-o", [`vers=${vers}`, ...extra].join(","), src, where], 120_000);
  const m = mountInfo(where);
  check(m, `mount of ${src} on ${where} not in /proc/mounts`);
  return m;
}

export function umount(where: string): void {
  if (!trySh("umount", [where], 30_000).ok) trySh("umount", ["-f", "-l", where], 30_000);
}

/** Bytes, block files and temporary files under a store directory, from the server's side. */
export const serverUsage = storeUsage;

/** Committed block files (key hex -> size) of the namespace, as the server sees them. */
export function serverBlocks(store: string): Map<string, number> {
  const out = new Map<string, number>();
  const root = path.join(store, NS);
  if (!fs.existsSync(root)) return out;
  for (const d of fs.readdirSync(root)) {
    if (!/^[0-9a-f]{2}$/.test(d)) continue;
    for (const f of fs.readdirSync(path.join(root, d))) {
      try {
        out.set(f, fs.statSync(path.join(root, d, f)).size);
      } catch {
        // deleted meanwhile
      }
    }
  }
  return out;
}

/** The kernel NFS server's counters: bytes written, NFSv3 procedure and NFSv4 operation counts. */
export function nfsdStats(): { writeBytes: number; v3: number[]; v4ops: number[] } {
  let writeBytes = 0;
  let v3: number[] = [];
  let v4ops: number[] = [];
  for (const line of fs.readFileSync("/proc/net/rpc/nfsd", "utf8").split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f[0] === "io") writeBytes = Number(f[2]);
    if (f[0] === "proc3") v3 = f.slice(2).map(Number);
    if (f[0] === "proc4ops") v4ops = f.slice(2).map(Number);
  }
  return { writeBytes, v3, v4ops };
}
export const NFS3_WRITE = 7;
export const NFS4_OP_WRITE = 38;
export const NFS4_OP_ALLOCATE = 59;

export function dropCaches(): void {
  execFileSync("sync");
  fs.writeFileSync("/proc/sys/vm/drop_caches", "3");
}

// ---- the per-version context -----------------------------------------------------

export interface Ctx {
  vers: Vers;
  tag: string; // "v4.2" | "v3"
  a: MountInfo; // node A
  b: MountInfo; // node B: nosharecache, default caching
  c: MountInfo; // node C: nosharecache, lookupcache=positive (no negative dentries)
  exportDir: string;
}

/** A fresh test directory: its path under each mount and on the server. */
export function testDir(ctx: Ctx, name: string) {
  const rel = path.join(ctx.tag, name);
  const server = path.join(ctx.exportDir, rel);
  fs.rmSync(server, { recursive: true, force: true });
  fs.mkdirSync(server, { recursive: true });
  return { server, a: path.join(ctx.a.where, rel), b: path.join(ctx.b.where, rel), c: path.join(ctx.c.where, rel) };
}

export function engineName(ctx: Ctx, test: string, node: string): string {
  return `${ctx.tag}-${test}-${node}`;
}

/** The NFS client's byte counters of the mount on `where` (/proc/self/mountstats "bytes:"). */
export function mountBytes(where: string): { normalRead: number; normalWrite: number; directRead: number; directWrite: number } {
  const text = fs.readFileSync("/proc/self/mountstats", "utf8");
  const at = text.indexOf(` mounted on ${where} with fstype nfs`);
  check(at >= 0, `${where} not in /proc/self/mountstats`);
  const m = /\n\s*bytes:\s+(\d+) (\d+) (\d+) (\d+)/.exec(text.slice(at));
  check(m, `no bytes: line for ${where} in /proc/self/mountstats`);
  return { normalRead: Number(m[1]), normalWrite: Number(m[2]), directRead: Number(m[3]), directWrite: Number(m[4]) };
}

export interface FioResult {
  writeMBps: number;
  readMBps: number;
}

/** fio beside the engine: the same I/O size (one block file per I/O), threads and O_DIRECT; reads cold. */
export function fio(dir: string, fileBytes: number, blocks: number, threads: number): FioResult {
  fs.mkdirSync(dir, { recursive: true });
  const run = (rw: "write" | "read") => {
    if (rw === "read") dropCaches();
    const out = sh(
      "fio",
      [
        "--name=ucm",
        `--directory=${dir}`,
        `--rw=${rw}`,
        `--bs=${fileBytes}`,
        `--size=${Math.ceil(blocks / threads) * fileBytes}`,
        `--numjobs=${threads}`,
        "--direct=1",
        "--ioengine=psync",
        "--group_reporting",
        "--output-format=json",
      ],
      600_000,
    );
    const j = JSON.parse(out.slice(out.indexOf("{"))) as { jobs: Array<Record<string, { bw_bytes: number }>> };
    return j.jobs[0][rw].bw_bytes / 1e6;
  };
  const writeMBps = run("write");
  const readMBps = run("read");
  fs.rmSync(dir, { recursive: true, force: true });
  return { writeMBps, readMBps };
}

// ---- the host side: summary of a guest run --------------------------------------

export function report(out: string, elapsedS: number): number {
  const file = path.join(out, "results.jsonl");
  const rs: Result[] = fs.existsSync(file)
    ? fs
        .readFileSync(file, "utf8")
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Result)
    : [];
  const problems: string[] = [];
  if (fs.existsSync(path.join(out, "setup-failed")))
    problems.push(`guest setup failed: ${fs.readFileSync(path.join(out, "setup-failed"), "utf8").trim()}`);
  if (fs.existsSync(path.join(out, "guest-timeout"))) problems.push("the guest ran past its time limit and was stopped");
  const rc = fs.existsSync(path.join(out, "suite-rc")) ? fs.readFileSync(path.join(out, "suite-rc"), "utf8").trim() : "";
  if (rc === "") problems.push("the suite did not finish (see .test-tmp/nfs/console.log)");
  else if (rc !== "0" && rs.every((r) => r.ok)) problems.push(`the suite exited with ${rc}`);
  console.log("\nNFS suite (QEMU guest, Linux kernel NFS client and server over loopback)");
  for (const r of rs)
    console.log(
      `  ${r.ok ? "PASS" : "FAIL"}  ${r.name.padEnd(22)} ${(r.ms / 1000).toFixed(1).padStart(6)} s${r.ok ? "" : `  ${r.error?.split("\n")[0]}`}`,
    );
  for (const p of problems) console.log(`  FAIL  ${p}`);
  // The figures an operator asks for (all of them: figures.json beside the results).
  type Bench = {
    ucm_dump_MBps: number;
    ucm_load_MBps: number;
    fio_write_MBps: number;
    fio_read_MBps: number;
    dump_pct: number;
    load_pct: number;
  };
  const pct = (b: Bench) =>
    `dump ${b.dump_pct} % (${b.ucm_dump_MBps} vs ${b.fio_write_MBps} MB/s), load ${b.load_pct} % (${b.ucm_load_MBps} vs ${b.fio_read_MBps} MB/s)`;
  for (const r of rs) {
    const f = r.figures ?? {};
    if (r.name.endsWith(" bench") && f.link_limited) {
      console.log(`  ${r.name} vs fio, link ${String(f.link)}: ${pct(f.link_limited as Bench)}`);
      if (f.cpu_bound) console.log(`  ${r.name} vs fio, no link limit (emulated CPU bound): ${pct(f.cpu_bound as Bench)}`);
    }
    if (r.name.endsWith(" visible") && f.b_found_after_s !== undefined) {
      console.log(
        `  ${r.name}: another node's commit found after ${String(f.b_found_after_s)} s (default mount), ${String(f.c_found_after_s)} s (lookupcache=positive)`,
      );
    }
    if (r.name === "hung server") {
      for (const [label, v] of Object.entries(f)) {
        if (typeof v !== "object" || v === null) continue;
        const h = v as Record<string, unknown>;
        console.log(
          `  hung ${label.padEnd(14)} load: ${String(h.load)}; engine's own answer: ${String(h.engine_answered_load)}; breaker open: lookup in ${String(h.lookup_breaker_open_ms)} ms; recovered ${String(h.recovered_after_s)} s after the server returned`,
        );
      }
    }
  }
  const passed = rs.filter((r) => r.ok).length;
  const failed = rs.length - passed + problems.length;
  // The failures once more, last: a CI log cut to its tail still names them.
  for (const r of rs.filter((x) => !x.ok)) console.log(`  failed: ${r.name}: ${r.error?.split("\n")[0]}`);
  for (const p of problems) console.log(`  failed: ${p}`);
  console.log(`NFS suite took ${elapsedS} s in all`);
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}
