// The store-health breaker (core/health.ts) on a real engine and a real file
// system that fails: an ext4 on a loop device, remounted read-only under the
// engine so that its block writes fail (EROFS), then read-write again. Once
// healthFailureThreshold of the last healthWindowSize operations failed, the
// store is off: lookups miss and dumps and loads are dropped, at once; once a
// probe can write to the directory again, it is back and serves the same
// bytes. A second case hangs the disk instead (its reads and writes
// throttled to 1 byte/s for the engine): a transfer stuck in the kernel never
// ends, so it counts against the directory once its deadline passes, and the
// probe syncs what it writes, so a page cache that still takes writes does
// not pass for a healthy disk. (A hung NFS server is the NFS suite's "hung
// server" case; through `vllm serve`: bench/hang_bench.py.)
import { execFileSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../core/client";
import { ShmRegion } from "./helpers/fixtures";
import { NS, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";
import { SlowDisk, slowDiskTest } from "./helpers/slow_disk";

const N = 4;
const slots = Array.from({ length: N }, (_, i) => i);

interface Health {
  open: number;
  opens: number;
  shedLookups: number;
  shedDumpBlocks: number;
  shedLoadBlocks: number;
}

describe("store health: a directory that fails turns the store off at once, and on again once it works", () => {
  let disk: SlowDisk | undefined;
  let dir: string;
  let engine: RunningEngine | undefined;
  const shm: ShmRegion[] = [];

  afterAll(async () => {
    if (disk) spawnRw(disk.mnt);
    await engine?.stop("SIGKILL");
    shm.splice(0).forEach((r) => r.unlink());
    disk?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  function spawnRw(mnt: string) {
    try {
      execFileSync("mount", ["-o", "remount,rw", mnt]);
    } catch {
      // already read-write
    }
  }

  /**
   * Waits (up to 2 s) for the engine's log to say `line`. Its log comes through a pipe and its replies through the
   * socket: a reply read may overtake the line the engine wrote before sending it.
   */
  async function said(e: RunningEngine, line: RegExp): Promise<void> {
    await until(`the engine's log says ${line}`, async () => line.test(e.output()), 2000, 20);
  }

  async function health(c: EngineClient): Promise<Health> {
    return (await c.call("stats", {})).health as unknown as Health;
  }

  async function dump(c: EngineClient, src: number[], keys: Buffer[]) {
    const d = await c.call("dump", { ns: NS, keys, shards: shards(src, slots), commit: true });
    return waitDone(c, d.task as number);
  }

  slowDiskTest(
    "read-only remount: two failed dumps open the breaker; lookups, dumps and loads answer at once; a probe closes it",
    async () => {
      disk = new SlowDisk(64);
      dir = shortTmp();
      const store = path.join(disk.mnt, "store");
      fs.mkdirSync(store, { mode: 0o700 });
      engine = await startEngine(
        writeConfig(dir, {
          storage_backends: store,
          endpoint: `ipc://${dir}/e.sock`,
          transferStreamNumber: 2,
          healthCheckIntervalS: 2,
          healthCheckTimeoutS: 1,
          healthWindowSize: 4,
          healthFailureThreshold: 2,
          odirect: false,
        }),
      );
      const c = engine.client();
      await hello(c);
      const src = await regions(c, 2, N, "random", shm);
      const dst = await regions(c, 2, N, "zero", shm);
      const kept = slots.map((i) => key(i, "health-kept"));
      expect((await dump(c, src.ids, kept)).status).toEqual(new Array(N).fill("ok"));
      expect((await c.call("lookup", { ns: NS, keys: kept })).found).toEqual(new Array(N).fill(true));
      expect((await health(c)).open).toBe(0);

      execFileSync("mount", ["-o", "remount,ro", disk.mnt]);
      // Writes fail (EROFS) and count against the directory; lookups answered in time count for it.
      for (let round = 0; round < 4 && (await health(c)).open === 0; round++) {
        const r = await dump(
          c,
          src.ids,
          slots.map((i) => key(i, `health-ro-${round}`)),
        );
        expect(r.status).toEqual(new Array(N).fill("io_error"));
      }
      const opened = await health(c);
      expect(opened.open).toBe(1);
      expect(opened.opens).toBe(1);
      await said(engine, /storage unhealthy: 2 of the last \d operations failed \(last: a block write failed/);

      // Off: nothing waits on the directory, nothing is served from it.
      let t = Date.now();
      expect((await c.call("lookup", { ns: NS, keys: kept })).found).toEqual(new Array(N).fill(false));
      const shedDump = await dump(
        c,
        src.ids,
        slots.map((i) => key(i, "health-off")),
      );
      expect(shedDump.status).toEqual(new Array(N).fill("dropped"));
      const l = await c.call("load", { ns: NS, keys: kept, shards: shards(dst.ids, slots) });
      expect((await waitDone(c, l.task as number)).status).toEqual(new Array(N).fill("dropped"));
      expect(Date.now() - t).toBeLessThan(1000);
      expect(dst.regs.every((r) => r.read().equals(Buffer.alloc(r.size)))).toBe(true);
      const off = await health(c);
      expect(off).toMatchObject({ open: 1, shedLookups: 1, shedDumpBlocks: N, shedLoadBlocks: N });

      // Still read-only: the probes fail and the store stays off.
      await new Promise((r) => setTimeout(r, 4500));
      expect((await health(c)).open).toBe(1);

      // Writable again: the next probe closes the breaker, and the stored blocks come back byte-exact.
      spawnRw(disk.mnt);
      t = Date.now();
      await until("the breaker closes", async () => (await health(c)).open === 0, 10_000, 100);
      expect(Date.now() - t).toBeLessThan(2000 + 1000 + 1500);
      await said(engine, /storage healthy again after \d+\.\d s: the store is used again/);
      expect((await c.call("lookup", { ns: NS, keys: kept })).found).toEqual(new Array(N).fill(true));
      const back = await c.call("load", { ns: NS, keys: kept, shards: shards(dst.ids, slots) });
      expect((await waitDone(c, back.task as number)).status).toEqual(new Array(N).fill("ok"));
      for (let r = 0; r < 2; r++) expect(dst.regs[r].read().equals(src.regs[r].read())).toBe(true);
      // The probe leaves nothing behind.
      expect(fs.readdirSync(store).filter((f) => f.startsWith(".ucm-health-probe"))).toEqual([]);
    },
    60_000,
  );

  slowDiskTest(
    "a hung disk: loads stuck past their deadline open the breaker; probes fail while it hangs; lifted, it serves again",
    async () => {
      const hung = new SlowDisk(64);
      const hdir = shortTmp();
      const store = path.join(hung.mnt, "store");
      fs.mkdirSync(store, { mode: 0o700 });
      const e = await startEngine(
        writeConfig(hdir, {
          storage_backends: store,
          endpoint: `ipc://${hdir}/e.sock`,
          transferStreamNumber: 2,
          healthCheckIntervalS: 2,
          healthCheckTimeoutS: 1,
          healthWindowSize: 8,
          healthFailureThreshold: 2,
        }),
      );
      try {
        hung.admit(e.proc.pid!);
        const c = e.client();
        await hello(c);
        const src = await regions(c, 2, N, "random", shm);
        const dst = await regions(c, 2, N, "zero", shm);
        const kept = slots.map((i) => key(i, "health-hung"));
        expect((await dump(c, src.ids, kept)).status).toEqual(new Array(N).fill("ok"));

        hung.throttle({ readBps: 1, writeBps: 1 });
        // Each load's reads hang in the kernel; its client gives up at the deadline (here: does not wait at all).
        const t0 = Date.now();
        for (let i = 0; i < 2; i++) {
          await c.call("load", { ns: NS, keys: kept, shards: shards(dst.ids, slots), deadline_unix_ms: Date.now() + 500 });
        }
        await until("the breaker opens", async () => (await health(c)).open === 1, 5000, 50);
        expect(Date.now() - t0).toBeLessThan(2500);
        await said(e, /storage unhealthy: 2 of the last \d operations failed \(last: a block read still running at its deadline/);
        // Off: a lookup of stored blocks misses at once; nothing reached the destination.
        const t1 = Date.now();
        expect((await c.call("lookup", { ns: NS, keys: kept })).found).toEqual(new Array(N).fill(false));
        expect(Date.now() - t1).toBeLessThan(500);
        // Still hung: the probe's synced write does not return, so the breaker stays open.
        await new Promise((r) => setTimeout(r, 3000));
        expect((await health(c)).open).toBe(1);

        hung.throttle({ readBps: 0, writeBps: 0 });
        await until("the breaker closes", async () => (await health(c)).open === 0, 10_000, 100);
        expect((await c.call("lookup", { ns: NS, keys: kept })).found).toEqual(new Array(N).fill(true));
        const back = await c.call("load", { ns: NS, keys: kept, shards: shards(dst.ids, slots) });
        expect((await waitDone(c, back.task as number)).status).toEqual(new Array(N).fill("ok"));
        for (let r = 0; r < 2; r++) expect(dst.regs[r].read().equals(src.regs[r].read())).toBe(true);
        // The stuck loads ended when the disk came back; they do not count against it now.
        await new Promise((r) => setTimeout(r, 500));
        expect((await health(c)).opens).toBe(1);
        expect((await health(c)).open).toBe(0);
      } finally {
        hung.throttle({ readBps: 0, writeBps: 0 });
        await e.stop("SIGKILL");
        hung.close();
        fs.rmSync(hdir, { recursive: true, force: true });
      }
    },
    60_000,
  );
});
