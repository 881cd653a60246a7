// What a client, or another user of the machine, can make the engine touch
// (docs/reliability.md, threat model): only shared memory of the engine's
// own user, only over a socket that user alone can reach, and no directory
// of anyone else changed. Cases that need a second user run as root with
// uid 65534 (nobody) and are skipped, with a message, otherwise.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import * as zmq from "zeromq";
import { EngineClient } from "../core/client";
import { curveKeyFile } from "../core/curve";
import { ShmRegion } from "./helpers/fixtures";
import { RunningEngine, freePort, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
const asRoot = isRoot ? test : test.skip;
if (!isRoot) console.log("security.test.ts: not root, the cases with a second user are skipped");
const NOBODY = 65534;

let dir: string;
let engine: RunningEngine | undefined;
const cleanup: string[] = [];

beforeEach(() => {
  dir = shortTmp();
  fs.mkdirSync(path.join(dir, "store"));
});
afterEach(async () => {
  await engine?.stop("SIGKILL");
  engine = undefined;
  cleanup.splice(0).forEach((f) => fs.rmSync(f, { recursive: true, force: true }));
  fs.rmSync(dir, { recursive: true, force: true });
});

async function start(extra: Record<string, unknown> = {}): Promise<RunningEngine> {
  engine = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock`, ...extra }));
  return engine;
}

async function register(c: EngineClient, source: string, size = 4096) {
  return c.call("register", { regions: [{ medium: "host", source, size }] });
}

describe("a region is only shared memory of the engine's own user", () => {
  test("files outside shared memory are refused: /etc/passwd, a disk file through /proc/<pid>/fd", async () => {
    const c = (await start()).client();
    await hello(c);
    await expect(register(c, "/etc/passwd", 16)).rejects.toMatchObject({
      code: "bad_message",
      message: expect.stringMatching(/is not shared memory/),
    });
    await expect(register(c, "/etc/shadow", 16)).rejects.toThrow(/is not shared memory/);
    const disk = path.join(dir, "disk-file");
    fs.writeFileSync(disk, Buffer.alloc(8192));
    const fd = fs.openSync(disk, "r+");
    try {
      await expect(register(c, `/proc/${process.pid}/fd/${fd}`)).rejects.toThrow(/is not in shared memory \(tmpfs or hugetlbfs\)/);
    } finally {
      fs.closeSync(fd);
    }
  });

  test("shared memory through /proc/<pid>/fd works for the client's own process only", async () => {
    const c = (await start()).client();
    await hello(c);
    const r = new ShmRegion(8192);
    cleanup.push(r.file);
    const fd = fs.openSync(r.file, "r+");
    try {
      expect((await register(c, `/proc/${process.pid}/fd/${fd}`)).regions).toHaveLength(1);
      await expect(register(c, `/proc/${process.ppid}/fd/0`)).rejects.toThrow(/names another process's file descriptor/);
    } finally {
      fs.closeSync(fd);
    }
  });

  test("no symbolic links, no FIFOs (refused at once, never waited on), no path tricks", async () => {
    const c = (await start()).client();
    await hello(c);
    const link = `/dev/shm/ucm-sec-link-${process.pid}`;
    const fifo = `/dev/shm/ucm-sec-fifo-${process.pid}`;
    cleanup.push(link, fifo);
    fs.symlinkSync("/etc/passwd", link);
    await expect(register(c, link, 16)).rejects.toThrow(/cannot open region.*(symbolic links|Too many levels)/);
    await expect(register(c, `/ucm-sec-link-${process.pid}`, 16)).rejects.toThrow(/cannot open region/);
    expect(spawnSync("mkfifo", [fifo]).status).toBe(0);
    const t0 = Date.now();
    await expect(register(c, fifo, 16)).rejects.toThrow(/not a regular shared memory object/);
    expect(Date.now() - t0).toBeLessThan(2000);
    await expect(register(c, "/dev/shm/../../etc/passwd", 16)).rejects.toThrow(/is not shared memory/);
  });

  asRoot("shared memory of another user is refused", async () => {
    const c = (await start()).client();
    await hello(c);
    const r = new ShmRegion(8192);
    cleanup.push(r.file);
    fs.chownSync(r.file, NOBODY, NOBODY);
    await expect(register(c, r.name, 8192)).rejects.toThrow(new RegExp(`belongs to uid ${NOBODY}, not to the engine's user \\(0\\)`));
  });
});

