// Where blocks live on disk. Paths are built only from validated namespaces
// (a strict character set) and the hex of key bytes, so no request can name
// a path outside the storage directories.
//
//   <backend>/<ns>/<first 2 hex of key>/<key hex>      committed block
//   <backend>/<ns>/.tmp/<key hex>.<engine tag>.<seq>   uncommitted dump
//   <backend>/<ns>/NAMESPACE                           what the namespace is
//
// NAMESPACE holds the description its first user gave (the vLLM connector:
// model, ranks, the physical layout of every KV tensor). A later client that
// describes the namespace otherwise is refused (`conflict`): its blocks would
// not mean what that client expects, whatever their checksums say.
//
// The directories and NAMESPACE take space too (257 directories, about 1 MiB a
// namespace on ext4) and stay when every block is evicted: what this engine
// creates is reported to `onHolders` (the capacity ledger), and the native
// rescan (native/src/capacity.cc, Scan) counts the same set.
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { createFile, makeDirs } from "./native";
import { ProtocolError } from "./protocol";

/** A NAMESPACE file larger than this is not one the engine wrote: refused. */
const MAX_DESCRIPTION_FILE_BYTES = 1 << 20;

export class StorageLayout {
  private readonly ready = new Map<string, Promise<void>>();
  /** Namespaces whose NAMESPACE file this engine wrote or compared: the description, as canonical JSON. */
  private readonly described = new Map<string, Promise<string>>();
  private seq = 0;

  /**
   * `tag` names this engine in temporary files (host, pid, start time). The modes of what it makes are the
   * addon's (setShareWithGroup), which creates it.
   */
  constructor(
    readonly backends: readonly string[],
    readonly tag: string,
    /** Told the bytes of the directories and files this engine created in backend `backend`. */
    private readonly onHolders: (backend: number, bytes: number) => void = () => {},
  ) {}

  /** Which backend holds a key: FNV-1a over its bytes, so shards stay stable across engines. */
  backendFor(key: Buffer): string {
    return this.backends[this.backendIndex(key)];
  }

  backendIndex(key: Buffer): number {
    if (this.backends.length === 1) return 0;
    let h = 0x811c9dc5;
    for (const b of key) h = Math.imul(h ^ b, 0x01000193) >>> 0;
    return h % this.backends.length;
  }

  blockPath(ns: string, key: Buffer): string {
    const hex = key.toString("hex");
    return path.join(this.backendFor(key), ns, hex.slice(0, 2), hex);
  }

  tempPath(ns: string, key: Buffer): string {
    return path.join(tempDir(this.backendFor(key), ns), `${key.toString("hex")}.${this.tag}.${++this.seq}`);
  }

  /** 64-bit digest written into every block header of the namespace. */
  static layoutDigest(ns: string): bigint {
    return crypto.createHash("sha256").update(`ucm-layout:${ns}`).digest().readBigUInt64LE(0);
  }

  /** Creates the namespace's directories in every backend (once, off the event loop). */
  ensureNamespace(ns: string): Promise<void> {
    let p = this.ready.get(ns);
    if (!p) {
      p = this.create(ns);
      this.ready.set(ns, p);
      p.catch(() => this.ready.delete(ns));
    }
    return p;
  }

  /** Whether this engine has made sure of the namespace's directories (or is making sure). */
  known(ns: string): boolean {
    return this.ready.has(ns);
  }

  /** Forgets that a namespace's directories exist (someone removed them): the next dump recreates them. */
  forgetNamespace(ns: string): void {
    this.ready.delete(ns);
    this.described.delete(ns);
  }

  /**
   * Records what the namespace holds, or, when its NAMESPACE file exists (in any backend), checks that it says
   * the same: a client whose blocks would mean something else is refused with `conflict`, naming both.
   */
  async describeNamespace(ns: string, description: unknown): Promise<void> {
    const mine = canonicalJson(description);
    await this.ensureNamespace(ns);
    let p = this.described.get(ns);
    if (!p) {
      p = Promise.all(this.backends.map((b, index) => this.describeIn(b, index, ns, mine))).then(
        (all) => all.find((t) => t !== mine) ?? mine,
      );
      this.described.set(ns, p);
      p.catch(() => this.described.delete(ns));
    }
    const theirs = await p;
    if (theirs !== mine) {
      throw new ProtocolError(
        "conflict",
        `namespace ${ns} holds blocks described as ${theirs}, and this client describes its blocks as ${mine}: ` +
          "they would not mean the same, so this client may not use it",
      );
    }
  }

