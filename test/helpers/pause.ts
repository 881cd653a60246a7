// Stops a real engine process (SIGSTOP) in the middle of a copy, seen from
// outside: a load's copy writes the client's shared memory (bytes appear at
// an offset that was zero), a dump's copy reads it into fresh staging (the
// engine's resident memory grows). A worker thread polls in a tight loop, so
// the stop lands within a few MiB of the moment it looks for, without any
// hook inside the engine.
import * as fs from "fs";
import { Worker } from "worker_threads";

/** What the poller waits for before it stops `pid`. */
export type StopWhen = { file: string; offset: number } | { rssGrowth: number };

export interface StopResult {
  stopped: boolean;
  /** Milliseconds the poller waited. */
  waitedMs: number;
  /** How much the process's resident memory had grown when it was stopped (bytes). */
  rssGrowth: number;
}

// Plain JavaScript: the worker is evaluated as is, not through ts-jest.
const POLLER = `
const { workerData, parentPort } = require("worker_threads");
const fs = require("fs");
const { pid, when, timeoutMs } = workerData;
const t0 = Date.now();
const rss = () => Number(fs.readFileSync("/proc/" + pid + "/statm", "utf8").split(" ")[1]) * 4096;
const start = rss();
let fired;
if (when.file !== undefined) {
  const fd = fs.openSync(when.file, "r");
  const buf = Buffer.alloc(8);
  fired = () => (fs.readSync(fd, buf, 0, 8, when.offset), buf.readBigUInt64LE(0) !== 0n);
} else {
  fired = () => rss() - start >= when.rssGrowth;
}
let stopped = false;
while (Date.now() - t0 < timeoutMs) {
  if (fired()) {
    process.kill(pid, "SIGSTOP");
    stopped = true;
    break;
  }
}
parentPort.postMessage({ stopped, waitedMs: Date.now() - t0, rssGrowth: rss() - start });
`;

/**
 * Starts polling now; resolves once `pid` was stopped (or the poller gave up after `timeoutMs`). The caller
 * resumes it with SIGCONT.
 */
export function stopWhen(pid: number, when: StopWhen, timeoutMs = 30000): Promise<StopResult> {
  const w = new Worker(POLLER, { eval: true, workerData: { pid, when, timeoutMs } });
  return new Promise<StopResult>((resolve, reject) => {
    w.once("message", (m: StopResult) => resolve(m));
    w.once("error", reject);
  }).finally(() => void w.terminate());
}

/** The end of the last 4 KiB page of `file` holding a nonzero byte (0 when all of it is zero). */
export function writtenExtent(file: string): number {
  const buf = fs.readFileSync(file);
  const page = 4096;
  const zero = Buffer.alloc(page);
  for (let end = buf.length; end > 0; end -= page) {
    const start = Math.max(0, end - page);
    if (!buf.subarray(start, end).equals(zero.subarray(0, end - start))) return end;
  }
  return 0;
}

/** The engine's own pid, from its "listening on" line. */
export function enginePid(output: string): number {
  const m = /listening on .*pid (\d+)\)/.exec(output);
  if (!m) throw new Error(`no pid in the engine's output:\n${output}`);
  return Number(m[1]);
}
