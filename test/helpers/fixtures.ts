// Real shared memory, real temporary directories and a look at a store's
// files, for the jest tests and the NFS suite alike (test/nfs compiles this
// file along with its own, so it may import only Node's modules).
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";

/** A POSIX shared memory object, created as the shim would: /dev/shm/<name>. */
export class ShmRegion {
  readonly name: string;
  readonly file: string;
  /** `prefix` starts the object's name (the NFS suite's are ucm-nfs-...). */
  constructor(
    readonly size: number,
    fill?: "random" | "zero",
    prefix = "ucm-test",
  ) {
    this.name = `/${prefix}-${process.pid}-${crypto.randomBytes(6).toString("hex")}`;
    this.file = path.join("/dev/shm", this.name.slice(1));
    const fd = fs.openSync(this.file, "w+", 0o600);
    fs.ftruncateSync(fd, size);
    if (fill === "random") {
      const chunk = 1 << 20;
      for (let off = 0; off < size; off += chunk) {
        fs.writeSync(fd, crypto.randomBytes(Math.min(chunk, size - off)), 0, Math.min(chunk, size - off), off);
      }
    }
    fs.closeSync(fd);
  }
  read(offset = 0, length = this.size): Buffer {
    const fd = fs.openSync(this.file, "r");
    const buf = Buffer.alloc(length);
    fs.readSync(fd, buf, 0, length, offset);
    fs.closeSync(fd);
    return buf;
  }
  write(offset: number, data: Buffer): void {
    const fd = fs.openSync(this.file, "r+");
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.closeSync(fd);
  }
  zero(): void {
    fs.truncateSync(this.file, 0);
    fs.truncateSync(this.file, this.size);
  }
  unlink(): void {
    fs.rmSync(this.file, { force: true });
  }
}

export function tempDir(prefix = "ucm-test-"): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A directory on a real disk (not tmpfs), for O_DIRECT tests. */
export function diskTempDir(prefix = "ucm-disk-"): string {
  const base = path.resolve(__dirname, "../../.test-tmp");
  fs.mkdirSync(base, { recursive: true });
  return fs.mkdtempSync(path.join(base, prefix));
}

/**
 * The shard columns of a dump/load request: block i is slot `slots[i]` of
 * every region in `ids` (one shard of `shard` bytes per region, like one per
 * layer), in region order.
 */
export function shardColumns(ids: number[], shard: number, slots: number[]) {
  const region: number[] = [];
  const offset: number[] = [];
  const length: number[] = [];
  for (const s of slots) {
    for (const id of ids) {
      region.push(id);
      offset.push(s * shard);
      length.push(shard);
    }
  }
  return { count: ids.length, region, offset, length };
}

/**
 * What lies under a store directory (`store/<namespace>/<xx>/<block>`), as the
 * capacity ledger counts it: `bytes` is the sizes of block and temporary files
 * plus `holders`, what holds them (namespace, fan-out and .tmp directories and
 * NAMESPACE, by allocated blocks: native/src/capacity.cc counts the same);
 * the engines' own bookkeeping (.ucm) is left out. Also the number of
 * committed block files and of temporary files (in a namespace's .tmp). Files
 * and directories removed while it walks are skipped.
 */
export function storeUsage(store: string): { bytes: number; holders: number; blocks: number; temps: number } {
  let files = 0;
  let holders = 0;
  let blocks = 0;
  let temps = 0;
  const walk = (d: string, depth: number) => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (depth === 0 && e.name.startsWith(".")) continue;
      const p = path.join(d, e.name);
      try {
        const st = fs.lstatSync(p);
        if (e.isDirectory()) {
          if (depth <= 1) holders += st.blocks * 512;
          walk(p, depth + 1);
        } else if (e.isFile()) {
          if (depth === 1) {
            holders += st.blocks * 512; // NAMESPACE
          } else {
            files += st.size;
          }
          if (d.endsWith("/.tmp")) temps++;
          else if (depth === 2 && !e.name.startsWith(".")) blocks++;
        }
      } catch {
        // removed while walking
      }
    }
  };
  walk(store, 0);
  return { bytes: files + holders, holders, blocks, temps };
}
