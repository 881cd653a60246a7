// The test side of the emulated CUDA runtime (native/cuda_emu): "device
// memory" and interprocess events as the emulated runtime reads them, and the
// engine addon built against it. This stands in for a GPU and its driver
// only; the engine code under test is the production code.
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";

export const EMU_ADDON = path.resolve(__dirname, "../../native/build-emu/Release/ucm_native.node");

/** Builds the addon against the emulated runtime (once; cmake skips what is up to date). */
export function buildEmuAddon(out = path.resolve(__dirname, "../../native/build-emu"), cudartVersion?: number): string {
  const cmakeJs = require.resolve("cmake-js/bin/cmake-js");
  const env: NodeJS.ProcessEnv = { ...process.env, UCM_CUDA_EMU: "1" };
  if (cudartVersion) env.UCM_EMU_CUDART_VERSION = String(cudartVersion);
  const r = spawnSync(process.execPath, [cmakeJs, "compile", "--directory", path.resolve(__dirname, "../../native"), "--out", out], {
    env,
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`building the emulated-CUDA addon failed:\n${r.stdout}\n${r.stderr}`);
  return path.join(out, "Release", "ucm_native.node");
}

function shmFile(name: string): string {
  return path.join("/dev/shm", name.slice(1));
}

function handle(magic: string, busId: string, name: string): Buffer {
  const h = Buffer.alloc(64);
  h.write(magic, 0, "latin1");
  h.write(busId, 8, 16, "latin1");
  h.write(name, 24, 40, "latin1");
  return h;
}

/** One emulated cudaMalloc allocation on the GPU with `busId`: a shared memory object. */
export class EmuDeviceMemory {
  readonly name = `/ucmemu-${process.pid}-${crypto.randomBytes(5).toString("hex")}`;
  constructor(
    readonly busId: string,
    readonly size: number,
    fill?: "random",
  ) {
    const fd = fs.openSync(shmFile(this.name), "w+", 0o600);
    fs.ftruncateSync(fd, size);
    if (fill === "random") fs.writeSync(fd, crypto.randomBytes(size), 0, size, 0);
    fs.closeSync(fd);
  }
  /** The cudaIpcMemHandle_t the emulated runtime opens. */
  handle(): Buffer {
    return handle("UCMEMU-M", this.busId, this.name);
  }
  read(offset = 0, length = this.size): Buffer {
    const fd = fs.openSync(shmFile(this.name), "r");
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    fs.closeSync(fd);
    return b;
  }
  write(offset: number, data: Buffer): void {
    const fd = fs.openSync(shmFile(this.name), "r+");
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.closeSync(fd);
  }
  free(): void {
    fs.rmSync(shmFile(this.name), { force: true });
  }
}

/** An interprocess event: {recorded, completed} counters in shared memory. */
export class EmuEvent {
  readonly name = `/ucmemuev-${process.pid}-${crypto.randomBytes(5).toString("hex")}`;
  constructor(readonly busId: string) {
    fs.writeFileSync(shmFile(this.name), Buffer.alloc(16), { mode: 0o600 });
  }
  handle(): Buffer {
    return handle("UCMEMU-E", this.busId, this.name);
  }
  private counters(): [bigint, bigint] {
    const b = fs.readFileSync(shmFile(this.name));
    return [b.readBigUInt64LE(0), b.readBigUInt64LE(8)];
  }
  private set(recorded: bigint, completed: bigint): void {
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(recorded, 0);
    b.writeBigUInt64LE(completed, 8);
    const fd = fs.openSync(shmFile(this.name), "r+");
    fs.writeSync(fd, b, 0, 16, 0);
    fs.closeSync(fd);
  }
  /** cudaEventRecord: queued work the event completes after. */
  record(): void {
    const [r, c] = this.counters();
    this.set(r + 1n, c);
  }
  /** The GPU reached the last record. */
  complete(): void {
    const [r] = this.counters();
    this.set(r, r);
  }
  free(): void {
    fs.rmSync(shmFile(this.name), { force: true });
  }
}

/** Environment of an engine on an emulated node with these GPUs. */
export function emuEnv(busIds: string[], extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, UCM_NATIVE_ADDON: EMU_ADDON, UCM_CUDA_EMU_DEVICES: busIds.join(","), ...extra };
  delete env.CUDA_VISIBLE_DEVICES;
  for (const [k, v] of Object.entries(extra)) if (v === "") delete env[k];
  return env;
}

/** CPU seconds (user + system) a process has used so far. */
export function cpuSeconds(pid: number): number {
  const f = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}
