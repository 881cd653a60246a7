#!/usr/bin/env node
// ucm-engine: runs the engine process, or asks a running one how it is.
//
//   ucm-engine serve  --config <yaml> [--endpoint <ep>] [--log-level <level>]
//   ucm-engine health --config <yaml> | --endpoint <ep>
//   ucm-engine stats  --config <yaml> | --endpoint <ep> [--json]
//   ucm-engine bench  --dir <path> [--config <yaml>] [--block-mib 16] [--shards 128] [--gib 2] [--threads N]
//
// `ucm-engine --help` and `ucm-engine serve --help` also list every key of the
// config file with its default, from the table docs/configuration.md is
// generated from (core/options.ts).
import { ParseArgsConfig, parseArgs } from "util";
import { EngineClient } from "./client";
import { OPTIONS, parseSize } from "./config";
import { formatMountBench, runMountBench, table } from "./mount_bench";
import { ConfigError, EngineConfig, LoadedConfig, defaultEndpoint, loadConfigFile, validateEndpoint } from "./config";
import { LOG_LEVELS, LogLevel, Logger } from "./log";
import { widenCpuAffinity } from "./native";
import { optionRows } from "./options";
import { EngineServer } from "./server";

/** Each command's options (node:util parseArgs) and its usage line. */
const COMMANDS = {
  serve: {
    usage:
      "ucm-engine serve --config <yaml> [--endpoint <ipc://path | tcp://127.0.0.1:port>] [--log-level debug|info|warn|error] [--exit-when-idle <seconds>]",
    about:
      "Runs the engine in this process until SIGINT or SIGTERM (exit code 0 after a clean shutdown), or, with " +
      "--exit-when-idle, until no client has had a session for that long (what the shim asks of an engine it starts).",
    options: {
      config: { type: "string" },
      endpoint: { type: "string" },
      "log-level": { type: "string" },
      "exit-when-idle": { type: "string" },
    },
  },
  health: {
    usage: "ucm-engine health --config <yaml> | --endpoint <ep>",
    about: "Asks a running engine whether it serves.",
    options: { config: { type: "string" }, endpoint: { type: "string" } },
  },
  stats: {
    usage: "ucm-engine stats --config <yaml> | --endpoint <ep> [--json]",
    about: "Prints a running engine's figures as a table (or the raw reply with --json).",
    options: { config: { type: "string" }, endpoint: { type: "string" }, json: { type: "boolean" } },
  },
  bench: {
    usage:
      "ucm-engine bench --dir <path> [--config <yaml>] [--block-mib 16] [--shards 128] [--gib 2] [--threads <n>] [--odirect true|false]",
    about: "Measures a directory with the engine's own I/O path (dump, then cold loads) and removes what it wrote.",
    options: {
      dir: { type: "string" },
      config: { type: "string" },
      "block-mib": { type: "string" },
      shards: { type: "string" },
      gib: { type: "string" },
      threads: { type: "string" },
      odirect: { type: "string" },
    },
  },
} as const;
type Command = keyof typeof COMMANDS;

const USAGE = `usage:\n${Object.values(COMMANDS)
  .map((c) => `  ${c.usage}`)
  .join("\n")}\n\nEvery command answers --help.`;

/** The config file's keys with their defaults, one a line: the table of core/options.ts. */
function optionsHelp(): string {
  const rows = optionRows();
  const kw = Math.max(...rows.map((r) => r.key.length));
  const dw = Math.max(...rows.map((r) => r.dflt.length));
  return [
    "Keys of ucm_connector_config in the config file, their defaults and what they do (docs/configuration.md says more):",
    ...rows.map((r) => `  ${r.key.padEnd(kw)}  ${r.dflt.padEnd(dw)}  ${r.doc}`),
    "",
    "UCM's own key names (io_direct, posix_capacity_gb, timeout_ms, ...) and its UcmPipelineStore form are taken too: each sets",
    'one of these keys or is accepted with no effect here (said at start); a key nobody documents stops startup (docs/configuration.md, "UCM\'s key names").',
  ].join("\n");
}

interface Args {
  command: string;
  flags: Map<string, string>;
  help: boolean;
}

