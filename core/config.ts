// The engine's configuration: the seed's YAML (single connector or list
// form) or UCM's current one (UcmPipelineStore, store_pipeline, UCM's key
// names: ucm_keys.ts), read and validated in one place against the table of
// options (options.ts). Every error names the key path and the value it got;
// a key nobody documents is an error too.
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parse as parseYaml } from "yaml";
import { ConfigError, show } from "./config_error";
import { LOG_LEVELS, LogLevel } from "./log";
import { EngineConfig, OPTIONS, parseSize } from "./options";
import { CONNECTOR_NAMES, topLevelNotes, translateConnectorConfig, unknownKey } from "./ucm_keys";

/** The seed's connector name (UCM's current one, UcmPipelineStore, is taken too: ucm_keys.ts CONNECTOR_NAMES). */
export const CONNECTOR_NAME = "UcmNfsStore";

export { ConfigError, OPTIONS, parseSize };
export type { EngineConfig };

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
  /** Said with [W] at start (none today: a key nobody documents is an error, not a warning). */
  warnings: string[];
  /** UCM keys accepted with no effect here, one line each, for the engine to say once at start. */
  notes: string[];
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

const isMapping = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);
const names = CONNECTOR_NAMES.map(show).join(" or ");

/** Validates a parsed config document (the seed's format, the list form, UCM's current form). */
export function parseConfig(doc: unknown): LoadedConfig {
  const warnings: string[] = [];
  if (!isMapping(doc)) {
    throw new ConfigError(`config must be a mapping with ucm_connector_name and ucm_connector_config, got ${show(doc)}`);
  }
  const top = doc;
  let connector: Record<string, unknown>;
  let where: string;
  const notes: string[] = [];
  if ("ucm_connectors" in top) {
    const list = top.ucm_connectors;
    if (!Array.isArray(list) || list.length === 0) throw new ConfigError(`ucm_connectors must be a non-empty list, got ${show(list)}`);
    const idx = list.findIndex((c) => isMapping(c) && CONNECTOR_NAMES.includes(c.ucm_connector_name as string));
    if (idx < 0) {
      const found = list.map((c) => (isMapping(c) ? c.ucm_connector_name : c));
      throw new ConfigError(`ucm_connectors has no entry with ucm_connector_name ${names}; names found: ${show(found)}`);
    }
    connector = list[idx] as Record<string, unknown>;
    where = `ucm_connectors[${idx}]`;
    notes.push(...topLevelNotes(top, ["ucm_connectors"], (k) => k));
  } else {
    connector = top;
    where = "";
  }
  const at = (k: string) => (where ? `${where}.${k}` : k);
  // The connector's entry holds its name and config; in the seed's form it is the top level, where UCM's own top-level keys sit too.
  if (where) {
    for (const [k, v] of Object.entries(connector))
      if (k !== "ucm_connector_name" && k !== "ucm_connector_config") throw unknownKey(at(k), v);
  } else notes.push(...topLevelNotes(connector, ["ucm_connector_name", "ucm_connector_config"], (k) => k));
  const name = connector.ucm_connector_name;
  if (!CONNECTOR_NAMES.includes(name as string)) throw new ConfigError(`${at("ucm_connector_name")} must be ${names}, got ${show(name)}`);
  const cc = connector.ucm_connector_config;
  if (!isMapping(cc)) throw new ConfigError(`${at("ucm_connector_config")} must be a mapping, got ${show(cc)}`);
  const key = (k: string) => `${at("ucm_connector_config")}.${k}`;
  const ours = translateConnectorConfig(
    cc,
    name as string,
    at("ucm_connector_config"),
    new Set(["storage_backends", ...Object.keys(OPTIONS)]),
  );
  notes.push(...ours.notes);
  const raw = ours.raw;
  /** An option's path as the file names it: a UCM key that set it is named, with ours. */
  const named = (k: string) => (ours.origin[k] ? `${key(ours.origin[k])} (${k} here)` : key(k));

  // UCM's own code hands the store a list of directories; the file writes them ':'-separated.
  const sbGiven = raw.storage_backends;
  const sb = Array.isArray(sbGiven) && sbGiven.length > 0 && sbGiven.every((d) => typeof d === "string") ? sbGiven.join(":") : sbGiven;
  if (typeof sb !== "string" || sb.trim() === "") {
    throw new ConfigError(`${key("storage_backends")} is required: a directory, or several separated by ':', got ${show(sbGiven)}`);
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
        if (typeof v !== "number" || !Number.isInteger(v)) throw new ConfigError(`${named(k)} must be an integer, got ${show(v)}`);
        if (v < (spec.min ?? -Infinity) || v > (spec.max ?? Infinity)) {
          throw new ConfigError(`${named(k)} must be between ${spec.min} and ${spec.max}, got ${show(v)}`);
        }
        break;
      case "bool":
        if (typeof v !== "boolean") throw new ConfigError(`${named(k)} must be true or false, got ${show(v)}`);
        break;
      case "string":
        if (typeof v !== "string") throw new ConfigError(`${named(k)} must be a string, got ${show(v)}`);
        break;
      case "size": {
        const n = parseSize(v);
        if (n === undefined) throw new ConfigError(`${named(k)} must be a size in bytes such as 4GiB or 500MB, got ${show(v)}`);
        if (n < (spec.min ?? 0) || n > (spec.max ?? Infinity)) {
          throw new ConfigError(`${named(k)} must be between ${spec.min} and ${spec.max} bytes, got ${show(v)} (${n})`);
        }
        out[spec.key] = n;
        continue;
      }
      case "sizes": {
        const list = Array.isArray(v) ? v : [v];
        const sizes = list.map((x, i) => {
          const n = parseSize(x);
          const at = Array.isArray(v) ? `${named(k)}[${i}]` : key(k);
          if (n === undefined) throw new ConfigError(`${at} must be a size in bytes such as 500GiB, or 0 for unlimited, got ${show(x)}`);
          return n;
        });
        out[spec.key] = sizes;
        continue;
      }
      case "level":
        if (typeof v !== "string" || !LOG_LEVELS.includes(v as LogLevel)) {
          throw new ConfigError(`${named(k)} must be one of ${LOG_LEVELS.join(", ")}, got ${show(v)}`);
        }
        break;
    }
    out[spec.key] = v;
  }
  const ms = out.metricsSocket as string;
  if (ms !== "" && (!path.isAbsolute(ms) || Buffer.byteLength(ms) > 107))
    throw new ConfigError(`${key("metricsSocket")} must be an absolute path of at most 107 bytes, got ${show(ms)}`);
  if (out.cudaCopy !== "kernel" && out.cudaCopy !== "batch")
    throw new ConfigError(`${key("cudaCopy")} must be "kernel" or "batch", got ${show(out.cudaCopy)}`);
  if ((out.healthFailureThreshold as number) > (out.healthWindowSize as number))
    throw new ConfigError(
      `${named("healthFailureThreshold")} must be at most healthWindowSize (${String(out.healthWindowSize)}), got ${show(out.healthFailureThreshold)}`,
    );
  if ((out.healthCheckTimeoutS as number) >= (out.healthCheckIntervalS as number))
    throw new ConfigError(
      `${named("healthCheckTimeoutS")} must be less than healthCheckIntervalS (${String(out.healthCheckIntervalS)}), got ${show(out.healthCheckTimeoutS)}`,
    );
  if (!Array.isArray(out.capacity)) out.capacity = [out.capacity as number];
  const caps = out.capacity as number[];
  if (caps.length === 1) out.capacity = resolved.map(() => caps[0]);
  else if (caps.length !== resolved.length) {
    throw new ConfigError(
      `${named("capacity")} lists ${caps.length} sizes for ${resolved.length} storage backends; give one value for all or one per backend`,
    );
  }
  for (const [i, c] of (out.capacity as number[]).entries()) {
    if (c !== 0 && c < 16 * 2 ** 20)
      throw new ConfigError(`${named("capacity")}: ${c} bytes for ${show(resolved[i])} is below the 16 MiB minimum (0 = unlimited)`);
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
  if (ours.storePipeline !== undefined) config.storePipeline = ours.storePipeline;
  if (ours.cacheBufferBytes !== undefined) config.cacheBufferBytes = ours.cacheBufferBytes;
  if (ours.storePipeline === "Cache|Posix") {
    // UCM's cache_buffer_capacity_gb sizes the Cache stage; absent or 0, a size that fits any node.
    const given = ours.cacheBufferBytes ?? 0;
    config.hostCacheBytes = given > 0 ? given : defaultCacheBytes();
    // UCM's Cache stage answers a dump once its bytes are in host memory; ours too, unless the file says otherwise.
    if (raw.writeBehind === undefined || raw.writeBehind === null) config.writeBehind = true;
  } else if (ours.storePipeline === "Posix") {
    config.hostCacheBytes = 0;
  }
  if (config.writeBehind && config.hostCacheBytes === 0)
    warnings.push(
      `${named("writeBehind")}: true needs a Cache stage (hostCacheBytes, or store_pipeline "Cache|Posix"); without one every dump is written before it is answered`,
    );
  if (config.endpoint === "") config.endpoint = defaultEndpoint(sb);
  validateEndpoint(config.endpoint, key("endpoint"));
  return { config, warnings, notes };
}

/** The Cache stage's size when UCM's config asks for the stage without one: 4 GiB, at most a quarter of the host's memory. */
export function defaultCacheBytes(): number {
  return Math.min(4 * 2 ** 30, Math.floor(os.totalmem() / 4 / 4096) * 4096);
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
