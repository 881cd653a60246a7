#!/usr/bin/env node
// ucm-engine: runs the engine process, or asks a running one how it is.
//
//   ucm-engine serve  --config <yaml> [--endpoint <ep>] [--log-level <level>]
//   ucm-engine health --config <yaml> | --endpoint <ep>
//   ucm-engine stats  --config <yaml> | --endpoint <ep>
import { EngineClient } from "./client";
import { ConfigError, EngineConfig, LoadedConfig, defaultEndpoint, loadConfigFile, validateEndpoint } from "./config";
import { LOG_LEVELS, LogLevel, Logger } from "./log";
import { EngineServer } from "./server";

const USAGE = `usage:
  ucm-engine serve  --config <yaml> [--endpoint <ipc://path | tcp://127.0.0.1:port>] [--log-level debug|info|warn|error]
  ucm-engine health --config <yaml> | --endpoint <ep>
  ucm-engine stats  --config <yaml> | --endpoint <ep>`;

interface Args {
  command: string;
  flags: Map<string, string>;
}

function parseArgs(argv: string[]): Args {
  const [command = "", ...rest] = argv;
  const flags = new Map<string, string>();
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i];
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(a);
    if (!m) throw new ConfigError(`unexpected argument ${JSON.stringify(a)}\n${USAGE}`);
    const value = m[2] ?? rest[++i];
    if (value === undefined) throw new ConfigError(`--${m[1]} needs a value\n${USAGE}`);
    flags.set(m[1], value);
  }
  return { command, flags };
}

function configFrom(flags: Map<string, string>): LoadedConfig {
  const file = flags.get("config");
  if (!file) throw new ConfigError(`--config <yaml> is required\n${USAGE}`);
  const loaded = loadConfigFile(file);
  const ep = flags.get("endpoint");
  if (ep !== undefined) {
    validateEndpoint(ep, "--endpoint");
    loaded.config.endpoint = ep;
  }
  const level = flags.get("log-level");
  if (level !== undefined) {
    if (!LOG_LEVELS.includes(level as LogLevel)) throw new ConfigError(`--log-level must be one of ${LOG_LEVELS.join(", ")}, got ${JSON.stringify(level)}`);
    loaded.config.logLevel = level as LogLevel;
  }
  return loaded;
}

async function serve(flags: Map<string, string>): Promise<number> {
  const { config, warnings } = configFrom(flags);
  const log = new Logger(config.logLevel);
  for (const w of warnings) log.warn(`config: ${w}`);
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
    console.log(JSON.stringify(r, null, 2));
    return 0;
  } finally {
    client.close();
  }
}

async function main(argv: string[]): Promise<number> {
  const { command, flags } = parseArgs(argv);
  switch (command) {
    case "serve":
      return serve(flags);
    case "health":
    case "stats":
      return ask(command, flags);
    case "-h":
    case "--help":
    case "help":
      console.log(USAGE);
      return 0;
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