function parseCli(argv: string[]): Args {
  const [command = "", ...rest] = argv;
  if (!(command in COMMANDS)) return { command, flags: new Map(), help: ["-h", "--help", "help", ""].includes(command) };
  const spec = COMMANDS[command as Command];
  let values: Record<string, unknown>;
  try {
    const options: ParseArgsConfig["options"] = { ...spec.options, help: { type: "boolean", short: "h" } };
    values = parseArgs({ args: rest, options, strict: true, allowPositionals: false }).values;
  } catch (e) {
    throw new ConfigError(`${(e as Error).message}\nusage: ${spec.usage}`);
  }
  const flags = new Map<string, string>();
  for (const [k, v] of Object.entries(values)) if (k !== "help" && v !== undefined) flags.set(k, String(v));
  return { command, flags, help: values.help === true };
}

function configFrom(flags: Map<string, string>): LoadedConfig {
  const file = flags.get("config");
  if (!file) throw new ConfigError(`--config <yaml> is required (or --endpoint for health and stats); see --help`);
  const loaded = loadConfigFile(file);
  const ep = flags.get("endpoint");
  if (ep !== undefined) {
    validateEndpoint(ep, "--endpoint");
    loaded.config.endpoint = ep;
  }
  const level = flags.get("log-level");
  if (level !== undefined) {
    if (!LOG_LEVELS.includes(level as LogLevel))
      throw new ConfigError(`--log-level must be one of ${LOG_LEVELS.join(", ")}, got ${JSON.stringify(level)}`);
    loaded.config.logLevel = level as LogLevel;
  }
  return loaded;
}

async function serve(flags: Map<string, string>): Promise<number> {
  const idle = flags.get("exit-when-idle");
  const idleS = idle === undefined ? undefined : Number(idle);
  if (idleS !== undefined && (!Number.isInteger(idleS) || idleS < 1)) {
    throw new ConfigError(`--exit-when-idle must be a whole number of seconds >= 1, got ${JSON.stringify(idle)}`);
  }
  const { config, warnings, notes } = configFrom(flags);
  const log = new Logger(config.logLevel);
  for (const w of warnings) log.warn(`config: ${w}`);
  for (const n of notes) log.info(`config: ${n}`);
  if (process.env.UCM_ENGINE_ALL_CPUS === "1") {
    // Started by the shim from whichever vLLM process came first, maybe a worker bound to one core: the engine
    // serves them all, so it runs on every CPU (before its transfer threads and libzmq's exist; they inherit it).
    const cpus = widenCpuAffinity();
    if (cpus.after !== cpus.before)
      log.info(`CPU affinity: the starting process allowed ${cpus.before} CPU(s); the engine runs on ${cpus.after}`);
  }
  const server = new EngineServer(config, log);
  await server.start();
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info(`${sig} received`);
      server.stop().then(
        () => resolve(0),
        (e: Error) => {
          log.error(`shutdown failed: ${e.message}`);
          resolve(1);
        },
      );
    };
    process.on("SIGINT", () => stop("SIGINT"));
    process.on("SIGTERM", () => stop("SIGTERM"));
    if (idleS !== undefined) server.exitWhenIdle(idleS, () => stop("idle"));
  });
}

function endpointOf(flags: Map<string, string>): string {
  const ep = flags.get("endpoint");
  if (ep) {
    validateEndpoint(ep, "--endpoint");
    return ep;
  }
  const cfg: EngineConfig = configFrom(flags).config;
  return cfg.endpoint || defaultEndpoint(cfg.storageBackendsRaw);
}

async function ask(op: "health" | "stats", flags: Map<string, string>): Promise<number> {
  const client = new EngineClient(endpointOf(flags), 3000);
  try {
    const r = await client.call(op);
    delete r.id;
    delete r.ok;
    console.log(op === "stats" && !flags.has("json") ? formatStats(r) : JSON.stringify(r, null, 2));
    return 0;
  } finally {
    client.close();
  }
}

/** Bytes in the largest binary unit that keeps the figure at 1 or more. */
const gib = (x: unknown) => {
  const n = Number(x);
  for (const [u, f] of [
    ["TiB", 2 ** 40],
    ["GiB", 2 ** 30],
    ["MiB", 2 ** 20],
    ["KiB", 2 ** 10],
  ] as const)
    if (n >= f) return `${(n / f).toFixed(2)} ${u}`;
  return `${n} B`;
};

