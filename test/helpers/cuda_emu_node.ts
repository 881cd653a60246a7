// A node of emulated GPUs for the tests of the engine's GPU path
// (cuda_emu*.test.ts): an engine over the emulated CUDA runtime, its KV
// caches as emulated device memory, and a dump and load of them.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../../core/client";
import { EmuDeviceMemory, EmuEvent, emuEnv } from "./cuda_emu";
import { RunningEngine, shortTmp, startEngine, writeConfig } from "./engine";
import { shardColumns } from "./fixtures";

export const GPU_A = "0000:01:00.0";
export const GPU_B = "0000:41:00.0";
export const NS = "emu-model-tp1r0";
export const SHARD = 16 * 1024 + 144; // not a multiple of 16: the kernel's byte path too
export const LAYERS = 2;
export const BLOCKS = 8;

export const key = (i: number, salt = "g") => crypto.createHash("sha256").update(`${salt}${i}`).digest();

export interface Node {
  dir: string;
  store: string;
  engine: RunningEngine;
  trace: string;
}

export async function startNode(
  busIds: string[],
  opts: Record<string, unknown> = {},
  extraEnv: Record<string, string> = {},
): Promise<Node> {
  const dir = shortTmp("ucmg-");
  const store = path.join(dir, "store");
  fs.mkdirSync(store);
  const trace = path.join(dir, "cuda-trace.txt");
  const cfg = writeConfig(dir, {
    storage_backends: store,
    transferStreamNumber: 4,
    endpoint: `ipc://${dir}/e.sock`,
    clientCheckMs: 100,
    pinnedStagingBytes: 8 << 20,
    maxQueueMs: 0,
    ...opts,
  });
  const engine = await startEngine(cfg, [], emuEnv(busIds, { UCM_CUDA_EMU_TRACE: trace, ...extraEnv }));
  return { dir, store, engine, trace };
}

export async function stopNode(n: Node | undefined): Promise<void> {
  if (!n) return;
  await n.engine.stop("SIGKILL");
  fs.rmSync(n.dir, { recursive: true, force: true });
}

/** One "layer" allocation per layer on the GPU `busId`; block b of a layer at b * SHARD. */
export function gpuCache(busId: string, fill?: "random"): EmuDeviceMemory[] {
  return Array.from({ length: LAYERS }, () => new EmuDeviceMemory(busId, BLOCKS * SHARD, fill));
}

export async function registerCache(c: EngineClient, cache: EmuDeviceMemory[], device: number, busId?: string): Promise<number[]> {
  const r = await c.call("register", {
    regions: cache.map((m) => ({
      medium: "cuda",
      device,
      ...(busId ? { pci_bus_id: busId } : {}),
      handle: m.handle(),
      offset: 0,
      size: m.size,
    })),
  });
  return r.regions as number[];
}

export async function waitDone(c: EngineClient, task: number, timeoutMs = 20000) {
  const r = await c.call("wait", { task, timeout_ms: timeoutMs });
  expect(r.done).toBe(true);
  return r as unknown as { status: string[]; failed: number[]; what?: string[] };
}

export function sameBlocks(dst: EmuDeviceMemory[], src: EmuDeviceMemory[], blocks: number[]): boolean {
  return blocks.every((b) => dst.every((d, l) => d.read(b * SHARD, SHARD).equals(src[l].read(b * SHARD, SHARD))));
}

export const all = Array.from({ length: BLOCKS }, (_, i) => i);
export const keys = (salt: string) => all.map((i) => key(i, salt));

/**
 * Registers a random source cache and a zeroed destination cache on the GPU `busId` (named as "device 0", as a
 * vLLM worker sees its GPU), dumps `blocks` with commit, loads them back into the same slots.
 */
export async function roundTrip(c: EngineClient, mem: Array<EmuDeviceMemory | EmuEvent>, busId: string, salt: string, blocks = all) {
  const src = gpuCache(busId, "random");
  const dst = gpuCache(busId);
  mem.push(...src, ...dst);
  const sids = await registerCache(c, src, 0, busId);
  const dids = await registerCache(c, dst, 0, busId);
  const ks = blocks.map((b) => key(b, salt));
  const d = await c.call("dump", { ns: NS, keys: ks, shards: shardColumns(sids, SHARD, blocks), commit: true });
  const dump = (await waitDone(c, d.task as number)).status;
  const l = await c.call("load", { ns: NS, keys: ks, shards: shardColumns(dids, SHARD, blocks) });
  const load = (await waitDone(c, l.task as number)).status;
  return { src, dst, dump, load, ok: new Array(blocks.length).fill("ok") };
}
