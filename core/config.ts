// The engine's configuration: the seed's YAML (single connector or list
// form), read and validated in one place against the table of options
// (options.ts). Every error names the key path and the value it got.
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parse as parseYaml } from "yaml";
import { LOG_LEVELS, LogLevel } from "./log";
import { EngineConfig, OPTIONS, parseSize } from "./options";

export const CONNECTOR_NAME = "UcmNfsStore";

export { OPTIONS, parseSize };
export type { EngineConfig };

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

function show(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

/**
 * The runtime directory for a storage_backends string: only this user may enter it. Named after the backends as
 * absolute paths (relative ones resolved against the working directory, as the engine resolves them), so a
 * relative path used from two directories names two stores and two engines, never one engine for both.
 * python_shim/ucm/config.py runtime_dir computes the same name.
 */
export function defaultRuntimeDir(storageBackendsRaw: string): string {
  const absolute = storageBackendsRaw
    .split(":")
    .map((d) => path.resolve(d.trim()))
    .join(":");
  const digest = crypto.createHash("sha256").update(absolute).digest("hex").slice(0, 12);
  return path.join(runtimeBase(), digest);
}

/**
 * Where this user's runtime directories live: $XDG_RUNTIME_DIR/ucm when XDG_RUNTIME_DIR names a usable directory
 * (a real directory of this user that nobody else may enter, as systemd's /run/user/<uid> is: nobody else can make
 * anything there first), else /tmp/ucm-<uid>, which another user could create before this one's first run (the
 * engine and the shim then refuse it and say so). python_shim/ucm/config.py runtime_base is the same.
 */
export function runtimeBase(): string {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg && path.isAbsolute(xdg)) {
    try {
      const st = fs.lstatSync(xdg);
      if (st.isDirectory() && st.uid === uid && (st.mode & 0o077) === 0) return path.join(xdg, "ucm");
    } catch {
      /* not usable: the fallback */
    }
  }
  return path.join(os.tmpdir(), `ucm-${uid}`);
}

export function defaultEndpoint(storageBackendsRaw: string): string {
  return `ipc://${path.join(defaultRuntimeDir(storageBackendsRaw), "engine.sock")}`;
}

export interface LoadedConfig {
  config: EngineConfig;
  warnings: string[];
}

export function loadConfigFile(file: string): LoadedConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read config file ${show(file)}: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new ConfigError(`config file ${show(file)} is not valid YAML: ${(e as Error).message}`);
  }
  return parseConfig(doc);
}

