// Wire protocol version 1 (docs/PROTOCOL.md): message framing, error codes and
// the field validators that turn untrusted msgpack into typed values (each
// op's request is assembled from them in requests.ts). Nothing here trusts a
// length, a type or an index it did not check.
import { Packr } from "msgpackr";

export const PROTOCOL_VERSIONS: readonly number[] = [1];
export const MAX_KEY_BYTES = 64;
export const MAX_SHARDS_PER_REQUEST = 4 * 1024 * 1024;
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export type ErrorCode =
  | "bad_message"
  | "unknown_op"
  | "no_session"
  | "unsupported_version"
  | "unknown_task"
  | "unknown_region"
  | "out_of_bounds"
  | "too_large"
  | "busy"
  | "shutting_down"
  | "unsupported"
  | "expired"
  | "conflict"
  | "internal";

/** An error that becomes an `ok: false` reply with this code. */
export class ProtocolError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = "ProtocolError";
  }
}

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: "number", largeBigIntToFloat: false });

export function encode(value: unknown): Buffer {
  return packr.pack(value);
}

/** Decodes one request frame; anything that is not a msgpack map is bad_message. */
export function decodeRequest(frame: Buffer): { id: unknown; msg: Record<string, unknown> } {
  let v: unknown;
  try {
    v = packr.unpack(frame);
  } catch (e) {
    throw new ProtocolError("bad_message", `message is not valid msgpack: ${(e as Error).message}`);
  }
  if (v === null || typeof v !== "object" || Array.isArray(v) || v instanceof Uint8Array) {
    throw new ProtocolError("bad_message", `message must be a msgpack map, got ${describe(v)}`);
  }
  const msg = v as Record<string, unknown>;
  return { id: Object.hasOwn(msg, "id") ? msg.id : null, msg };
}

export function describe(v: unknown): string {
  if (v === null) return "nil";
  if (v === undefined) return "nothing";
  if (v instanceof Uint8Array) return `bin of ${v.length} bytes`;
  if (Array.isArray(v)) return `array of ${v.length}`;
  if (typeof v === "string") return v.length > 40 ? `string ${JSON.stringify(v.slice(0, 40))}...` : `string ${JSON.stringify(v)}`;
  if (typeof v === "object") return "map";
  return `${typeof v} ${String(v)}`;
}

function field(msg: Record<string, unknown>, name: string): unknown {
  return Object.hasOwn(msg, name) ? msg[name] : undefined;
}

export function reqUint(msg: Record<string, unknown>, name: string, max = Number.MAX_SAFE_INTEGER): number {
  const v = field(msg, name);
  return toUint(v, name, max);
}

export function optUint(msg: Record<string, unknown>, name: string, dflt: number, max = Number.MAX_SAFE_INTEGER): number {
  const v = field(msg, name);
  return v === undefined || v === null ? dflt : toUint(v, name, max);
}

export function toUint(v: unknown, name: string, max = Number.MAX_SAFE_INTEGER): number {
  const n = typeof v === "bigint" && v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= 0n ? Number(v) : v;
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0) {
    throw new ProtocolError("bad_message", `${name} must be a non-negative integer, got ${describe(v)}`);
  }
  if (n > max) throw new ProtocolError("bad_message", `${name} must be at most ${max}, got ${n}`);
  return n;
}

export function optBool(msg: Record<string, unknown>, name: string, dflt: boolean): boolean {
  const v = field(msg, name);
  if (v === undefined || v === null) return dflt;
  if (typeof v !== "boolean") throw new ProtocolError("bad_message", `${name} must be a boolean, got ${describe(v)}`);
  return v;
}

export function optString(msg: Record<string, unknown>, name: string, maxLen: number): string | undefined {
  const v = field(msg, name);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string" || v.length > maxLen) {
    throw new ProtocolError("bad_message", `${name} must be a string of at most ${maxLen} characters, got ${describe(v)}`);
  }
  return v;
}

export function reqOp(msg: Record<string, unknown>): string {
  const v = field(msg, "op");
  if (typeof v !== "string") throw new ProtocolError("bad_message", `op must be a string, got ${describe(v)}`);
  return v;
}

const NS_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

function toNs(v: unknown, name: string): string {
  if (typeof v !== "string" || !NS_RE.test(v)) {
    throw new ProtocolError(
      "bad_message",
      `${name} must be 1 to 128 characters of [A-Za-z0-9._-], not starting with '.', got ${describe(v)}`,
    );
  }
  return v;
}

export function reqNs(msg: Record<string, unknown>): string {
  return toNs(field(msg, "ns"), "ns");
}

/** ns, or a non-empty list of them (lookup across TP ranks). */
export function reqNsList(msg: Record<string, unknown>): string[] {
  const v = field(msg, "ns");
  if (Array.isArray(v)) {
    if (v.length === 0 || v.length > 1024)
      throw new ProtocolError("bad_message", `ns list must hold 1 to 1024 namespaces, got ${v.length}`);
    return v.map((x, i) => toNs(x, `ns[${i}]`));
  }
  return [toNs(v, "ns")];
}

