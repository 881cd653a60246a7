// Which process a client is, and how long its session lives. On ipc the
// engine learns a client's pid from the kernel (the credential socket,
// native/src/peer_tokens.h), never from what a hello says; on tcp it cannot,
// and says so. A session ends with its connection, so a client that gives up
// on a request and opens a new socket never leaves sessions behind.
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

let dir: string;
let engine: RunningEngine | undefined;
const shm: ShmRegion[] = [];
const children: ChildProcess[] = [];

beforeEach(() => {
  dir = shortTmp();
  fs.mkdirSync(path.join(dir, "store"));
});
afterEach(async () => {
  children.splice(0).forEach((c) => c.kill("SIGKILL"));
  await engine?.stop("SIGKILL");
  engine = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

async function start(extra: Record<string, unknown> = {}): Promise<RunningEngine> {
  engine = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock`, ...extra }));
  return engine;
}

async function until(cond: () => Promise<boolean> | boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

/**
 * Another process, a client of the engine that holds a session and a shared memory file open (its descriptor is
 * what /proc/<pid>/fd/<n> names). On each line of its stdin it says hello again on a new connection and prints
 * the outcome as a JSON line.
 */
function victim(endpoint: string, file: string): Promise<{ proc: ChildProcess; pid: number; fd: number; lines: string[] }> {
  const client = path.resolve(__dirname, "../dist/core/client.js");
  const code = `
    const fs = require("fs");
    const { EngineClient } = require(${JSON.stringify(client)});
    const fd = fs.openSync(${JSON.stringify(file)}, "r+");
    const hello = async () => {
      const c = new EngineClient(${JSON.stringify(endpoint)}, 5000);
      try { await c.call("hello", { version: 1, pid: process.pid, name: "victim" }); return { ok: true, c }; }
      catch (e) { c.close(); return { ok: false, code: e.code, error: e.message }; }
    };
    (async () => {
      const first = await hello();
      console.log(JSON.stringify({ pid: process.pid, fd, ok: first.ok, error: first.error }));
      require("readline").createInterface({ input: process.stdin }).on("line", async () => {
        const r = await hello();
        console.log(JSON.stringify({ ok: r.ok, code: r.code, error: r.error }));
      });
    })();`;
  const proc = spawn(process.execPath, ["-e", code], { stdio: ["pipe", "pipe", "inherit"], cwd: path.resolve(__dirname, "..") });
  children.push(proc);
  const lines: string[] = [];
  let buf = "";
  proc.stdout!.on("data", (d) => {
    buf += String(d);
    const parts = buf.split("\n");
    buf = parts.pop()!;
    lines.push(...parts.filter((l) => l.trim()));
  });
  return until(() => lines.length > 0, 20000).then(() => {
    const first = JSON.parse(lines[0]) as { pid: number; fd: number; ok: boolean; error?: string };
    if (!first.ok) throw new Error(`the victim's hello failed: ${first.error}`);
    return { proc, pid: first.pid, fd: first.fd, lines };
  });
}

test("a hello naming another connected process's pid is refused: that process keeps its session quota and its memory", async () => {
  const e = await start({ maxSessionsPerProcess: 4 });
  const seg = new ShmRegion(8192, "random");
  shm.push(seg);
  const v = await victim(e.endpoint, seg.file);
  // The attacker is connected, and so is the victim: both are "a process connected to the engine".
  const taken: string[] = [];
  for (let i = 0; i < 5; i++) {
    const c = e.client();
    const r = await c.call("hello", { version: 1, pid: v.pid, name: "impostor" }).then(
      () => "accepted",
      (err: Error & { code?: string }) => `${err.code}: ${err.message}`,
    );
    taken.push(r);
    // With a session in the victim's name the attacker would map the victim's memory.
    const reg = await c.call("register", { regions: [{ medium: "host", source: `/proc/${v.pid}/fd/${v.fd}`, size: 8192 }] }).then(
      () => "mapped",
      (err: Error & { code?: string }) => String(err.code),
    );
    expect(reg).not.toBe("mapped");
  }
  for (const r of taken)
    expect(r).toMatch(new RegExp(`^bad_message: hello names pid ${v.pid}, but the process that connected is pid ${process.pid}`));
  // The victim's own quota is intact: it gets a new session.
  v.proc.stdin!.write("again\n");
  expect(await until(() => v.lines.length > 1, 10000)).toBe(true);
  expect(JSON.parse(v.lines[1])).toEqual({ ok: true });
}, 60000);

test("sessions end with their connection: a client that resets its socket 20 times without goodbye keeps getting sessions", async () => {
  const e = await start({ maxSessionsPerProcess: 4, clientCheckMs: 600000 });
  for (let i = 0; i < 20; i++) {
    const c = new EngineClient(e.endpoint, 5000);
    try {
      expect((await hello(c)).version).toBe(1);
    } finally {
      c.close(); // no goodbye: what a client does when a request timed out
    }
  }
  const probe = e.client();
  expect(await until(async () => (await probe.call("health")).clients === 0, 5000)).toBe(true);
});

test("an empty frame from a client ends only its own session", async () => {
  const e = await start();
  const a = e.client();
  const b = e.client();
  await hello(a);
  await hello(b);
  await a.sendRaw([Buffer.alloc(0)]);
  await expect(a.call("lookup", { ns: "x", keys: [Buffer.alloc(8)] })).rejects.toMatchObject({ code: "no_session" });
  expect((await b.call("lookup", { ns: "x", keys: [Buffer.alloc(8)] })).found).toEqual([false]);
});

test("on ipc a hello without a credential token is refused, naming the credential socket", async () => {
  const e = await start();
  const c = e.client();
  await expect(c.call("hello", { version: 1, pid: process.pid, name: "x", cred: null })).rejects.toMatchObject({
    code: "bad_message",
    message: expect.stringContaining(`a hello on ipc must carry cred, a token read from ${dir}/e.sock.cred`),
  });
  await expect(c.call("hello", { version: 1, pid: process.pid, name: "x", cred: "00".repeat(16) })).rejects.toThrow(
    /cred: token unknown, used or older than 30 s/,
  );
  expect((await hello(c)).version).toBe(1);
  expect(fs.statSync(`${dir}/e.sock.cred`).mode & 0o777).toBe(0o600);
  await e.stop("SIGTERM");
  engine = undefined;
  expect(fs.existsSync(`${dir}/e.sock.cred`)).toBe(false);
});

test("on tcp a hello's pid cannot be verified: the reply says so and /proc/<pid>/fd regions are refused", async () => {
  const port = 21000 + (process.pid % 20000);
  const e = await start({ endpoint: `tcp://127.0.0.1:${port}` });
  const c = e.client();
  const h = await hello(c);
  expect(h.pid_verified).toBe(false);
  expect(e.output()).toMatch(/tcp endpoint: a client's pid cannot be verified/);
  const seg = new ShmRegion(8192);
  shm.push(seg);
  const fd = fs.openSync(seg.file, "r+");
  try {
    await expect(
      c.call("register", { regions: [{ medium: "host", source: `/proc/${process.pid}/fd/${fd}`, size: 8192 }] }),
    ).rejects.toMatchObject({
      code: "bad_message",
      message: expect.stringMatching(/regions\[0\]: .*on tcp the engine cannot verify a client's pid/),
    });
  } finally {
    fs.closeSync(fd);
  }
  expect((await c.call("register", { regions: [{ medium: "host", source: seg.name, size: 8192 }] })).regions).toHaveLength(1);
});