/** The stats reply as a table: the figures the metrics endpoint exports. */
export function formatStats(r: Record<string, unknown>): string {
  const n = (k: string) => Number(r[k] ?? 0);
  const rows: Array<[string, string]> = [];
  const add = (a: string, b: string) => rows.push([a, b]);
  add("engine", `pid ${n("pid")}, up ${n("uptime_s").toFixed(0)} s, ${n("clients")} client(s), ${n("transferThreads")} transfer streams`);
  const lk = n("lookupKeys");
  add(
    "lookups",
    `${n("lookups")} requests, ${lk} keys: ${n("hits")} hits, ${n("misses")} misses${lk ? ` (hit rate ${((100 * n("hits")) / lk).toFixed(1)}%)` : ""}`,
  );
  add(
    "dumped",
    `${n("blocksDumped")} blocks, ${gib(n("bytesDumped"))} in ${n("dumpTasks")} tasks; ${n("blocksSkipped")} already stored or being written (${n("blocksSkippedInFlight")})`,
  );
  add("loaded", `${n("blocksLoaded")} blocks, ${gib(n("bytesLoaded"))} in ${n("loadTasks")} tasks`);
  const lat = (r.latency ?? {}) as Record<string, { count: number; meanS: number; p50S: number; p99S: number }>;
  for (const d of ["dump", "load"]) {
    const l = lat[d];
    if (l && l.count)
      add(
        `${d} task latency`,
        `mean ${(l.meanS * 1e3).toFixed(2)} ms, p50 <= ${(l.p50S * 1e3).toFixed(1)} ms, p99 <= ${(l.p99S * 1e3).toFixed(1)} ms (${l.count} tasks)`,
      );
  }
  add(
    "storage",
    `${n("storageBusySeconds").toFixed(1)} s of reads and writes (summed over streams), blocks waited ${n("storageWaitSeconds").toFixed(1)} s for a stream`,
  );
  const h = (r.health ?? {}) as Record<string, number>;
  add(
    "store health",
    `${h.open ? "OFF (storage unhealthy)" : "on"}; opened ${h.opens ?? 0} times, ${(h.openSeconds ?? 0).toFixed(1)} s in all; shed ${h.shedLookups ?? 0} lookups, ${h.shedDumpBlocks ?? 0} dump and ${h.shedLoadBlocks ?? 0} load blocks`,
  );
  const t = (r.tier ?? {}) as Record<string, number>;
  if (t.capacityBytes) {
    const asked = (t.hits ?? 0) + (t.misses ?? 0);
    add(
      "cache stage",
      `${t.blocks ?? 0} blocks (${gib(t.blockBytes ?? 0)}), ${gib(t.usedBytes ?? 0)} of ${gib(t.capacityBytes)} in use, ${t.pending ?? 0} waiting for their commit; ` +
        `loads: ${t.hits ?? 0} hits (${gib(t.hitBytes ?? 0)}), ${t.misses ?? 0} misses${asked ? ` (hit rate ${((100 * (t.hits ?? 0)) / asked).toFixed(1)}%)` : ""}; ` +
        `${t.evicted ?? 0} evicted, ${t.refused ?? 0} refused`,
    );
    if ((t.written ?? 0) + (t.unwritten ?? 0) + (t.shed ?? 0) + (t.writeFailed ?? 0) > 0)
      add(
        "write-behind",
        `${t.unwritten ?? 0} blocks (${gib(t.unwrittenBytes ?? 0)}) not written yet, oldest ${t.lagMs ?? 0} ms; ` +
          `${t.written ?? 0} written, ${t.shed ?? 0} shed (evicted before written), ${t.writeFailed ?? 0} failed`,
      );
    if ((t.pinned ?? 0) + (t.abandoned ?? 0) > 0)
      add(
        "cache stage, GPU",
        `${t.pinned ?? 0} buffers page-locked (${gib(t.pinnedBytes ?? 0)}): GPU blocks move to and from them in one DMA; ` +
          `${t.abandoned ?? 0} given up after a copy that did not finish`,
      );
  } else add("cache stage", "off (hostCacheBytes 0)");
  add(
    "dropped writes",
    `${n("droppedInflight")} in-flight bytes, ${n("droppedCapacity")} capacity, ${n("droppedQueueAge")} queue age, ${n("deferredFirstSight")} first sight`,
  );
  add(
    "in flight",
    `${n("tasksInFlight")} tasks, ${n("queuedBlocks")} blocks queued, ${gib(n("inflightDumpBytes"))} of ${gib(n("maxInflightBytes"))} dump bytes`,
  );
  for (const c of (r.capacity ?? []) as Array<Record<string, number | string>>) {
    const cap = Number(c.capacity);
    const used = Number(c.usedBytes);
    add(
      `capacity ${c.dir}`,
      `${gib(used)} in ${c.usedFiles} blocks of ${cap ? `${gib(cap)} (${((100 * used) / cap).toFixed(1)}%)` : "unlimited"}; evicted ${c.evictedFiles} blocks (${gib(c.evictedBytes)}) in ${c.evictionPasses} passes`,
    );
  }
  const errs = (r.errors ?? {}) as Record<string, number>;
  const reqErrs = Object.entries(errs)
    .map(([k, v]) => `${k} ${v}`)
    .join(", ");
  add(
    "errors",
    `blocks: ${n("blocksNotFound")} not found, ${n("blocksCorrupt")} corrupt, ${n("blocksMismatch")} mismatch, ${n("blocksIoError")} I/O, ${n("blocksCancelled")} cancelled; requests: ${reqErrs || "none"}`,
  );
  return table(["", ""], rows).split("\n").slice(2).join("\n");
}

