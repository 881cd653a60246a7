// A real slow disk: an ext4 file system on a loop device whose reads and
// writes the cgroup v1 blkio controller throttles for the processes put in
// its cgroup. Tests use it to hold an engine's transfers in flight for as
// long as they need (a dump still running when it is waited on, cancelled or
// killed; a load still reading when it is cancelled) instead of hoping that
// a big task is still running on a fast machine. Needs root, losetup,
// mkfs.ext4 and /sys/fs/cgroup/blkio; `slowDiskMissing` says what is missing
// (the tests that need it are skipped, and named as skipped, without it).
import { execFileSync, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { diskTempDir } from "./fixtures";

const BLKIO = "/sys/fs/cgroup/blkio";

function missing(): string | null {
  if (process.getuid?.() !== 0) return "not root";
  if (!fs.existsSync(`${BLKIO}/cgroup.procs`)) return `no cgroup v1 blkio controller at ${BLKIO}`;
  if (spawnSync("sh", ["-c", "command -v losetup && command -v mkfs.ext4"]).status !== 0) return "no losetup or mkfs.ext4";
  return null;
}

/** Why this machine cannot make a slow disk, or null when it can. */
export const slowDiskMissing = missing();

/** Bytes or I/Os per second; 0 lifts the limit. */
export interface Throttle {
  readBps?: number;
  writeBps?: number;
  readIops?: number;
  writeIops?: number;
}

export class SlowDisk {
  readonly mnt: string;
  private readonly base: string;
  private readonly loop: string;
  private readonly cgroup: string;
  private readonly dev: string;
  /** Each admitted process and the blkio cgroup it came from, to go back to at close. */
  private readonly admitted = new Map<number, string>();

  /** A fresh ext4 of `mib` MiB, mounted, with a cgroup of its own (no limits yet). */
  constructor(mib = 128) {
    this.base = diskTempDir("slow-");
    const img = path.join(this.base, "disk.img");
    this.mnt = path.join(this.base, "mnt");
    fs.mkdirSync(this.mnt);
    execFileSync("truncate", ["-s", `${mib}M`, img]);
    this.loop = execFileSync("losetup", ["-f", "--show", img], { encoding: "utf8" }).trim();
    this.cgroup = `${BLKIO}/ucm-test-${process.pid}-${crypto.randomBytes(3).toString("hex")}`;
    try {
      execFileSync("mkfs.ext4", ["-q", this.loop]);
      execFileSync("mount", [this.loop, this.mnt]);
      fs.chmodSync(this.mnt, 0o755);
      fs.mkdirSync(this.cgroup);
    } catch (e) {
      this.close();
      throw e;
    }
    const rdev = fs.statSync(this.loop).rdev;
    this.dev = `${Math.floor(rdev / 256) & 0xfff}:${(rdev & 0xff) | ((rdev >> 12) & 0xfff00)}`;
  }

  /** Puts a process (an engine, or this one for the addon in process) under this disk's limits. */
  admit(pid: number): void {
    const line = fs
      .readFileSync(`/proc/${pid}/cgroup`, "utf8")
      .split("\n")
      .find((l) => /^\d+:([^:]*,)?blkio(,[^:]*)?:/.test(l));
    this.admitted.set(pid, line ? line.slice(line.lastIndexOf(":") + 1) : "/");
    fs.writeFileSync(`${this.cgroup}/cgroup.procs`, String(pid));
  }

  /** Sets the limits named (the others stay as they are); they apply to the next I/O at once. */
  throttle(t: Throttle): void {
    const files: Array<[keyof Throttle, string]> = [
      ["readBps", "read_bps_device"],
      ["writeBps", "write_bps_device"],
      ["readIops", "read_iops_device"],
      ["writeIops", "write_iops_device"],
    ];
    for (const [k, f] of files) {
      const v = t[k];
      if (v !== undefined) fs.writeFileSync(`${this.cgroup}/blkio.throttle.${f}`, `${this.dev} ${v}`);
    }
  }

  /** Lifts the limits, unmounts and removes everything (processes still in the cgroup go back where they came from). */
  close(): void {
    if (fs.existsSync(this.cgroup)) {
      this.throttle({ readBps: 0, writeBps: 0, readIops: 0, writeIops: 0 });
      for (const pid of fs.readFileSync(`${this.cgroup}/cgroup.procs`, "utf8").split("\n").filter(Boolean)) {
        const home = path.join(BLKIO, this.admitted.get(Number(pid)) ?? "/");
        try {
          fs.writeFileSync(`${fs.existsSync(home) ? home : BLKIO}/cgroup.procs`, pid);
        } catch {
          // gone meanwhile
        }
      }
      spawnSync("rmdir", [this.cgroup]);
    }
    spawnSync("umount", ["-l", this.mnt]);
    spawnSync("losetup", ["-d", this.loop]);
    fs.rmSync(this.base, { recursive: true, force: true });
  }
}

/** `test` where a slow disk can be made, otherwise a skipped test (its title says why). */
export function slowDiskTest(title: string, fn: () => Promise<void>, timeoutMs?: number): void {
  if (slowDiskMissing) test.skip(`${title} [needs a throttled disk: ${slowDiskMissing}]`, fn, timeoutMs);
  else test(title, fn, timeoutMs);
}