  /**
   * Writes backend `b`'s NAMESPACE file (the addon: exclusive create through the namespace directory's descriptor,
   * no link followed) or, when one is there, reads it (no link followed either).
   */
  private async describeIn(b: string, index: number, ns: string, mine: string): Promise<string> {
    const text = JSON.stringify({ namespace: ns, description: JSON.parse(mine) }, null, 2) + "\n";
    const made = await createFile(b, ns, "NAMESPACE", text);
    if (made > 0) {
      this.onHolders(index, made);
      return mine;
    }
    const file = path.join(b, ns, "NAMESPACE");
    let stored: unknown;
    const fh = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      const st = await fh.stat();
      if (!st.isFile() || st.size > MAX_DESCRIPTION_FILE_BYTES) {
        throw new ProtocolError("conflict", `${file} is not a NAMESPACE file the engine wrote (not a small regular file)`);
      }
      stored = (JSON.parse(await fh.readFile("utf8")) as { description?: unknown }).description;
    } catch (e) {
      if (e instanceof ProtocolError) throw e;
      throw new ProtocolError("conflict", `${file} cannot be read as a namespace description: ${(e as Error).message}`);
    } finally {
      await fh.close();
    }
    return canonicalJson(stored ?? null);
  }

  private async create(ns: string): Promise<void> {
    await Promise.all(
      this.backends.map(async (b, index) => {
        // Through descriptors (native/src/store_dirs.h): each directory is created, then opened without following
        // links and its mode set on that descriptor; an existing one must be a real directory of the engine's user.
        // A directory swapped for a link meanwhile sends no mode change, directory or description elsewhere.
        const madeRoot = (await makeDirs(b, "", [ns]))[0] > 0;
        // In eighths: the addon runs them on eight threads (round trips each on NFS).
        const parts = Array.from({ length: 8 }, (_, i) => FAN_OUT.slice(i * 32, (i + 1) * 32));
        parts[0] = [".tmp", ...parts[0]];
        const sizes = await Promise.all(parts.map((names) => makeDirs(b, ns, names)));
        let made = sizes.flat().reduce((a, x) => a + x, 0);
        // The namespace's own directory, measured once its 258 entries are in (it grows past one block on ext4).
        if (madeRoot) made += await allocated(path.join(b, ns));
        if (made > 0) this.onHolders(index, made);
      }),
    );
  }
}

/** JSON with every object's keys sorted: two descriptions that say the same are the same text. */
export function canonicalJson(v: unknown): string {
  const sorted = (x: unknown): unknown => {
    if (Array.isArray(x)) return x.map(sorted);
    if (x !== null && typeof x === "object") {
      return Object.fromEntries(
        Object.keys(x as object)
          .sort()
          .map((k) => [k, sorted((x as Record<string, unknown>)[k])]),
      );
    }
    return x;
  };
  return JSON.stringify(sorted(v === undefined ? null : v));
}

/** The 256 fan-out directories of a namespace: the first byte of a key, in hex. */
const FAN_OUT = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** What a directory or small file takes on the filesystem (its allocated blocks), as the native rescan counts it. */
async function allocated(p: string): Promise<number> {
  return (await fs.promises.lstat(p)).blocks * 512;
}

// ---- temporary files: <key hex>.<engine tag>.<seq>, engine tag = <host>-<pid>-<start> ----

/** A namespace's directory of uncommitted dumps. */
export function tempDir(backend: string, ns: string): string {
  return path.join(backend, ns, ".tmp");
}

/** This host's part of an engine tag, safe in a file name. */
export function hostTag(): string {
  return os.hostname().replace(/[^A-Za-z0-9-]/g, "_");
}

/** A new engine's tag: its host, pid and start time (what parseTempName reads back). */
export function engineTag(): string {
  return `${hostTag()}-${process.pid}-${Date.now().toString(36)}`;
}

interface Writer {
  host: string;
  pid: number;
}

/** The writer a temporary file names (host and pid), or undefined when the name is not one of ours. */
export function parseTempName(name: string): Writer | undefined {
  const parts = name.split(".");
  if (parts.length !== 3) return undefined;
  const tag = parts[1].split("-");
  if (tag.length < 3) return undefined;
  const pid = Number(tag[tag.length - 2]);
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  return { host: tag.slice(0, -2).join("-"), pid };
}
