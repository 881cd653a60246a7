// No client can take the engine down for everyone: every request is bounded
// by its cost before any work, connections by the open-file limit (idle ones
// without a session are closed), regions by per-client quotas; and a client
// doing all of that in a loop leaves another client's transfers byte-exact
// and its health checks fast.
import { ChildProcess, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as net from "net";
import * as path from "path";
import * as zmq from "zeromq";
import { ShmRegion, shardColumns } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

const NS = "jest-bounds";
const key = (i: number, salt: string) => crypto.createHash("sha256").update(`${salt}${i}`).digest();

let dir: string;
let engine: RunningEngine;
const shm: ShmRegion[] = [];

async function start(extra: Record<string, unknown> = {}) {
  engine = await startEngine(
    writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 2, ...extra }),
  );
  return engine;
}

beforeEach(() => {
  dir = shortTmp();
  fs.mkdirSync(path.join(dir, "store"));
});
afterEach(async () => {
  await engine?.stop("SIGKILL");
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

function idleSockets(n: number, endpoint: string): zmq.Dealer[] {
  return Array.from({ length: n }, () => {
    const d = new zmq.Dealer({ linger: 0, reconnectInterval: 60000 });
    d.connect(endpoint);
    return d;
  });
}

async function until(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

test("a lookup costing more than maxLookupKeys is refused before any work; the engine goes on", async () => {
  const e = await start();
  const c = e.client(30000);
  await hello(c);
  const nss = Array.from({ length: 128 }, (_, i) => `n${i}`.padEnd(100, "x"));
  const keys = Array.from({ length: 65536 }, (_, i) => key(i, "big"));
  await expect(c.call("lookup", { ns: nss, keys })).rejects.toMatchObject({
    code: "too_large",
    message: expect.stringMatching(/checks 8388608 blocks, more than maxLookupKeys 262144/),
  });
  expect((await c.call("lookup", { ns: nss.slice(0, 4), keys: keys.slice(0, 1000) })).found).toHaveLength(1000);
  expect((await c.call("health")).status).toBe("serving");
});

/** Another process that opens `n` connections to the engine and never speaks. */
function idleProcess(n: number, endpoint: string): ChildProcess {
  const zmqPath = require.resolve("zeromq");
  const code = `const zmq = require(${JSON.stringify(zmqPath)}); const s = [];
    for (let i = 0; i < ${n}; i++) { const d = new zmq.Dealer({ linger: 0 }); d.connect(${JSON.stringify(endpoint)}); s.push(d); }
    setInterval(() => {}, 1000);`;
  return spawn(process.execPath, ["-e", code], { stdio: "ignore" });
}

test("connections of a process without a session are closed at maxConnections; a real client is served meanwhile", async () => {
  const e = await start({ maxConnections: 64, idleConnectionS: 30, maxConnectionsPerProcess: 1000 });
  expect(e.output()).toMatch(/open files: limit \d+ \(hard \d+\); client connections: 64 before idle ones are closed at once/);
  const c = e.client(15000);
  await hello(c);
  const hog = idleProcess(200, e.endpoint);
  try {
    expect(await until(() => /closed \d+ connection\(s\) whose process had no session \(at maxConnections\)/.test(e.output()), 20000)).toBe(
      true,
    );
    expect((await c.call("health")).status).toBe("serving");
  } finally {
    hog.kill("SIGKILL");
  }
}, 60000);

test("idle connections without a session are closed after idleConnectionS; one process keeps at most maxConnectionsPerProcess", async () => {
  const e = await start({ idleConnectionS: 2, maxConnectionsPerProcess: 10 });
  const hog = idleProcess(40, e.endpoint);
  try {
    expect(await until(() => /beyond maxConnectionsPerProcess 10/.test(e.output()), 15000)).toBe(true);
    expect(await until(() => /closed 10 connection\(s\) whose process had no session for 2 s/.test(e.output()), 15000)).toBe(true);
  } finally {
    hog.kill("SIGKILL");
  }
  const c = e.client(15000);
  expect((await hello(c)).version).toBe(1);
}, 60000);

test("a hello naming another process than the one that connected is refused", async () => {
  const e = await start();
  const c = e.client();
  await expect(c.call("hello", { version: 1, pid: 1, name: "liar" })).rejects.toMatchObject({
    code: "bad_message",
    message: expect.stringMatching(new RegExp(`hello names pid 1, but the process that connected is pid ${process.pid}`)),
  });
  expect((await hello(c)).version).toBe(1);
});

test("regions: per-client quotas on count and bytes, refused with the bound; other clients unaffected", async () => {
  const e = await start({ maxRegionsPerClient: 8, maxRegionBytesPerClient: "4MiB" });
  const greedy = e.client();
  await hello(greedy);
  const regs = Array.from({ length: 9 }, () => new ShmRegion(4096));
  shm.push(...regs);
  const ids: number[] = [];
  for (const r of regs.slice(0, 8))
    ids.push(...((await greedy.call("register", { regions: [{ medium: "host", source: r.name, size: r.size }] })).regions as number[]));
  await expect(greedy.call("register", { regions: [{ medium: "host", source: regs[8].name, size: 4096 }] })).rejects.toMatchObject({
    code: "too_large",
    message: expect.stringMatching(/would hold 9 regions, more than maxRegionsPerClient 8/),
  });
  await greedy.call("release", { regions: ids });
  const big = Array.from({ length: 5 }, () => new ShmRegion(1 << 20));
  shm.push(...big);
  await greedy.call("register", { regions: big.slice(0, 4).map((r) => ({ medium: "host", source: r.name, size: r.size })) });
  await expect(greedy.call("register", { regions: [{ medium: "host", source: big[4].name, size: 1 << 20 }] })).rejects.toThrow(
    /would hold 5242880 bytes of regions, more than maxRegionBytesPerClient 4194304/,
  );
  const other = e.client();
  await hello(other);
  expect((await other.call("register", { regions: [{ medium: "host", source: regs[8].name, size: 4096 }] })).regions).toHaveLength(1);
});

test("soak: a client abusing every bound for a minute; another's transfers stay byte-exact and its health p99 under 50 ms", async () => {
  const e = await start({ maxConnections: 200, idleConnectionS: 2, maxRegionsPerClient: 64, transferStreamNumber: 4 });
  const stop = Date.now() + 60_000;
  // Another process holding many idle connections (its sockets reconnect whenever the engine closes them).
  const hog = idleProcess(300, e.endpoint);
  const abuse = (async () => {
    const bad = e.client(30000);
    await hello(bad);
    const nss = Array.from({ length: 64 }, (_, i) => `a${i}`);
    const keys = Array.from({ length: 16384 }, (_, i) => key(i, "abuse"));
    const regions = Array.from({ length: 70 }, () => new ShmRegion(4096));
    shm.push(...regions);
    let rounds = 0;
    while (Date.now() < stop) {
      await bad.call("lookup", { ns: nss, keys }).catch(() => undefined);
      const idle = idleSockets(50, e.endpoint);
      const ids: number[] = [];
      for (const r of regions) {
        const got = await bad.call("register", { regions: [{ medium: "host", source: r.name, size: 4096 }] }).catch(() => undefined);
        if (got) ids.push(...(got.regions as number[]));
      }
      expect(ids.length).toBe(64);
      await bad.call("release", { regions: ids });
      await new Promise((r) => setTimeout(r, 200));
      idle.forEach((d) => d.close());
      rounds++;
    }
    return rounds;
  })();
  const work = (async () => {
    const good = e.client(30000);
    await hello(good);
    const src = new ShmRegion(8 * 65536, "random");
    const dst = new ShmRegion(8 * 65536);
    shm.push(src, dst);
    const [sid, did] = (await good.call("register", { regions: [src, dst].map((r) => ({ medium: "host", source: r.name, size: r.size })) }))
      .regions as number[];
    const lat: number[] = [];
    let n = 0;
    while (Date.now() < stop) {
      const ks = Array.from({ length: 8 }, (_, i) => key(i, `good${n}`));
      const d = await good.call("dump", { ns: NS, keys: ks, shards: shardColumns([sid], 65536, [0, 1, 2, 3, 4, 5, 6, 7]), commit: true });
      expect((await good.call("wait", { task: d.task, timeout_ms: 20000 })).status).toEqual(new Array(8).fill("ok"));
      dst.zero();
      const l = await good.call("load", { ns: NS, keys: ks, shards: shardColumns([did], 65536, [0, 1, 2, 3, 4, 5, 6, 7]) });
      expect((await good.call("wait", { task: l.task, timeout_ms: 20000 })).status).toEqual(new Array(8).fill("ok"));
      expect(dst.read().equals(src.read())).toBe(true);
      const t0 = process.hrtime.bigint();
      expect((await good.call("health")).status).toBe("serving");
      lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
      n++;
    }
    lat.sort((a, b) => a - b);
    return { n, p99: lat[Math.floor(lat.length * 0.99)] };
  })();
  const [rounds, good] = await Promise.all([abuse, work]).finally(() => hog.kill("SIGKILL"));
  console.log(
    `soak: ${rounds} abuse rounds, ${good.n} byte-exact round trips, health p99 ${good.p99.toFixed(1)} ms; ` +
      `engine: ${(e.output().match(/closed \d+ connection/g) ?? []).length} sweeps closed idle connections`,
  );
  expect(rounds).toBeGreaterThan(5);
  expect(good.n).toBeGreaterThan(20);
  expect(good.p99).toBeLessThan(50);
  expect((await e.client().call("health")).status).toBe("serving");
}, 120000);

/**
 * A process that opens `n` raw connections, completes ZeroMQ's handshake on each (ZMTP 3.0 greeting, NULL
 * mechanism, READY as a DEALER) and then stays silent: one descriptor per connection on each side.
 */
function handshakeHog(n: number, socketPath: string): ChildProcess {
  const code = `const net = require("net");
    const greeting = Buffer.alloc(64); greeting[0] = 0xff; greeting[9] = 0x7f; greeting[10] = 3; greeting.write("NULL", 12);
    const prop = Buffer.concat([Buffer.from([11]), Buffer.from("Socket-Type"), Buffer.from([0, 0, 0, 6]), Buffer.from("DEALER")]);
    const body = Buffer.concat([Buffer.from([5]), Buffer.from("READY"), prop]);
    const ready = Buffer.concat([Buffer.from([0x04, body.length]), body]);
    let open = 0, i = 0;
    function more() {
      for (let k = 0; k < 200 && i < ${n}; k++, i++) {
        const s = net.connect(${JSON.stringify(socketPath)});
        s.on("connect", () => { open++; s.write(greeting); s.write(ready); });
        s.on("error", () => {});
        s.on("data", () => {});
      }
      if (i < ${n}) setTimeout(more, 5);
    }
    more();
    setInterval(() => {}, 1000);`;
  return spawn(process.execPath, ["-e", code], { stdio: "ignore" });
}

test("processes opening more idle connections than the engine has file descriptors: it stays up and serves", async () => {
  // An engine allowed 1,024 descriptors, and 4,000 connections that complete the handshake and idle. Without
  // the guard, libzmq's accept fails with EMFILE and aborts the engine.
  engine = await startEngine(
    writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 2 }),
    [],
    undefined,
    ["prlimit", "--nofile=1024:1024", "--"],
  );
  const e = engine;
  const c = e.client(20000);
  await hello(c);
  const socketPath = e.endpoint.slice("ipc://".length);
  const hogs = [handshakeHog(2000, socketPath), handshakeHog(2000, socketPath)];
  try {
    await new Promise((r) => setTimeout(r, 12000));
    expect(e.proc.exitCode).toBeNull();
    expect(e.proc.signalCode).toBeNull();
    expect((await c.call("health")).status).toBe("serving");
    const fds = fs.readdirSync(`/proc/${e.proc.pid}/fd`).length;
    const hidden = (e.output().match(/hidden \(at /g) ?? []).length;
    console.log(
      `4,000 connections tried against 1,024 descriptors: ${fds} open now; ${(e.output().match(/closed \d+/g) ?? []).length} sweeps; ` +
        `socket hidden ${hidden} time(s)`,
    );
    expect(fds).toBeLessThan(1024);
    expect(e.output()).toMatch(/open files: limit 1024 \(hard 1024\); client connections: 256 before/);
  } finally {
    hogs.forEach((h) => h.kill("SIGKILL"));
  }
  expect((await c.call("health")).status).toBe("serving");
  // The socket's name is back (it was hidden while descriptors ran short): a new client connects.
  expect(fs.statSync(socketPath).isSocket()).toBe(true);
  const fresh = e.client(5000);
  expect((await fresh.call("health")).status).toBe("serving");
  fresh.close();
}, 60000);

test("memory exhaustion while registering: each refusal is an error reply, never the end of the engine", async () => {
  // Address space capped: mappings and allocations fail long before the per-client quotas.
  engine = await startEngine(
    writeConfig(dir, {
      storage_backends: path.join(dir, "store"),
      endpoint: `ipc://${dir}/e.sock`,
      transferStreamNumber: 2,
      maxRegionsPerClient: 100000,
    }),
    [],
    undefined,
    ["prlimit", "--as=12000000000", "--"],
  );
  const c = engine.client(20000);
  await hello(c);
  const big = new ShmRegion(1 << 30); // sparse: no memory used until touched
  shm.push(big);
  let ok = 0;
  let refused = "";
  for (let i = 0; i < 64 && !refused; i++) {
    try {
      await c.call("register", { regions: Array.from({ length: 4 }, () => ({ medium: "host", source: big.name, size: big.size })) });
      ok += 4;
    } catch (e) {
      refused = (e as Error).message;
    }
  }
  console.log(`address space capped at 12 GB: ${ok} regions of 1 GiB mapped, then: ${refused}`);
  expect(refused).toMatch(/cannot map region|Cannot allocate memory|bad_alloc|std::/);
  expect(engine.proc.exitCode).toBeNull();
  expect((await c.call("health")).status).toBe("serving");
});

test("namespaces: a description is at most 16 KiB, and a client brings at most maxNamespacesPerClient new ones in", async () => {
  const e = await start({ maxNamespacesPerClient: 3 });
  const c = e.client();
  await hello(c);
  await expect(c.call("namespace", { ns: "big", description: { blob: "x".repeat(1 << 20) } })).rejects.toMatchObject({
    code: "too_large",
    message: expect.stringMatching(/description of namespace big is 1048587 bytes as JSON, more than the 16384 allowed/),
  });
  expect(fs.existsSync(path.join(dir, "store", "big"))).toBe(false);
  for (const ns of ["n1", "n2", "n3"]) await c.call("namespace", { ns, description: { model: ns } });
  await c.call("namespace", { ns: "n2", description: { model: "n2" } }); // named again: not new
  await expect(c.call("namespace", { ns: "n4" })).rejects.toMatchObject({
    code: "too_large",
    message: expect.stringMatching(/namespace n4 refused: this client brought 3 new namespaces in already.*maxNamespacesPerClient 3/),
  });
  // A dump into a new namespace counts the same.
  const r = new ShmRegion(4096);
  shm.push(r);
  const id = ((await c.call("register", { regions: [{ medium: "host", source: r.name, size: 4096 }] })).regions as number[])[0];
  await expect(
    c.call("dump", { ns: "n5", keys: [key(0, "ns")], shards: { count: 1, region: [id], offset: [0], length: [4096] } }),
  ).rejects.toThrow(/namespace n5 refused/);
  expect(
    fs
      .readdirSync(path.join(dir, "store"))
      .filter((n) => !n.startsWith("."))
      .sort(),
  ).toEqual(["n1", "n2", "n3"]);
  // Other clients bring their own in; namespaces that exist cost nobody anything.
  const other = e.client();
  await hello(other);
  await other.call("namespace", { ns: "n4" });
  expect((await other.call("lookup", { ns: ["n1", "n4"], keys: [key(0, "ns")] })).found).toEqual([false]);
});

/** The engine's anonymous resident memory (what a message half received takes), bytes. */
function rssAnon(pid: number): number {
  const m = /RssAnon:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) * 1024 : 0;
}

test("a peer that stops halfway through a 32 MiB message is disconnected within heartbeatTimeoutS and what it sent is freed", async () => {
  const e = await start({ heartbeatTimeoutS: 2 });
  // This process holds a session, so the idle rule (idleConnectionS) spares all of its connections.
  const c = e.client();
  await hello(c);
  const before = rssAnon(e.proc.pid!);
  const raw = net.createConnection(e.endpoint.slice("ipc://".length));
  let closedAt = 0;
  raw.on("close", () => (closedAt = Date.now()));
  raw.on("error", () => {});
  let got = 0;
  raw.on("data", (d) => (got += d.length));
  await new Promise((r) => raw.once("connect", r));
  // ZMTP 3.1 by hand: greeting (NULL mechanism), READY as a DEALER, then one frame announcing 32 MiB.
  const greeting = Buffer.alloc(64);
  greeting[0] = 0xff;
  greeting[9] = 0x7f;
  greeting[10] = 3;
  greeting[11] = 1;
  greeting.write("NULL", 12);
  raw.write(greeting);
  const ready = Buffer.concat([Buffer.from([0x04, 28, 5]), Buffer.from("READY"), Buffer.from([11]), Buffer.from("Socket-Type")]);
  raw.write(Buffer.concat([ready, Buffer.from([0, 0, 0, 6]), Buffer.from("DEALER")]));
  const header = Buffer.alloc(9);
  header[0] = 0x02; // a long frame, the last of its message
  header.writeBigUInt64BE(BigInt(32 * 2 ** 20), 1);
  raw.write(header);
  raw.write(crypto.randomBytes(16 * 2 ** 20)); // half of it, then nothing more
  const sent = Date.now();
  expect(await until(() => rssAnon(e.proc.pid!) > before + 12 * 2 ** 20, 10000)).toBe(true);
  expect(got).toBeGreaterThanOrEqual(64); // the engine's greeting: the handshake went through
  expect(await until(() => closedAt > 0, 15000)).toBe(true);
  expect(closedAt - sent).toBeLessThan(12000);
  expect(await until(() => rssAnon(e.proc.pid!) < before + 8 * 2 ** 20, 5000)).toBe(true);
  // The client that answers heartbeats by itself (libzmq does) keeps its session all along.
  expect((await c.call("lookup", { ns: NS, keys: [key(0, "hb")] })).found).toEqual([false]);
  raw.destroy();
}, 60000);

test("a process holds at most maxSessionsPerProcess sessions (16 by default): the next hello is refused, busy, until one ends", async () => {
  const e = await start();
  const clients = Array.from({ length: 17 }, () => e.client(10000));
  for (const c of clients.slice(0, 16)) await hello(c);
  await expect(hello(clients[16])).rejects.toMatchObject({
    code: "busy",
    message: expect.stringMatching(
      new RegExp(`process ${process.pid} already holds 16 sessions, the most allowed \\(maxSessionsPerProcess 16\\)`),
    ),
  });
  await clients[0].call("goodbye");
  expect((await hello(clients[16])).version).toBe(1);
  expect((await clients[1].call("health")).clients).toBe(16);
});

test("a message over 64 MiB is never read: no reply, the connection is dropped, the engine serves on; one just under is answered", async () => {
  const e = await start();
  const c = e.client(60000);
  await hello(c);
  const MiB = 2 ** 20;
  // health is answered whatever else the map holds: only the size decides.
  expect((await c.raw({ op: "health", pad: Buffer.alloc(64 * MiB - 1024) })).ok).toBe(true);
  const big = e.client(5000);
  await expect(big.raw({ op: "health", pad: Buffer.alloc(64 * MiB + 1024) })).rejects.toMatchObject({ code: "timeout" });
  big.close();
  expect((await c.call("health")).status).toBe("serving");
  const rss = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${e.proc.pid}/status`, "utf8"))![1]) * 1024;
  expect(rss).toBeLessThan(1024 * MiB);
}, 60000);
