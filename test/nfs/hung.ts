// The hung server: rpc.nfsd stopped while engines on hard and soft mounts of
// both versions load (one outage for all of them). See suite.ts.
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../../dist/core/client";
import {
  Figures,
  KiB,
  NS,
  T,
  TaskResult,
  Vers,
  check,
  dump,
  finish,
  isZero,
  key,
  load,
  log,
  lookup,
  mount,
  now,
  register,
  round,
  sameBlock,
  shards,
  sleep,
  trySh,
  umount,
  within,
} from "./harness";

interface HungMount {
  label: string;
  vers: Vers;
  opts: string[];
}

const HUNG_MOUNTS: HungMount[] = [
  { label: "4.2-hard", vers: "4.2", opts: ["hard"] },
  { label: "3-hard", vers: "3", opts: ["hard"] },
  { label: "4.2-soft", vers: "4.2", opts: ["soft", "timeo=20", "retrans=2"] },
  { label: "3-soft", vers: "3", opts: ["soft", "timeo=20", "retrans=2"] },
  { label: "4.2-soft-fast", vers: "4.2", opts: ["soft", "timeo=5", "retrans=1"] },
  { label: "3-soft-fast", vers: "3", opts: ["soft", "timeo=5", "retrans=1"] },
];

/**
 * rpc.nfsd is stopped while each engine loads: lookups and loads resolve as
 * misses within the client's deadlines (clientTimeoutMs 5 s for a request,
 * loadTimeoutMs then cancel for a load, as the Python shim does), `health`
 * keeps answering, a cancelled load never writes memory later, and every
 * engine serves again once the server is back.
 */
