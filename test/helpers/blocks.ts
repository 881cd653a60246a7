// Blocks for the engine tests: a namespace, shm regions as "layers", shard
// columns for a set of blocks, and waiting for a task.
import * as crypto from "crypto";
import { EngineClient } from "../../core/client";
import { ShmRegion, shardColumns } from "./fixtures";

export const NS = "jest-model_bf16_b16-tp1r0";
export const SHARD = 4096 + 512;
export const SHARDS_PER_BLOCK = 3;

export const key = (i: number, salt = "k") => crypto.createHash("sha256").update(`${salt}${i}`).digest();

/** One region per "layer"; block b of layer l is at b * SHARD. */
export async function regions(c: EngineClient, n: number, blocks: number, fill: "random" | "zero", track: ShmRegion[]) {
  const regs = Array.from({ length: n }, () => new ShmRegion(blocks * SHARD, fill));
  track.push(...regs);
  const r = await c.call("register", { regions: regs.map((x) => ({ medium: "host", source: x.name, size: x.size })) });
  return { regs, ids: r.regions as number[] };
}

export function shards(ids: number[], blocks: number[]) {
  return shardColumns(ids, SHARD, blocks);
}

export async function waitDone(c: EngineClient, task: number) {
  const r = await c.call("wait", { task, timeout_ms: 20000 });
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; failed: number[]; bytes: number; direction: string; errno: number[] };
}

/** Registers `layers` random regions of `blocks` blocks and dumps every block under a fresh key (not waiting). */
export async function dumpAll(c: EngineClient, layers: number, blocks: number, salt: string, track: ShmRegion[]) {
  const src = await regions(c, layers, blocks, "random", track);
  const keys = Array.from({ length: blocks }, (_, i) => key(i, salt));
  const d = await c.call("dump", {
    ns: NS,
    keys,
    shards: shards(
      src.ids,
      keys.map((_, i) => i),
    ),
  });
  return { src, keys, task: d.task as number };
}