describe("tcp endpoints speak CURVE with a key only the engine's user can read", () => {
  test("a client with the published key is served; one without it gets nothing", async () => {
    const port = await freePort();
    const ep = `tcp://127.0.0.1:${port}`;
    const e = await start({ endpoint: ep });
    const keyFile = curveKeyFile(ep);
    cleanup.push(keyFile);
    expect(e.output()).toContain(`public key in ${keyFile}`);
    expect(fs.statSync(keyFile).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(keyFile)).mode & 0o022).toBe(0);
    const c = e.client();
    expect((await hello(c)).version).toBe(1);

    const plain = new zmq.Dealer({ linger: 0, receiveTimeout: 1500 });
    plain.connect(ep);
    await plain.send(Buffer.from([0x81, 0xa2, 0x6f, 0x70, 0xa6, 0x68, 0x65, 0x61, 0x6c, 0x74, 0x68])); // {"op":"health"}
    await expect(plain.receive()).rejects.toThrow();
    plain.close();
    if (isRoot) {
      const r = spawnSync("setpriv", [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "cat", keyFile], { encoding: "utf8" });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/Permission denied/);
    }
    // The key goes with the engine: a stale one would only send clients to whoever takes the port next.
    expect(await e.stop("SIGTERM")).toBe(0);
    engine = undefined;
    expect(fs.existsSync(keyFile)).toBe(false);
  });
});