async function bench(flags: Map<string, string>): Promise<number> {
  const dir = flags.get("dir");
  if (!dir) throw new ConfigError(`--dir <path> is required\nusage: ${COMMANDS.bench.usage}`);
  const cfg = flags.has("config") ? configFrom(flags).config : undefined;
  const num = (k: string, dflt: number, min: number, max: number) => {
    const v = flags.get(k);
    if (v === undefined) return dflt;
    const x = Number(v);
    if (!Number.isFinite(x) || x < min || x > max)
      throw new ConfigError(`--${k} must be a number in [${min}, ${max}], got ${JSON.stringify(v)}`);
    return x;
  };
  const threads = Math.round(num("threads", cfg?.transferStreamNumber ?? (OPTIONS.transferStreamNumber.dflt as number), 1, 1024));
  const od = flags.get("odirect");
  if (od !== undefined && od !== "true" && od !== "false")
    throw new ConfigError(`--odirect must be true or false, got ${JSON.stringify(od)}`);
  const odirect = od !== undefined ? od === "true" : (cfg?.odirect ?? true);
  const blockBytes = Math.round(num("block-mib", 16, 1 / 256, 1024) * 2 ** 20);
  const total = parseSize(`${num("gib", 2, 0.001, 1024)}GiB`) ?? 2 ** 31;
  const r = await runMountBench({
    dir,
    blockBytes,
    shards: Math.round(num("shards", 128, 1, 4096)),
    totalBytes: total,
    threads,
    odirect,
    progress: process.stderr,
  });
  console.log(formatMountBench(r, odirect));
  return r.failed ? 1 : 0;
}

async function main(argv: string[]): Promise<number> {
  const { command, flags, help } = parseCli(argv);
  if (help) {
    const c = COMMANDS[command as Command];
    if (!c) console.log(`${USAGE}\n\n${optionsHelp()}`);
    else console.log(`usage: ${c.usage}\n\n${c.about}${command === "serve" ? `\n\n${optionsHelp()}` : ""}`);
    return 0;
  }
  switch (command) {
    case "serve":
      return serve(flags);
    case "health":
    case "stats":
      return ask(command, flags);
    case "bench":
      return bench(flags);
    default:
      throw new ConfigError(`unknown command ${JSON.stringify(command)}\n${USAGE}`);
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    const prefix = e instanceof ConfigError ? "config error: " : "";
    process.stderr.write(`[UCMNFSSTORE] [E] ${prefix}${e.message}\n`);
    process.exit(e instanceof ConfigError ? 2 : 1);
  },
);