/** Validates a parsed config document (the seed's format or the list form). */
export function parseConfig(doc: unknown): LoadedConfig {
  const warnings: string[] = [];
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new ConfigError(`config must be a mapping with ucm_connector_name and ucm_connector_config, got ${show(doc)}`);
  }
  const top = doc as Record<string, unknown>;
  let connector: Record<string, unknown>;
  let where: string;
  if ("ucm_connectors" in top) {
    const list = top.ucm_connectors;
    if (!Array.isArray(list) || list.length === 0) throw new ConfigError(`ucm_connectors must be a non-empty list, got ${show(list)}`);
    const idx = list.findIndex((c) => c && typeof c === "object" && (c as Record<string, unknown>).ucm_connector_name === CONNECTOR_NAME);
    if (idx < 0) {
      const names = list.map((c) => (c && typeof c === "object" ? (c as Record<string, unknown>).ucm_connector_name : c));
      throw new ConfigError(`ucm_connectors has no entry with ucm_connector_name ${show(CONNECTOR_NAME)}; names found: ${show(names)}`);
    }
    connector = list[idx] as Record<string, unknown>;
    where = `ucm_connectors[${idx}]`;
    for (const k of Object.keys(top)) if (k !== "ucm_connectors") warnings.push(`unknown key ${k} ignored`);
  } else {
    connector = top;
    where = "";
  }
  const at = (k: string) => (where ? `${where}.${k}` : k);
  for (const k of Object.keys(connector)) {
    if (k !== "ucm_connector_name" && k !== "ucm_connector_config" && !(where === "" && k === "ucm_connectors"))
      warnings.push(`unknown key ${at(k)} ignored`);
  }
  const name = connector.ucm_connector_name;
  if (name !== CONNECTOR_NAME) throw new ConfigError(`${at("ucm_connector_name")} must be ${show(CONNECTOR_NAME)}, got ${show(name)}`);
  const cc = connector.ucm_connector_config;
  if (cc === null || typeof cc !== "object" || Array.isArray(cc)) {
    throw new ConfigError(`${at("ucm_connector_config")} must be a mapping, got ${show(cc)}`);
  }
  const raw = cc as Record<string, unknown>;
  const key = (k: string) => `${at("ucm_connector_config")}.${k}`;

  const sb = raw.storage_backends;
  if (typeof sb !== "string" || sb.trim() === "") {
    throw new ConfigError(`${key("storage_backends")} is required: a directory, or several separated by ':', got ${show(sb)}`);
  }
  const dirs = sb.split(":").map((d) => d.trim());
  dirs.forEach((d, i) => {
    if (d === "") throw new ConfigError(`${key("storage_backends")} has an empty directory at position ${i} in ${show(sb)}`);
    let st: fs.Stats;
    try {
      st = fs.statSync(d);
    } catch {
      throw new ConfigError(`${key("storage_backends")}: directory ${show(d)} does not exist`);
    }
    if (!st.isDirectory()) throw new ConfigError(`${key("storage_backends")}: ${show(d)} is not a directory`);
    // Create and remove a probe: the permission bits alone do not tell (root,
    // read-only mounts, NFS root squash).
    try {
      fs.rmdirSync(fs.mkdtempSync(path.join(d, ".ucm-probe-")));
    } catch (e) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} is not writable (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
      );
    }
  });
  const resolved = dirs.map((d) => path.resolve(d));
  if (new Set(resolved).size !== resolved.length) throw new ConfigError(`${key("storage_backends")} names a directory twice: ${show(sb)}`);

  const out: Record<string, unknown> = {};
  for (const [k, spec] of Object.entries(OPTIONS)) {
    const v = raw[k];
    if (v === undefined || v === null) {
      out[spec.key] = spec.dflt;
      continue;
    }
    switch (spec.kind) {
      case "int":
        if (typeof v !== "number" || !Number.isInteger(v)) throw new ConfigError(`${key(k)} must be an integer, got ${show(v)}`);
        if (v < (spec.min ?? -Infinity) || v > (spec.max ?? Infinity)) {
          throw new ConfigError(`${key(k)} must be between ${spec.min} and ${spec.max}, got ${show(v)}`);
        }
        break;
      case "bool":
        if (typeof v !== "boolean") throw new ConfigError(`${key(k)} must be true or false, got ${show(v)}`);
        break;
      case "string":
        if (typeof v !== "string") throw new ConfigError(`${key(k)} must be a string, got ${show(v)}`);
        break;
      case "size": {
        const n = parseSize(v);
        if (n === undefined) throw new ConfigError(`${key(k)} must be a size in bytes such as 4GiB or 500MB, got ${show(v)}`);
        if (n < (spec.min ?? 0) || n > (spec.max ?? Infinity)) {
          throw new ConfigError(`${key(k)} must be between ${spec.min} and ${spec.max} bytes, got ${show(v)} (${n})`);
        }
        out[spec.key] = n;
        continue;
      }
      case "sizes": {
        const list = Array.isArray(v) ? v : [v];
        const sizes = list.map((x, i) => {
          const n = parseSize(x);
          const at = Array.isArray(v) ? `${key(k)}[${i}]` : key(k);
          if (n === undefined) throw new ConfigError(`${at} must be a size in bytes such as 500GiB, or 0 for unlimited, got ${show(x)}`);
          return n;
        });
        out[spec.key] = sizes;
        continue;
      }
      case "level":
        if (typeof v !== "string" || !LOG_LEVELS.includes(v as LogLevel)) {
          throw new ConfigError(`${key(k)} must be one of ${LOG_LEVELS.join(", ")}, got ${show(v)}`);
        }
        break;
    }
    out[spec.key] = v;
  }
  for (const k of Object.keys(raw)) {
    if (k !== "storage_backends" && !(k in OPTIONS)) warnings.push(`unknown key ${key(k)} ignored`);
  }
  const ms = out.metricsSocket as string;
  if (ms !== "" && (!path.isAbsolute(ms) || Buffer.byteLength(ms) > 107))
    throw new ConfigError(`${key("metricsSocket")} must be an absolute path of at most 107 bytes, got ${show(ms)}`);
  if (out.cudaCopy !== "kernel" && out.cudaCopy !== "batch")
    throw new ConfigError(`${key("cudaCopy")} must be "kernel" or "batch", got ${show(out.cudaCopy)}`);
  if ((out.healthFailureThreshold as number) > (out.healthWindowSize as number))
    throw new ConfigError(
      `${key("healthFailureThreshold")} must be at most healthWindowSize (${String(out.healthWindowSize)}), got ${show(out.healthFailureThreshold)}`,
    );
  if ((out.healthCheckTimeoutS as number) >= (out.healthCheckIntervalS as number))
    throw new ConfigError(
      `${key("healthCheckTimeoutS")} must be less than healthCheckIntervalS (${String(out.healthCheckIntervalS)}), got ${show(out.healthCheckTimeoutS)}`,
    );
  if (!Array.isArray(out.capacity)) out.capacity = [out.capacity as number];
  const caps = out.capacity as number[];
  if (caps.length === 1) out.capacity = resolved.map(() => caps[0]);
  else if (caps.length !== resolved.length) {
    throw new ConfigError(
      `${key("capacity")} lists ${caps.length} sizes for ${resolved.length} storage backends; give one value for all or one per backend`,
    );
  }
  for (const [i, c] of (out.capacity as number[]).entries()) {
    if (c !== 0 && c < 16 * 2 ** 20)
      throw new ConfigError(`${key("capacity")}: ${c} bytes for ${show(resolved[i])} is below the 16 MiB minimum (0 = unlimited)`);
  }
  // A store another user can write to lets that user plant symbolic links where the engine writes, reads
  // and deletes (and read every block): it must be this user's, and writable by no one else (by the group
  // only when shareWithGroup says the group's engines share it).
  const euid = typeof process.geteuid === "function" ? process.geteuid() : 0;
  for (const d of resolved) {
    const st = fs.statSync(d);
    if (st.uid !== euid) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} belongs to uid ${st.uid}, not to the engine's user (${euid}); use a directory of this user (chown it, or create another)`,
      );
    }
    const mode = (st.mode & 0o7777).toString(8);
    if ((st.mode & 0o002) !== 0)
      throw new ConfigError(`${key("storage_backends")}: directory ${show(d)} is writable by every user (mode ${mode}); chmod o-w it`);
    if ((st.mode & 0o020) !== 0 && out.shareWithGroup !== true) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} is writable by its group (mode ${mode}); chmod g-w it, or set shareWithGroup: true if the group's engines share this store`,
      );
    }
  }
  const config = { ...out, storageBackends: resolved, storageBackendsRaw: sb } as EngineConfig;
  if (config.endpoint === "") config.endpoint = defaultEndpoint(sb);
  validateEndpoint(config.endpoint, key("endpoint"));
  return { config, warnings };
}

export function validateEndpoint(endpoint: string, what: string): void {
  if (endpoint.startsWith("ipc://")) {
    const p = endpoint.slice("ipc://".length);
    if (!path.isAbsolute(p)) throw new ConfigError(`${what} must be ipc://<absolute path>, got ${show(endpoint)}`);
    // 107 bytes is the kernel's limit; the credential socket beside it (core/identity.ts) adds ".cred".
    if (Buffer.byteLength(p) > 102)
      throw new ConfigError(`${what}: socket path longer than 102 bytes (107, less ".cred" for its credential socket): ${show(endpoint)}`);
    return;
  }
  if (/^tcp:\/\/(127\.0\.0\.1|localhost|\[::1\]):\d+$/.test(endpoint)) return;
  throw new ConfigError(`${what} must be ipc://<absolute path> or tcp://127.0.0.1:<port>, got ${show(endpoint)}`);
}