export function reqKeys(msg: Record<string, unknown>, maxKeys: number, name = "keys"): Buffer[] {
  const v = field(msg, name);
  if (!Array.isArray(v)) throw new ProtocolError("bad_message", `${name} must be an array of bin, got ${describe(v)}`);
  if (v.length > maxKeys)
    throw new ProtocolError("too_large", `${name} holds ${v.length} keys, more than the ${maxKeys} allowed per request`);
  return v.map((k, i) => {
    if (!(k instanceof Uint8Array)) throw new ProtocolError("bad_message", `${name}[${i}] must be bin, got ${describe(k)}`);
    if (k.length < 1 || k.length > MAX_KEY_BYTES) {
      throw new ProtocolError("bad_message", `${name}[${i}] must be 1 to ${MAX_KEY_BYTES} bytes, got ${k.length}`);
    }
    return Buffer.isBuffer(k) ? k : Buffer.from(k.buffer, k.byteOffset, k.length);
  });
}

export interface ShardArrays {
  count: number;
  region: Uint32Array;
  offset: BigUint64Array;
  length: BigUint64Array;
}

/**
 * The shards of a dump or load: `count` per block, as little-endian bin (what the shim sends: taken as they are,
 * one copy into aligned memory) or as arrays of integers.
 */
export function reqShards(msg: Record<string, unknown>, nkeys: number): ShardArrays {
  const v = field(msg, "shards");
  if (v === null || typeof v !== "object" || Array.isArray(v) || v instanceof Uint8Array) {
    throw new ProtocolError("bad_message", `shards must be a map with count, region, offset and length, got ${describe(v)}`);
  }
  const s = v as Record<string, unknown>;
  const count = toUint(field(s, "count"), "shards.count");
  if (count < 1) throw new ProtocolError("bad_message", `shards.count must be at least 1, got ${count}`);
  const total = count * nkeys;
  if (total > MAX_SHARDS_PER_REQUEST) {
    throw new ProtocolError("too_large", `request names ${total} shards, more than ${MAX_SHARDS_PER_REQUEST}`);
  }
  return {
    count,
    region: uintColumn(field(s, "region"), "shards.region", new Uint32Array(total)),
    offset: uintColumn(field(s, "offset"), "shards.offset", new BigUint64Array(total)),
    length: uintColumn(field(s, "length"), "shards.length", new BigUint64Array(total)),
  };
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Fills `out` from a column given as little-endian bin or as an array of integers. */
function uintColumn<T extends Uint32Array | BigUint64Array>(v: unknown, name: string, out: T): T {
  const n = out.length;
  const width = out.BYTES_PER_ELEMENT;
  if (v instanceof Uint8Array) {
    if (v.length !== n * width) {
      throw new ProtocolError("bad_message", `${name} as bin must be ${n * width} bytes (${n} x uint${width * 8} LE), got ${v.length}`);
    }
    if (LITTLE_ENDIAN) {
      new Uint8Array(out.buffer).set(v);
    } else {
      const dv = new DataView(v.buffer, v.byteOffset, v.length);
      for (let i = 0; i < n; i++) {
        if (out instanceof BigUint64Array) out[i] = dv.getBigUint64(i * 8, true);
        else out[i] = dv.getUint32(i * 4, true);
      }
    }
    return out;
  }
  if (!Array.isArray(v)) throw new ProtocolError("bad_message", `${name} must be an array of integers or bin, got ${describe(v)}`);
  if (v.length !== n) throw new ProtocolError("bad_message", `${name} must hold ${n} entries (keys x shards.count), got ${v.length}`);
  const max = width === 4 ? 0xffff_ffff : Number.MAX_SAFE_INTEGER;
  for (let i = 0; i < n; i++) {
    const x = v[i];
    if (typeof x !== "number" || !Number.isInteger(x) || x < 0 || x > max) {
      throw new ProtocolError("bad_message", `${name}[${i}] must be an integer in [0, ${max}], got ${describe(x)}`);
    }
    if (out instanceof BigUint64Array) out[i] = BigInt(x);
    else out[i] = x;
  }
  return out;
}

/** Per-block result names on the wire. */
export type WireStatus = "ok" | "skipped" | "not_found" | "corrupt" | "mismatch" | "io_error" | "cancelled" | "dropped";

/**
 * A dump's or load's `deadline_unix_ms` (absolute, the node's clock): after it the client may reuse the memory
 * the request names, so the engine must not start reading or writing it. Undefined when the request has none;
 * `expired` when it has passed already.
 */
export function reqDeadline(msg: Record<string, unknown>): number | undefined {
  if (msg.deadline_unix_ms === undefined || msg.deadline_unix_ms === null) return undefined;
  const at = toUint(msg.deadline_unix_ms, "deadline_unix_ms");
  const now = Date.now();
  if (at <= now) throw new ProtocolError("expired", `deadline_unix_ms ${at} has passed (engine clock ${now}); nothing was done`);
  return at;
}
