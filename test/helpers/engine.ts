// Starts the real engine process (dist/core/cli.js) and talks to it over real
// ZeroMQ sockets.
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { stringify } from "yaml";
import { EngineClient } from "../../core/client";

export const CLI = path.resolve(__dirname, "../../dist/core/cli.js");

export interface RunningEngine {
  proc: ChildProcess;
  endpoint: string;
  output: () => string;
  client: (timeoutMs?: number) => EngineClient;
  /** Sends a signal and resolves with the exit code. */
  stop: (signal?: NodeJS.Signals) => Promise<number | null>;
  exited: Promise<number | null>;
}

export function shortTmp(prefix = "ucmt-"): string {
  // ipc:// socket paths must stay under 108 bytes: keep them short.
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function writeConfig(dir: string, connectorConfig: Record<string, unknown>, name = "config.yaml"): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, stringify({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: connectorConfig }));
  return file;
}

/** Runs `ucm-engine <args>` to completion (for config errors). */
export function runCli(args: string[], timeoutMs = 15000): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (out += d));
    const t = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
    p.on("exit", (code) => {
      clearTimeout(t);
      resolve({ code, out });
    });
  });
}

/** `wrap`: a command the engine runs under, e.g. ["prlimit", "--nofile=2048:2048", "--"]. */
export async function startEngine(
  configFile: string,
  extraArgs: string[] = [],
  env?: NodeJS.ProcessEnv,
  wrap: string[] = [],
): Promise<RunningEngine> {
  const argv = [...wrap, process.execPath, CLI, "serve", "--config", configFile, ...extraArgs];
  const proc = spawn(argv[0], argv.slice(1), { stdio: ["ignore", "pipe", "pipe"], env: env ?? process.env });
  let out = "";
  const clients: EngineClient[] = [];
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  const endpoint = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`engine did not start within 15 s:\n${out}`)), 15000);
    const onData = () => {
      const m = /listening on (\S+)/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(m[1]);
      }
    };
    proc.stdout!.on("data", onData);
    void exited.then((code) => {
      clearTimeout(t);
      reject(new Error(`engine exited with ${code} before listening:\n${out}`));
    });
  });
  return {
    proc,
    endpoint,
    output: () => out,
    client: (timeoutMs = 10000) => {
      const c = new EngineClient(endpoint, timeoutMs);
      clients.push(c);
      return c;
    },
    stop: async (signal: NodeJS.Signals = "SIGTERM") => {
      for (const c of clients) c.close();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
    exited,
  };
}

export async function hello(c: EngineClient, pid = process.pid): Promise<Record<string, unknown>> {
  return c.call("hello", { version: 1, pid, name: "jest" });
}

/**
 * Polls `cond` until it holds, failing after `timeoutMs` (generous: a loaded
 * 2-core machine is slow); for what a test waits to see happen, instead of a
 * fixed sleep that decides whether it passes.
 */
export async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 20000, everyMs = 20): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`waited ${timeoutMs} ms for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A tcp port nobody listens on now (the kernel's pick), for an engine's tcp endpoint. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}
