// Engines over shared-memory "layers" for the capacity, admission and
// operator-tool tests: each file calls stopEnginesAfterEach() once; engine()
// and register() track what they start so it is stopped and unlinked.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../../core/client";
import { ShmRegion, shardColumns } from "./fixtures";
import { RunningEngine, startEngine, writeConfig } from "./engine";

export const NS = "cap-ns";
export const MiB = 2 ** 20;

export const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}:${i}`).digest();

export interface Mem {
  regs: ShmRegion[];
  ids: number[];
  shard: number;
}

const shm: ShmRegion[] = [];
/** The engines engine() started and not yet stopped (a test may stop them itself and empty this). */
export const engines: RunningEngine[] = [];

/** Stops every engine and unlinks every region of the test that just ran. */
export function stopEnginesAfterEach(): void {
  afterEach(async () => {
    await Promise.all(engines.splice(0).map((e) => e.stop()));
    for (const r of shm.splice(0)) r.unlink();
  });
}

export async function register(c: EngineClient, regions: number, slots: number, shard: number, fill: "random" | "zero"): Promise<Mem> {
  const regs = Array.from({ length: regions }, () => new ShmRegion(slots * shard, fill));
  shm.push(...regs);
  const r = await c.call("register", { regions: regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) });
  return { regs, ids: r.regions as number[], shard };
}

/** Block i is slot slots[i] of every region of `m`. */
export function shards(m: Mem, slots: number[]) {
  return shardColumns(m.ids, m.shard, slots);
}

export async function finish(c: EngineClient, task: unknown, timeoutMs = 60000) {
  const r = await c.call("wait", { task, timeout_ms: timeoutMs }, timeoutMs + 5000);
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; failed: number[] };
}

export async function engine(dir: string, name: string, cfg: Record<string, unknown>): Promise<RunningEngine> {
  const e = await startEngine(writeConfig(dir, { endpoint: `ipc://${dir}/${name}.sock`, ...cfg }, `${name}.yaml`));
  engines.push(e);
  return e;
}

export function ledger(store: string): { bytes: number; files: number } {
  const [, , b, f] = fs
    .readFileSync(path.join(store, ".ucm", "usage"), "utf8")
    .trim()
    .split(" ");
  return { bytes: Number(b), files: Number(f) };
}
