// What operators see: the Prometheus endpoint, `ucm-engine stats` and
// `ucm-engine bench --dir`.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as http from "http";
import * as net from "net";
import * as path from "path";
import { diskTempDir } from "./helpers/fixtures";
import { hello, runCli, shortTmp } from "./helpers/engine";
import { NS, engine, engines, finish, key, register, shards, stopEnginesAfterEach } from "./helpers/capacity_kit";

stopEnginesAfterEach();

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function get(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on("error", reject);
  });
}

describe("metrics and operator tools", () => {
  test("the Prometheus endpoint (localhost, when configured) exports what the engine did", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const port = await freePort();
    const e = await engine(dir, "m", { storage_backends: store, metricsPort: port, capacity: "1GiB" });
    expect(e.output()).toContain(`metrics on http://127.0.0.1:${port}/metrics`);
    const c = e.client();
    await hello(c);
    const m = await register(c, 2, 4, 8192, "random");
    const keys = Array.from({ length: 4 }, (_, i) => key(i, "metrics"));
    await finish(c, (await c.call("dump", { ns: NS, keys, shards: shards(m, [0, 1, 2, 3]), commit: true })).task);
    await c.call("lookup", { ns: NS, keys: [...keys, key(99, "metrics")] });
    await finish(c, (await c.call("load", { ns: NS, keys, shards: shards(m, [0, 1, 2, 3]) })).task);
    await expect(c.call("frobnicate", {})).rejects.toThrow(/unknown op/);
    await expect(c.call("toString", {})).rejects.toThrow(/unknown op/);
    const r = await get(`http://127.0.0.1:${port}/metrics`);
    expect(r.status).toBe(200);
    const value = (line: string) => {
      const m2 = new RegExp(`^${line.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(r.body);
      return m2 ? Number(m2[1]) : undefined;
    };
    expect(value('ucm_bytes_total{direction="dump"}')).toBe(4 * 2 * 8192);
    expect(value('ucm_bytes_total{direction="load"}')).toBe(4 * 2 * 8192);
    expect(value('ucm_blocks_total{direction="dump",result="stored"}')).toBe(4);
    expect(value('ucm_lookup_keys_total{result="miss"}')).toBeGreaterThanOrEqual(1);
    expect(value('ucm_task_duration_seconds_count{direction="load"}')).toBe(1);
    expect(value(`ucm_capacity_bytes{backend="0"}`)).toBe(2 ** 30);
    expect(value(`ucm_capacity_used_blocks{backend="0"}`)).toBe(4);
    // Requests by op: what a client asked of the engine (a made-up op is refused and adds no key or label).
    const requests = (await c.call("stats", {})).requests as Record<string, number>;
    expect(requests).toMatchObject({ hello: 1, register: 1, dump: 1, lookup: 1, load: 1, stats: 1 });
    expect(Object.keys(requests)).not.toContain("frobnicate");
    expect(Object.keys(requests)).not.toContain("toString");
    expect(value('ucm_requests_total{op="lookup"}')).toBe(1);
    expect(value('ucm_requests_total{op="dump"}')).toBe(1);
    expect(value('ucm_requests_total{op="frobnicate"}')).toBeUndefined();
    // Every local user can read a tcp port: the figures name no path (the store's would lead to the runtime
    // directory's name, a digest of it).
    expect(r.body).not.toContain(dir);
    for (const name of [
      "ucm_queue_depth",
      "ucm_inflight_bytes",
      "ucm_storage_busy_seconds_total",
      "ucm_storage_wait_seconds_total",
      "ucm_evicted_blocks_total",
      "ucm_dropped_writes_total",
      "ucm_errors_total",
      "ucm_process_resident_memory_bytes",
    ]) {
      expect(r.body).toContain(`# TYPE ${name}`);
    }
    expect((await get(`http://127.0.0.1:${port}/other`)).status).toBe(404);
  }, 30000);

  test("metrics on a unix socket the operator names: mode 0600, only the engine's user reads it, removed at stop", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const sock = path.join(dir, "run", "metrics.sock");
    const e = await engine(dir, "u", { storage_backends: store, metricsSocket: sock });
    expect(e.output()).toContain(`metrics on unix:${sock} (GET /metrics; mode 0600)`);
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(sock)).mode & 0o777).toBe(0o700);
    const r = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      http
        .get({ socketPath: sock, path: "/metrics" }, (res) => {
          let body = "";
          res.on("data", (d) => (body += d));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
        })
        .on("error", reject);
    });
    expect(r.status).toBe(200);
    expect(r.body).toContain('ucm_capacity_used_blocks{backend="0"} 0');
    expect(r.body).not.toContain(dir);
    if (process.getuid!() === 0) {
      // Another user (nobody) is refused by the socket's mode, whatever the directory lets through.
      fs.chmodSync(dir, 0o755);
      fs.chmodSync(path.dirname(sock), 0o755);
      const code = `require("http").get({ socketPath: ${JSON.stringify(sock)}, path: "/metrics" }, () => process.exit(0)).on("error", (e) => { console.log(e.code); process.exit(3); });`;
      const other = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, "-e", code], {
        encoding: "utf8",
      });
      expect({ status: other.status, out: other.stdout.trim() }).toEqual({ status: 3, out: "EACCES" });
    }
    await e.stop();
    engines.splice(0);
    expect(fs.existsSync(sock)).toBe(false);
  }, 30000);

  test("ucm-engine stats prints the figures as a table (--json for machines)", async () => {
    const dir = shortTmp();
    const store = path.join(dir, "store");
    fs.mkdirSync(store);
    const e = await engine(dir, "s", { storage_backends: store, capacity: "1GiB" });
    const table = await runCli(["stats", "--endpoint", e.endpoint]);
    expect(table.code).toBe(0);
    for (const row of ["lookups", "dumped", "loaded", "storage", "dropped writes", "in flight", `capacity ${store}`, "errors"])
      expect(table.out).toContain(row);
    expect(table.out).toContain("0 B in 0 blocks of 1.00 GiB (0.0%)");
    expect(table.out).toMatch(/cache stage\s+off \(hostCacheBytes 0\)/);
    const json = await runCli(["stats", "--endpoint", e.endpoint, "--json"]);
    expect(JSON.parse(json.out).capacity[0].capacity).toBe(2 ** 30);
  }, 30000);

  test("ucm-engine bench --dir measures a mount with the engine's I/O path and leaves nothing behind", async () => {
    const dir = diskTempDir("bench-");
    try {
      const r = await runCli(["bench", "--dir", dir, "--gib", "0.03", "--block-mib", "1", "--shards", "8", "--threads", "4"], 60000);
      expect(r.code).toBe(0);
      expect(r.out).toMatch(/dump \(write \+ rename\)\s+\d+\.\d+ GB\/s, storage busy \d+ % of the time/);
      expect(r.out).toMatch(/load \(read \+ verify\)\s+\d+\.\d+ GB\/s, storage busy \d+ %/);
      expect(r.out).toMatch(/lookup, 1 key\s+p50 \d+ us/);
      expect(r.out).toMatch(/failed blocks\s+0/);
      expect(r.out).toMatch(/load: 31\/31 blocks/); // progress
      expect(fs.readdirSync(dir)).toEqual([]);
      const bad = await runCli(["bench"]);
      expect(bad.code).toBe(2);
      expect(bad.out).toContain("--dir <path> is required");
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 90000);
});
