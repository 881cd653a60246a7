// The engine process over its life: exiting when idle, the seed's task line,
// the settings it reports.
import * as fs from "fs";
import * as path from "path";
import { ShmRegion } from "./helpers/fixtures";
import { NS, key, regions, shards, waitDone } from "./helpers/blocks";
import { hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";

describe("lifecycle", () => {
  test("--exit-when-idle: the engine exits 0 once no client has had a session for that long, not before", async () => {
    const dir = shortTmp();
    fs.mkdirSync(path.join(dir, "store"));
    const e = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock` }), [
      "--exit-when-idle",
      "2",
    ]);
    try {
      const c = e.client();
      const h = await hello(c);
      expect((h.engine as Record<string, unknown>).build).toMatch(/^[0-9a-f]{16}$/);
      await new Promise((r) => setTimeout(r, 3000));
      expect(e.proc.exitCode).toBeNull(); // a session is open
      await c.call("goodbye");
      const t0 = Date.now();
      expect(await e.exited).toBe(0);
      expect(Date.now() - t0).toBeLessThan(5000);
      expect(e.output()).toMatch(/no client for 2 s: exiting \(started with --exit-when-idle\)/);
    } finally {
      await e.stop("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a finished task's result carries the seed's line, for the client to log", async () => {
    const dir = shortTmp();
    fs.mkdirSync(path.join(dir, "store"));
    const e = await startEngine(writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock` }));
    const track: ShmRegion[] = [];
    try {
      const c = e.client();
      await hello(c);
      const src = await regions(c, 1, 2, "random", track);
      const d = await c.call("dump", { ns: NS, keys: [key(1, "ln"), key(2, "ln")], shards: shards(src.ids, [0, 1]), commit: true });
      const r = await waitDone(c, d.task as number);
      expect((r as unknown as { line: string }).line).toBe(/Task\(\d+,D2S,2,\d+\) finished, elapsed [\d.]+s/.exec(e.output())![0]);
    } finally {
      track.forEach((x) => x.unlink());
      await e.stop("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

test("health and hello report every effective setting, keyed as in the YAML", async () => {
  const dir = shortTmp();
  fs.mkdirSync(path.join(dir, "store"));
  const e = await startEngine(
    writeConfig(dir, {
      storage_backends: path.join(dir, "store"),
      endpoint: `ipc://${dir}/e.sock`,
      transferStreamNumber: 7,
      maxInflightBytes: "1GiB",
    }),
  );
  try {
    const c = e.client();
    const h = await c.call("health");
    const st = h.settings as Record<string, unknown>;
    expect(st).toMatchObject({ transferStreamNumber: 7, maxInflightBytes: 2 ** 30, odirect: true, capacity: [0], cudaCopy: "batch" });
    expect(st).not.toHaveProperty("storageBackends");
    expect(st).not.toHaveProperty("endpoint");
    expect(((await hello(c)).engine as Record<string, unknown>).settings).toEqual(st);
  } finally {
    await e.stop("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