describe("directories of others are never changed", () => {
  test("an existing socket directory keeps its mode; one that others can write is refused", async () => {
    const shared = path.join(dir, "shared");
    fs.mkdirSync(shared, { mode: 0o755 });
    fs.chmodSync(shared, 0o755);
    const e = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${shared}/e.sock` }));
    engine = e;
    expect((await e.client().call("health")).status).toBe("serving");
    expect(fs.statSync(shared).mode & 0o7777).toBe(0o755);
    expect(fs.statSync(dir).mode & 0o7777).toBe(0o700);
    await e.stop("SIGTERM");
    engine = undefined;

    fs.chmodSync(shared, 0o777);
    await expect(
      startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${shared}/e.sock` })),
    ).rejects.toThrow(/socket directory .*shared is writable by other users \(mode 777\) without the sticky bit/);
    expect(fs.statSync(shared).mode & 0o7777).toBe(0o777);
  });

  test("a socket directly in a sticky world-writable directory such as /tmp is refused, and that directory left as it was", async () => {
    const sticky = path.join(dir, "tmplike");
    fs.mkdirSync(sticky);
    fs.chmodSync(sticky, 0o1777);
    await expect(
      startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${sticky}/x.sock` })),
    ).rejects.toThrow(/socket directory .*tmplike is writable by other users \(mode 1777, sticky like \/tmp\): any of them could bind/);
    expect(fs.statSync(sticky).mode & 0o7777).toBe(0o1777);
    expect(fs.readdirSync(sticky)).toEqual([]);
  });
});

test("a client's name cannot forge log lines", async () => {
  const e = await start({ logLevel: "debug" });
  const c = e.client();
  await c.call("hello", { version: 1, pid: process.pid, name: "evil\n[UCMNFSSTORE] [I] Task(1,D2S,1,1) finished, elapsed 0.1s" });
  await c.call("goodbye");
  await until("the release line", () => / released/.test(e.output()));
  expect(e.output()).toMatch(/client evil\?\[UCMNFSSTORE\] \[I\] Task\(1,D2S,1,1\) finished, elapsed 0\.1s \(pid \d+\) released/);
  expect(
    e
      .output()
      .split("\n")
      .filter((l) => l.startsWith("[UCMNFSSTORE] [I] Task(")),
  ).toEqual([]);
});

describe("the store: only the engine's own directories, no symbolic links, private files", () => {
  const NS = "sec-model";
  async function dumpOne(e: RunningEngine, ns = NS) {
    const c = e.client();
    await hello(c);
    const r = new ShmRegion(8192, "random");
    cleanup.push(r.file);
    const id = ((await register(c, r.name, 8192)).regions as number[])[0];
    const k = Buffer.alloc(32, 7);
    const d = await c.call("dump", { ns, keys: [k], shards: { count: 1, region: [id], offset: [0], length: [8192] }, commit: true });
    return { c, d: await c.call("wait", { task: d.task, timeout_ms: 10000 }), k };
  }

  test("block files 0600 and directories 0700 by default; 0660 and 02770 with shareWithGroup", async () => {
    const e = await start();
    const { d } = await dumpOne(e);
    expect(d.status).toEqual(["ok"]);
    const nsDir = path.join(dir, "store", NS);
    const fan = fs.readdirSync(nsDir).find((f) => /^[0-9a-f]{2}$/.test(f) && fs.readdirSync(path.join(nsDir, f)).length > 0)!;
    const file = path.join(nsDir, fan, fs.readdirSync(path.join(nsDir, fan))[0]);
    expect(fs.statSync(file).mode & 0o7777).toBe(0o600);
    expect(fs.statSync(nsDir).mode & 0o7777).toBe(0o700);
    expect(fs.statSync(path.join(nsDir, ".tmp")).mode & 0o7777).toBe(0o700);
    expect(fs.statSync(path.join(dir, "store", ".ucm", "usage")).mode & 0o777).toBe(0o600);
    await e.stop("SIGTERM");
    engine = undefined;

    const shared = path.join(dir, "shared");
    fs.mkdirSync(shared);
    fs.chmodSync(shared, 0o2770);
    const g = await startEngine(writeConfig(dir, { storage_backends: shared, endpoint: `ipc://${dir}/g.sock`, shareWithGroup: true }));
    engine = g;
    expect((await dumpOne(g)).d.status).toEqual(["ok"]);
    const gns = path.join(shared, NS);
    expect(fs.statSync(gns).mode & 0o7777).toBe(0o2770);
    const gfan = fs.readdirSync(gns).find((f) => /^[0-9a-f]{2}$/.test(f) && fs.readdirSync(path.join(gns, f)).length > 0)!;
    expect(fs.statSync(path.join(gns, gfan, fs.readdirSync(path.join(gns, gfan))[0])).mode & 0o777).toBe(0o660);
  });

  test("a store writable by others is refused, naming the directory and the fix", async () => {
    const open_ = path.join(dir, "open");
    fs.mkdirSync(open_);
    fs.chmodSync(open_, 0o777);
    await expect(startEngine(writeConfig(dir, { storage_backends: open_, endpoint: `ipc://${dir}/o.sock` }))).rejects.toThrow(
      /open.* is writable by every user \(mode 777\); chmod o-w it/,
    );
    fs.chmodSync(open_, 0o775);
    await expect(startEngine(writeConfig(dir, { storage_backends: open_, endpoint: `ipc://${dir}/o.sock` }))).rejects.toThrow(
      /is writable by its group \(mode 775\); chmod g-w it, or set shareWithGroup: true/,
    );
  });

  asRoot("a store that belongs to another user is refused", async () => {
    const theirs = path.join(dir, "theirs");
    fs.mkdirSync(theirs, { mode: 0o755 });
    fs.chownSync(theirs, NOBODY, NOBODY);
    await expect(startEngine(writeConfig(dir, { storage_backends: theirs, endpoint: `ipc://${dir}/t.sock` }))).rejects.toThrow(
      new RegExp(`theirs.* belongs to uid ${NOBODY}, not to the engine's user \\(0\\)`),
    );
  });

  test("symbolic links planted in the store are never followed: namespace, .tmp, fan-out directory, ledger", async () => {
    const victim = path.join(dir, "victim");
    fs.mkdirSync(victim);
    fs.writeFileSync(path.join(victim, "precious"), "keep me");
    fs.mkdirSync(path.join(victim, "00"));
    fs.writeFileSync(path.join(victim, "00", "a".repeat(64)), "keep me too");
    const store = path.join(dir, "store");
    // A namespace that is a link elsewhere: refused, nothing written there.
    fs.symlinkSync(victim, path.join(store, "linked-ns"));
    // A namespace whose .tmp is a link: refused too.
    fs.mkdirSync(path.join(store, "tmp-ns"));
    fs.symlinkSync(victim, path.join(store, "tmp-ns", ".tmp"));
    // The ledger file a link to a file of someone else.
    fs.mkdirSync(path.join(store, ".ucm"));
    const ledgerTarget = path.join(dir, "not-a-ledger");
    fs.writeFileSync(ledgerTarget, "untouched");
    fs.symlinkSync(ledgerTarget, path.join(store, ".ucm", "usage"));
    const e = await start({ capacity: "64MiB", capacitySyncMs: 50 });
    for (const [ns, link] of [
      ["linked-ns", "linked-ns"],
      ["tmp-ns", "tmp-ns/.tmp"],
    ]) {
      await expect(dumpOne(e, ns)).rejects.toThrow(
        new RegExp(`^${path.join(dir, "store", link)} is not a directory \\(a symbolic link\\?\\): refusing to use it: Not a directory$`),
      );
    }
    // A good namespace still works; eviction and the orphan sweep run; the victim is untouched.
    expect((await dumpOne(e, "good-ns")).d.status).toEqual(["ok"]);
    await new Promise((r) => setTimeout(r, 500));
    expect(fs.readFileSync(path.join(victim, "precious"), "utf8")).toBe("keep me");
    expect(fs.readFileSync(path.join(victim, "00", "a".repeat(64)), "utf8")).toBe("keep me too");
    expect(fs.readdirSync(victim).sort()).toEqual(["00", "precious"]);
    expect(fs.readFileSync(ledgerTarget, "utf8")).toBe("untouched");
  });
});