export async function hungServer(exportDir: string, versions: Vers[], t: T): Promise<void> {
  const fig = t.fig;
  const outageMs = 30_000;
  const clientTimeoutMs = 5000;
  const loadTimeoutMs = 10_000;
  const shard = 64 * KiB;
  const n = 8;
  const slots = Array.from({ length: n }, (_, i) => i);
  const chosen = HUNG_MOUNTS.filter((m) => versions.includes(m.vers));
  const nodes = await Promise.all(
    chosen.map(async (hm) => {
      const where = `/mnt/nfs/hung-${hm.label}`;
      const mi = mount(hm.vers, where, ["nosharecache", ...hm.opts]);
      const rel = path.join("hung", hm.label);
      fs.rmSync(path.join(exportDir, rel), { recursive: true, force: true });
      fs.mkdirSync(path.join(exportDir, rel), { recursive: true });
      const e = await t.engine(`hung-${hm.label}`, {
        storage_backends: path.join(where, rel),
        transferStreamNumber: 4,
        loadTimeoutMs,
        clientTimeoutMs,
      });
      const c = await e.client(clientTimeoutMs);
      const probe = new EngineClient(e.endpoint, 2000); // operators' health probe
      e.clients.push(probe);
      const src = await register(t, c, 2, n, shard, "random");
      const dst = await register(t, c, 2, n, shard, "zero");
      const seen = slots.map((i) => key(i, `hung-${hm.label}-seen`));
      const unseen = slots.map((i) => key(i, `hung-${hm.label}-unseen`));
      // Set-up, before the outage: six engines start and make their first dump at once in an emulated guest; one such
      // dump was once answered later than the 5 s the outage's requests are held to (CI, 2026-12-05).
      const w = await dump(c, src, seen, slots, true, 60_000);
      check(
        w.status.every((s) => s === "ok"),
        `${hm.label}: dump before the outage: ${w.status}`,
      );
      check((await lookup(c, seen)).every(Boolean), `${hm.label}: lookup before the outage`);
      // A patient client (no deadline of its own): when does the engine itself answer?
      const pc = await e.client(600_000);
      const pdst = await register(t, pc, 2, n, shard, "zero");
      const unseen2 = slots.map((i) => key(i, `hung-${hm.label}-unseen2`));
      return {
        hm,
        mi,
        e,
        c,
        probe,
        src,
        dst,
        seen,
        unseen,
        unseen2,
        pc,
        pdst,
        where,
        fig: {} as Figures,
        patient: [] as Array<Promise<void>>,
      };
    }),
  );
  const health = nodes.map(() => ({ max: 0, total: 0, failed: 0, count: 0 }));
  let probing = true;
  const probes = nodes.map(async (nd, i) => {
    while (probing) {
      const t = now();
      try {
        await nd.probe.call("health", {}, 2000);
        health[i].max = Math.max(health[i].max, now() - t);
        health[i].total += now() - t;
      } catch {
        health[i].failed++;
      }
      health[i].count++;
      await sleep(500);
    }
  });
  log(`hung server: stopping rpc.nfsd for ${outageMs / 1000} s`);
  const t0 = now();
  check(trySh("rpc.nfsd", ["0"]).ok, "rpc.nfsd 0 failed");
  let restarted: boolean;
  let back = Infinity; // when the server came back
  try {
    await sleep(1000);
    const when = (ms: number) =>
      `${round(ms / 1000)} s after the server stopped (${ms < back - t0 ? "during the outage" : "after it came back"})`;
    for (const nd of nodes) {
      const f = nd.fig;
      nd.patient.push(
        lookup(nd.pc, nd.unseen2, 600_000).then(
          (found) => void (f.engine_answered_lookup = `${when(now() - t0)}: ${found.filter(Boolean).length}/${n} found`),
          (e: Error) => void (f.engine_answered_lookup = `${when(now() - t0)}: error ${e.message.slice(0, 60)}`),
        ),
        nd.pc
          .call("load", { ns: NS, keys: nd.seen, shards: shards(nd.pdst, slots) })
          .then((l) => finish(nd.pc, l.task, 600_000))
          .then(
            (r) => {
              f.engine_answered_load = `${when(now() - t0)}: ${[...new Set(r.status)].join(",")}`;
              if (r.status.some((st, j) => st === "ok" && !sameBlock(nd.src, slots[j], nd.pdst, slots[j])))
                f.patient_load_wrong_bytes = true;
            },
            (e: Error) => void (f.engine_answered_load = `${when(now() - t0)}: error ${e.message.slice(0, 60)}`),
          ),
      );
    }
    // During the outage, per node: a load of stored blocks (client: wait up
    // to loadTimeoutMs, then cancel), lookups of blocks never seen and of
    // blocks this engine has seen, each with the client's deadline.
    await Promise.all(
      nodes.map(async (nd) => {
        const f = nd.fig;
        const ld = await nd.c.call("load", { ns: NS, keys: nd.seen, shards: shards(nd.dst, slots) });
        const tl = now();
        const lk = async (keys: Buffer[], what: string) => {
          const t = now();
          try {
            const found = await lookup(nd.c, keys, clientTimeoutMs);
            f[`lookup_${what}`] = `answered in ${now() - t} ms: ${found.filter(Boolean).length}/${keys.length} found`;
          } catch (e) {
            f[`lookup_${what}`] = `no answer: a miss at the client's ${clientTimeoutMs} ms deadline (${(e as Error).message.slice(0, 40)})`;
          }
          // The engine answers by itself within lookupTimeoutMs (1 s by default): what the filesystem did not say
          // in time is a miss, well before the client's deadline.
          check(now() - t <= 2500, `${nd.hm.label}: lookup of ${what} blocks took ${now() - t} ms (lookupTimeoutMs 1000)`);
        };
        await Promise.all([lk(nd.unseen, "unseen"), lk(nd.seen, "seen")]);
        // Lookups the filesystem did not answer (this client's and the patient one's) open the store-health
        // breaker (healthFailureThreshold 2): from then on a lookup is a miss at once, not after lookupTimeoutMs,
        // and nothing new waits on the server.
        const tb = now();
        let open = 0;
        while (open !== 1 && now() - tb < 5000) {
          open = ((await nd.probe.call("stats", {}, 2000)).health as { open: number }).open;
          if (open !== 1) await sleep(100);
        }
        f.breaker_opened = open === 1;
        check(open === 1, `${nd.hm.label}: the store-health breaker did not open during the outage`);
        const tq = now();
        const late = await lookup(nd.c, [key(0, `hung-${nd.hm.label}-late`)], clientTimeoutMs);
        f.lookup_breaker_open_ms = now() - tq;
        check(!late[0] && now() - tq < 500, `${nd.hm.label}: a lookup with the breaker open took ${now() - tq} ms`);
        const w = (await nd.c.call(
          "wait",
          { task: ld.task, timeout_ms: Math.max(1, loadTimeoutMs - (now() - tl)) },
          loadTimeoutMs + 5000,
        )) as unknown as TaskResult;
        if (w.done) {
          f.load = `answered in ${now() - tl} ms: ${w.status.join(",")}`;
          check(
            w.status.every((s) => s !== "ok") || slots.every((i, j) => w.status[j] !== "ok" || sameBlock(nd.src, i, nd.dst, i)),
            `${nd.hm.label}: wrong bytes`,
          );
          f.cancelled = false;
        } else {
          const tc = now();
          const cr = await nd.c.call("cancel", { task: ld.task }, 10_000);
          f.load = `not done at the client's ${loadTimeoutMs} ms deadline; cancel answered in ${now() - tc} ms (cancelled ${String(cr.cancelled)})`;
          f.cancelled = true;
          check(now() - tc <= 5500, `${nd.hm.label}: cancel took ${now() - tc} ms`);
        }
      }),
    );
    const left = outageMs - (now() - t0);
    if (left > 0) await sleep(left);
  } finally {
    log("hung server: restarting rpc.nfsd");
    restarted = trySh("rpc.nfsd", ["8"]).ok;
    back = now();
  }
  check(restarted, "rpc.nfsd 8 failed");
  const tBack = back;
  // Recovery: a fresh dump and a load of the stored blocks, byte-exact.
  await Promise.all(
    nodes.map(async (nd) => {
      const fresh = [key(0, `hung-${nd.hm.label}-after`)];
      const chk = await register(t, nd.c, 2, n, shard, "zero");
      for (;;) {
        check(now() - tBack < 180_000, `${nd.hm.label}: not serving 180 s after the server came back`);
        try {
          const w = await dump(nd.c, nd.src, fresh, [0]);
          const l = await load(nd.c, chk, nd.seen, slots);
          if ((w.status[0] === "ok" || w.status[0] === "skipped") && l.status.every((s) => s === "ok")) {
            check(
              slots.every((s) => sameBlock(nd.src, s, chk, s)),
              `${nd.hm.label}: wrong bytes after recovery`,
            );
            nd.fig.recovered_after_s = round((now() - tBack) / 1000);
            break;
          }
        } catch {
          // not yet: a request past the client's deadline
        }
        await sleep(1000);
      }
    }),
  );
  await sleep(3000); // reads stuck in the outage have finished by now
  await within(60_000, "the patient requests", Promise.all(nodes.flatMap((nd) => nd.patient)));
  probing = false;
  await Promise.all(probes);
  nodes.forEach((nd, i) => {
    const f = nd.fig;
    f.health = `${health[i].count} probes, mean ${Math.round(health[i].total / Math.max(1, health[i].count - health[i].failed))} ms, max ${health[i].max} ms, ${health[i].failed} unanswered within 2 s`;
    f.engine_alive = nd.e.alive;
    if (f.cancelled) f.memory_untouched_after_cancel = slots.every((s) => isZero(nd.dst, s));
    fig[nd.hm.label] = {
      mount: nd.mi.opts
        .split(",")
        .filter((o) => /^(vers|hard|soft|softerr|timeo|retrans)/.test(o))
        .join(","),
      ...f,
    };
  });
  fig.outage_s = outageMs / 1000;
  for (const [i, nd] of nodes.entries()) {
    check(nd.e.alive, `${nd.hm.label}: the engine died`);
    // Blocked, the event loop would miss the 2 s deadline for the whole
    // outage; a single slow answer is the emulated CPU (six engines on two).
    check(health[i].failed === 0, `${nd.hm.label}: health ${JSON.stringify(health[i])}`);
    if (nd.fig.cancelled)
      check(nd.fig.memory_untouched_after_cancel === true, `${nd.hm.label}: a cancelled load wrote memory after the server came back`);
    check(!nd.fig.patient_load_wrong_bytes, `${nd.hm.label}: a load that waited out the outage gave wrong bytes`);
  }
  await Promise.all(nodes.map((nd) => nd.e.stop("SIGTERM", 30_000)));
  for (const nd of nodes) umount(nd.where);
}
