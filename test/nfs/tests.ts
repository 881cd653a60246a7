// The NFS suite's tests, each run on NFS 4.2 and on NFS 3 (see suite.ts):
// nodes are mounts of one export with nosharecache, each with its own engine.
import * as fs from "fs";
import * as path from "path";
import { EngineClient } from "../../dist/core/client";
import { runMountBench } from "../../dist/core/mount_bench";
import { blockFileSize } from "../../dist/core/native";
import {
  Ctx,
  Engine,
  KiB,
  Mem,
  MiB,
  T,
  check,
  copySlot,
  dump,
  engineName,
  fio,
  isZero,
  key,
  load,
  lookup,
  mount,
  mountBytes,
  nfsdStats,
  register,
  round,
  sameBlock,
  serverBlocks,
  serverUsage,
  sleep,
  testDir,
  trySh,
  umount,
  zeroSlot,
  now,
  NFS3_WRITE,
  NFS4_OP_ALLOCATE,
  NFS4_OP_WRITE,
  NS,
} from "./harness";

/** Dump, commit, lookup and load across the two nodes, byte for byte, both ways. */
export async function crossNode(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "xnode");
  const cfg = { transferStreamNumber: 4 };
  const A = await t.engine(engineName(ctx, "xnode", "a"), { ...cfg, storage_backends: d.a });
  const B = await t.engine(engineName(ctx, "xnode", "b"), { ...cfg, storage_backends: d.b });
  const ca = await A.client();
  const cb = await B.client();
  const shard = 64 * KiB;
  const n = 32;
  const slots = Array.from({ length: n }, (_, i) => i);
  for (const [from, to, cf, ct, salt] of [
    ["a", "b", ca, cb, "x-ab"],
    ["b", "a", cb, ca, "x-ba"],
  ] as const) {
    const src = await register(t, cf, 2, n, shard, "random");
    const dst = await register(t, ct, 2, n, shard, "zero");
    const keys = slots.map((i) => key(i, `${ctx.tag}-${salt}`));
    // (No lookup on the reader first: a miss would be cached as a negative
    // dentry for up to the attribute cache time; the visibility test measures that.)
    const r = await dump(cf, src, keys, slots);
    check(
      r.status.every((s) => s === "ok"),
      `dump on ${from}: ${r.status.join(",")}`,
    );
    const found = await lookup(ct, keys);
    check(found.every(Boolean), `lookup on ${to} after ${from} committed: ${found.filter(Boolean).length}/${n} found`);
    const l = await load(ct, dst, keys, slots);
    check(
      l.status.every((s) => s === "ok"),
      `load on ${to}: ${l.status.join(",")}`,
    );
    const bad = slots.filter((i) => !sameBlock(src, i, dst, i));
    check(bad.length === 0, `load on ${to}: ${bad.length} block(s) differ from what ${from} dumped`);
  }
  // Both nodes dump the same 8 new blocks at once: one copy lands, the other
  // is skipped or replaced by an identical file; both nodes then read them intact.
  const srcA = await register(t, ca, 2, 8, shard, "random");
  const srcB = await register(t, cb, 2, 8, shard, "zero");
  const eight = slots.slice(0, 8);
  for (const i of eight) copySlot(srcA, i, srcB, i);
  const keys = eight.map((i) => key(i, `${ctx.tag}-x-both`));
  const [ra, rb] = await Promise.all([dump(ca, srcA, keys, eight), dump(cb, srcB, keys, eight)]);
  check(
    [...ra.status, ...rb.status].every((s) => s === "ok" || s === "skipped"),
    `concurrent dumps: ${ra.status} / ${rb.status}`,
  );
  for (const [c, name] of [
    [ca, "a"],
    [cb, "b"],
  ] as const) {
    const dst = await register(t, c, 2, 8, shard, "zero");
    const l = await load(c, dst, keys, eight);
    check(
      l.status.every((s) => s === "ok") && eight.every((i) => sameBlock(srcA, i, dst, i)),
      `node ${name} after concurrent dumps: ${l.status}`,
    );
  }
  fig.blocks_each_way = n;
  fig.block_bytes = 2 * shard;
}

/**
 * A block committed on one node is found on the other within lookupCacheTtlS
 * plus the attribute cache time, and a block found always loads whole. Node B
 * mounts with the default caches (a missing name is cached as a negative
 * dentry until the directory's attributes expire: acdirmin 30 s to acdirmax
 * 60 s); node C with lookupcache=positive (missing names are not cached).
 */
export async function visibility(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "visible");
  const ttl = 5;
  const W = await t.engine(engineName(ctx, "visible", "w"), { storage_backends: d.a, transferStreamNumber: 2 });
  const readers = [
    {
      node: "b",
      mi: ctx.b,
      e: await t.engine(engineName(ctx, "visible", "b"), { storage_backends: d.b, lookupCacheTtlS: ttl, transferStreamNumber: 2 }),
    },
    {
      node: "c",
      mi: ctx.c,
      e: await t.engine(engineName(ctx, "visible", "c"), { storage_backends: d.c, lookupCacheTtlS: ttl, transferStreamNumber: 2 }),
    },
  ];
  const cw = await W.client();
  const shard = 32 * KiB;
  const n = 8;
  const slots = Array.from({ length: n }, (_, i) => i);
  const src = await register(t, cw, 2, n + 1, shard, "random");
  // The namespace's directories exist first (created by the writer's first
  // dump), as they do in a store that is in use.
  const first = await dump(cw, src, [key(0, `${ctx.tag}-vis-first`)], [n]);
  check(first.status[0] === "ok", `first dump: ${first.status}`);
  const keys = slots.map((i) => key(i, `${ctx.tag}-vis`));
  const rs = await Promise.all(
    readers.map(async (r) => {
      const c = await r.e.client();
      const dst = await register(t, c, 2, n, shard, "zero");
      check(
        (await lookup(c, keys)).every((f) => !f),
        `node ${r.node}: found before the commit`,
      );
      return { ...r, c, dst };
    }),
  );
  // Let the readers' view of the directories settle into their caches.
  await sleep(1000);
  const w = await dump(cw, src, keys, slots);
  check(
    w.status.every((s) => s === "ok"),
    `dump: ${w.status}`,
  );
  const tCommit = now();
  const delays = await Promise.all(
    rs.map(async (r) => {
      const bound = (ttl + r.mi.acdirmax + 5) * 1000;
      const seen = new Array<number>(n).fill(-1);
      while (seen.some((s) => s < 0)) {
        check(
          now() - tCommit <= bound,
          `node ${r.node} (${r.mi.opts}): ${seen.filter((s) => s >= 0).length}/${n} blocks found ${bound / 1000} s after the commit`,
        );
        const found = await lookup(r.c, keys);
        const fresh = slots.filter((i) => found[i] && seen[i] < 0);
        if (fresh.length) {
          const at = now() - tCommit;
          // Found means whole: it loads, verified, byte for byte.
          const l = await load(
            r.c,
            r.dst,
            fresh.map((i) => keys[i]),
            fresh,
          );
          check(
            l.status.every((s) => s === "ok"),
            `node ${r.node}: found but the load gave ${l.status}`,
          );
          for (const i of fresh) {
            check(sameBlock(src, i, r.dst, i), `node ${r.node}: block ${i} found, loaded, but differs`);
            seen[i] = at;
          }
        }
        await sleep(250);
      }
      return Math.max(...seen);
    }),
  );
  fig.ttl_s = ttl;
  fig.b_opts = "defaults (acdirmin 30, acdirmax 60)";
  fig.b_found_after_s = round(delays[0] / 1000);
  fig.b_bound_s = ttl + ctx.b.acdirmax + 5;
  fig.c_opts = "lookupcache=positive";
  fig.c_found_after_s = round(delays[1] / 1000);
  check(delays[1] <= 5000, `node c (lookupcache=positive) found the blocks only ${delays[1]} ms after the commit`);
}

/**
 * Node A writes through a full directory (evicting), while node B and A load
 * the oldest blocks: every block is ok with exact bytes or not_found (a miss),
 * never an error or wrong bytes, though files vanish under B's open ones (ESTALE).
 */
export async function evictionRace(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "evict");
  const cfg = { capacity: "16MiB", evictionGraceS: 0, capacitySyncMs: 50, lookupCacheTtlS: 0, transferStreamNumber: 4 };
  const W = await t.engine(engineName(ctx, "evict", "a"), { ...cfg, storage_backends: d.a });
  const R = await t.engine(engineName(ctx, "evict", "b"), { ...cfg, storage_backends: d.b });
  const cw = await W.client();
  const cr = await R.client();
  const shard = 32 * KiB;
  const total = 400; // 400 x 68 KiB = 27 MiB through a 16 MiB directory
  const src = await register(t, cw, 2, total, shard, "random");
  const dsts: Array<[EngineClient, Mem]> = [
    [cr, await register(t, cr, 2, total, shard, "zero")],
    [cr, await register(t, cr, 2, total, shard, "zero")],
    [cw, await register(t, cw, 2, total, shard, "zero")],
  ];
  const keys = Array.from({ length: total }, (_, i) => key(i, `${ctx.tag}-evict`));
  let written = 0;
  let writing = true;
  const tally: Record<string, number> = {};
  let stale = 0;
  let wrong = 0;
  const loader = async (c: EngineClient, dst: Mem) => {
    while (writing) {
      if (written < 16) {
        await sleep(20);
        continue;
      }
      const hi = written;
      const pick = [...new Set(Array.from({ length: 16 }, () => Math.floor(Math.random() * Math.min(hi, Math.max(64, hi / 2)))))];
      const l = await load(
        c,
        dst,
        pick.map((i) => keys[i]),
        pick,
      );
      l.status.forEach((s, j) => {
        tally[s] = (tally[s] ?? 0) + 1;
        if (s === "not_found" && l.errno[j] === 116) stale++;
        const i = pick[j];
        if (s === "ok" && !sameBlock(src, i, dst, i)) wrong++;
        if (s !== "ok" && !isZero(dst, i)) wrong++; // a failed block must leave memory alone
        zeroSlot(dst, i);
      });
    }
  };
  const loaders = dsts.map(([c, m]) => loader(c, m));
  for (let i = 0; i < total; i += 8) {
    const idx = Array.from({ length: 8 }, (_, j) => i + j);
    await dump(
      cw,
      src,
      idx.map((j) => keys[j]),
      idx,
    );
    written = i + 8;
  }
  writing = false;
  await Promise.all(loaders);
  const s = await cw.call("stats");
  const evicted = (s.capacity as Array<{ evictedFiles: number }>)[0].evictedFiles;
  Object.assign(fig, { loads: tally, not_found_with_estale: stale, evicted_by_a: evicted, wrong_blocks: wrong });
  check(wrong === 0, `${wrong} block(s) loaded with wrong bytes, or memory written by a failed block`);
  check(
    Object.keys(tally).every((k) => k === "ok" || k === "not_found"),
    `statuses other than ok/not_found: ${JSON.stringify(tally)}`,
  );
  check((tally.ok ?? 0) > 0, "no block loaded at all");
  check(evicted > 0, "nothing was evicted: the race did not happen");
  check(serverUsage(d.server).bytes <= 16 * MiB, "directory above its capacity at the end");
  const errs = [W, R].flatMap((e) =>
    e
      .output()
      .split("\n")
      .filter((l) => /\[E\]/.test(l)),
  );
  check(errs.length === 0, `engine error lines: ${errs.slice(0, 3).join(" | ")}`);
}

/**
 * Two engines on two nodes share one capacity: the usage ledger's fcntl
 * locks go over NFS (NFSv4 locks, or NLM through lockd and statd for NFS 3).
 */
export async function sharedCapacity(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "capacity");
  const capacity = 64 * MiB;
  const cfg = { capacity: "64MiB", evictionGraceS: 0, capacitySyncMs: 50, transferStreamNumber: 4 };
  const A = await t.engine(engineName(ctx, "capacity", "a"), { ...cfg, storage_backends: d.a });
  const B = await t.engine(engineName(ctx, "capacity", "b"), { ...cfg, storage_backends: d.b });
  let peak = 0;
  let sampling = true;
  let samples = 0;
  const sampler = (async () => {
    while (sampling) {
      peak = Math.max(peak, serverUsage(d.server).bytes);
      samples++;
      await sleep(20);
    }
  })();
  const shard = 64 * KiB;
  const write = async (e: Engine, salt: string) => {
    const c = await e.client();
    const m = await register(t, c, 2, 8, shard, "random");
    let stored = 0;
    for (let batch = 0; batch < 60; batch++) {
      const keys = Array.from({ length: 8 }, (_, j) => key(batch * 8 + j, `${ctx.tag}-cap-${salt}`));
      stored += (await dump(c, m, keys, [0, 1, 2, 3, 4, 5, 6, 7])).status.filter((s) => s === "ok").length;
    }
    return { c, stored };
  };
  const [ra, rb] = await Promise.all([write(A, "a"), write(B, "b")]);
  sampling = false;
  await sampler;
  await sleep(500); // a ledger sync or two
  const final = serverUsage(d.server);
  const stats = await Promise.all([ra.c.call("stats"), rb.c.call("stats")]);
  const cap = stats.map((s) => (s.capacity as Array<{ evictedFiles: number; ledgerErrors: number }>)[0]);
  await A.stop();
  await B.stop();
  const [, , lb, lf] = fs
    .readFileSync(path.join(d.server, ".ucm", "usage"), "utf8")
    .trim()
    .split(" ");
  const after = serverUsage(d.server);
  Object.assign(fig, {
    stored: ra.stored + rb.stored,
    written_mib: round((960 * (4096 + 2 * shard)) / MiB),
    capacity_mib: 64,
    peak_mib: round(peak / MiB),
    final_mib: round(final.bytes / MiB),
    samples,
    evicted: cap[0].evictedFiles + cap[1].evictedFiles,
    ledger_errors: cap[0].ledgerErrors + cap[1].ledgerErrors,
    ledger_mib: round(Number(lb) / MiB),
    ledger_files: Number(lf),
    scanned_files: after.blocks,
    ledger_ahead_mib: round((Number(lb) - after.bytes) / MiB, 2),
  });
  check(
    cap[0].ledgerErrors + cap[1].ledgerErrors === 0,
    `ledger errors (a lock or ledger update over NFS failed): ${cap[0].ledgerErrors} + ${cap[1].ledgerErrors}`,
  );
  // An engine learns the other's commits at its next ledger sync, so the
  // directory may pass its capacity by what the other committed since: a few
  // blocks locally (test/capacity.test.ts allows 5 %), more over NFS, where a
  // sync is several round trips under a lock (each lock attempt one), and
  // longer still when the host running the guest is busy: 63.9 to 70.5 MiB
  // measured in a 64 MiB directory.
  check(
    peak <= capacity * 1.15,
    `peak ${round(peak / MiB)} MiB above the 64 MiB capacity (+15 % for the other engine's commits between two ledger syncs)`,
  );
  check(final.bytes <= capacity, `final ${round(final.bytes / MiB)} MiB above the capacity`);
  check(cap[0].evictedFiles + cap[1].evictedFiles > 0, "nothing evicted");
  // The ledger may run ahead of the directory: a dump that an eviction
  // pass's scan already counted, and whose ledger update lands after the
  // pass started, is counted twice until the next pass (more likely over NFS,
  // where a scan takes longer). That errs on the safe side (evicting a little
  // early); a ledger behind the directory lets it overflow until the next
  // pass. Two faults made it worse, both fixed in native/src/capacity.cc's
  // Scan on 2026-12-05: commits renamed during a scan were counted twice (in
  // .tmp and under their key), and a scan listed directories from its node's
  // cache of them, missing files the other node had committed (their ledger
  // updates already in the pass's `before`), so the ledger fell behind (0.39,
  // 3.0 and 7.35 MiB in three of ten runs; 2.6 to 6.8 MiB ahead in the
  // others). After both: 0 to 3.35 MiB ahead in ten runs, never behind. The
  // peak and final checks above bound what the drift costs; these bound it.
  // Behind: only by directories grown since the last scan (kilobytes).
  check(
    Number(lb) >= after.bytes - capacity * 0.02,
    `ledger says ${lb} bytes, behind the directory's ${after.bytes} by more than 2 % of the capacity`,
  );
  // Lost updates (no working lock) would scatter it either way; the double
  // counting above stays within what the engines have in flight during a pass.
  check(Number(lb) - after.bytes <= capacity * 0.15, `ledger says ${lb} bytes, the directory holds ${after.bytes}`);
}

/** Temporary files under `store` (the server's view), and how many are shorter than a whole block file of `full` bytes. */
function serverTemps(store: string, full: number): { all: number; torn: number } {
  const tmp = path.join(store, NS, ".tmp");
  let all = 0;
  let torn = 0;
  for (const f of fs.existsSync(tmp) ? fs.readdirSync(tmp) : []) {
    try {
      const size = fs.statSync(path.join(tmp, f)).size;
      all++;
      if (size < full) torn++;
    } catch {
      // removed meanwhile
    }
  }
  return { all, torn };
}

/**
 * SIGKILL of node A's engine while its block files are being written: node
 * B never sees a partial block, and the next engine on node A removes the
 * torn temporary files. The loopback is slowed to 2 Mbit/s (netem) once some
 * dumps have landed, so the kill always finds writes in flight, however
 * fast the guest runs.
 */
export async function sigkill(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "sigkill");
  const A = await t.engine(engineName(ctx, "sigkill", "a"), { storage_backends: d.a, transferStreamNumber: 8 });
  const B = await t.engine(engineName(ctx, "sigkill", "b"), { storage_backends: d.b, lookupCacheTtlS: 0, transferStreamNumber: 4 });
  const ca = await A.client();
  const cb = await B.client();
  const shard = 128 * KiB;
  const total = 256;
  const src = await register(t, ca, 2, total, shard, "random");
  const keys = Array.from({ length: total }, (_, i) => key(i, `${ctx.tag}-kill`));
  // Dumps in flight from four lanes, killed once some have landed.
  let next = 0;
  let tasks = 0;
  const lane = async () => {
    while (next < total) {
      const idx = Array.from({ length: 8 }, (_, j) => next + j).filter((i) => i < total);
      next += 8;
      try {
        await dump(
          ca,
          src,
          idx.map((i) => keys[i]),
          idx,
        );
        tasks++;
      } catch {
        return; // the engine is gone
      }
    }
  };
  const lanes = [lane(), lane(), lane(), lane()];
  const full = blockFileSize(2 * shard);
  while (tasks < 6 && next < total) await sleep(20);
  check(next < total, "every dump landed before the network was slowed");
  check(trySh("modprobe", ["sch_netem"]).ok, "modprobe sch_netem failed");
  const tc = trySh("tc", ["qdisc", "replace", "dev", "lo", "root", "netem", "rate", "2mbit", "limit", "100000"]);
  check(tc.ok, `tc netem on lo: ${tc.out}`);
  let inFlight: { all: number; torn: number };
  try {
    const t1 = now();
    while ((inFlight = serverTemps(d.server, full)).torn === 0 && now() - t1 < 30_000) await sleep(50);
    A.proc.kill("SIGKILL");
    await A.exited;
  } finally {
    trySh("tc", ["qdisc", "del", "dev", "lo", "root"]);
  }
  for (const c of A.clients) c.close();
  await Promise.allSettled(lanes);
  const visible = serverBlocks(d.server);
  const left = serverTemps(d.server, full);
  const temps = left.all;
  const partial = [...visible.values()].filter((s) => s !== full).length;
  // Every block B finds loads whole and exact.
  const dst = await register(t, cb, 2, total, shard, "zero");
  const all = keys.map((_, i) => i);
  const found = await lookup(cb, keys);
  const hit = all.filter((i) => found[i]);
  const l = hit.length
    ? await load(
        cb,
        dst,
        hit.map((i) => keys[i]),
        hit,
      )
    : { status: [] as string[] };
  const bad = hit.filter((i, j) => l.status[j] !== "ok" || !sameBlock(src, i, dst, i));
  // A restarted engine on node A removes the dead engine's temporary files.
  const A2 = await t.engine(engineName(ctx, "sigkill", "a2"), { storage_backends: d.a, transferStreamNumber: 2 });
  const t0 = now();
  while (serverUsage(d.server).temps > 0 && now() - t0 < 30_000) await sleep(250);
  const tempsAfter = serverUsage(d.server).temps;
  Object.assign(fig, {
    dump_tasks_done_before_kill: tasks,
    visible: visible.size,
    partial_visible: partial,
    found_by_b: hit.length,
    bad_on_b: bad.length,
    torn_temp_files_at_kill: inFlight.torn,
    temp_files_left: temps,
    torn_temp_files_left: left.torn,
    temp_files_after_restart: tempsAfter,
  });
  await A2.stop();
  check(visible.size > 0, "no block committed before the kill");
  check(partial === 0, `${partial} committed block file(s) of the wrong size`);
  check(hit.length === visible.size, `node b found ${hit.length} blocks, the server holds ${visible.size}`);
  check(bad.length === 0, `${bad.length} block(s) found on node b did not load exact`);
  // The kill came while a write was on its way (a temporary file shorter than a block on the server). It may
  // still end whole: write RPCs the client had sent complete on the server after the process is gone.
  check(inFlight.torn > 0, `no torn temporary file on the server in 30 s of slowed writes: no write was in flight at the kill`);
  check(tempsAfter === 0, `${tempsAfter} temporary file(s) of the killed engine left 30 s after the restart`);
}

/**
 * O_DIRECT over NFS: with odirect on (the default) every block file is
 * written and read with O_DIRECT, as the NFS client's own byte counters of
 * the mount show (direct bytes, no buffered ones); with it off, buffered. The
 * engine logs nothing about it. Each engine has a mount of its own here.
 */
export async function odirect(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  testDir(ctx, "odirect");
  const shard = 512 * KiB;
  const n = 4;
  const file = blockFileSize(2 * shard);
  const slots = Array.from({ length: n }, (_, i) => i);
  for (const on of [true, false]) {
    const where = `/mnt/nfs/${ctx.tag}-odirect-${on ? "on" : "off"}`;
    mount(ctx.vers, where, ["nosharecache"]);
    try {
      const e = await t.engine(engineName(ctx, "odirect", on ? "on" : "off"), {
        storage_backends: path.join(where, ctx.tag, "odirect"),
        odirect: on,
        transferStreamNumber: 2,
      });
      const c = await e.client();
      const src = await register(t, c, 2, n, shard, "random");
      const dst = await register(t, c, 2, n, shard, "zero");
      const keys = slots.map((i) => key(i, `${ctx.tag}-odirect-${on}`));
      const before = mountBytes(where);
      const w = await dump(c, src, keys, slots);
      check(
        w.status.every((s) => s === "ok"),
        `dump (odirect ${on}): ${w.status}`,
      );
      const l = await load(c, dst, keys, slots);
      check(l.status.every((s) => s === "ok") && slots.every((i) => sameBlock(src, i, dst, i)), `load (odirect ${on}): ${l.status}`);
      const after = mountBytes(where);
      const delta = {
        direct_write: after.directWrite - before.directWrite,
        direct_read: after.directRead - before.directRead,
        buffered_write: after.normalWrite - before.normalWrite,
        buffered_read: after.normalRead - before.normalRead,
      };
      fig[on ? "odirect_on" : "odirect_off"] = delta;
      const noise = e
        .output()
        .split("\n")
        .filter((x) => /O_DIRECT|EINVAL|\[W\]|\[E\]/.test(x));
      check(noise.length === 0, `engine (odirect ${on}) logged: ${noise.join(" | ")}`);
      if (on) {
        check(
          delta.direct_write >= n * file && delta.direct_read >= n * file,
          `odirect on: ${JSON.stringify(delta)} (block files ${n} x ${file} bytes)`,
        );
        check(
          delta.buffered_write < file && delta.buffered_read < file,
          `odirect on, yet block bytes went through the page cache: ${JSON.stringify(delta)}`,
        );
      } else {
        check(
          delta.buffered_write >= n * file && delta.direct_write === 0 && delta.direct_read === 0,
          `odirect off: ${JSON.stringify(delta)}`,
        );
      }
      await e.stop();
    } finally {
      umount(where);
    }
  }
  fig.block_file_bytes = file;
  fig.fallback_log_lines = 0;
}

/**
 * Creating a block file writes its bytes once: no preallocation on NFS (not
 * even NFS 4.2's ALLOCATE: a round trip per block for nothing), never
 * glibc's posix_fallocate emulation (a byte written into every block of the
 * file first). Counted on the server: bytes written and WRITE calls.
 */
export async function singleWrite(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "onewrite");
  const e = await t.engine(engineName(ctx, "onewrite", "a"), { storage_backends: d.a, transferStreamNumber: 4 });
  const c = await e.client();
  const shard = 2 * MiB;
  const n = 8;
  const slots = Array.from({ length: n }, (_, i) => i);
  const src = await register(t, c, 2, n, shard, "random");
  // The namespace directories and ledger first, so only block files follow.
  await dump(c, src, [key(99, "warm")], [0]);
  await sleep(1200);
  const before = nfsdStats();
  const r = await dump(
    c,
    src,
    slots.map((i) => key(i, `${ctx.tag}-onewrite`)),
    slots,
  );
  check(
    r.status.every((s) => s === "ok"),
    `dump: ${r.status}`,
  );
  const after = nfsdStats();
  const file = blockFileSize(2 * shard);
  const wsize = Number(/wsize=(\d+)/.exec(ctx.a.opts)?.[1] ?? 1048576);
  const bytes = after.writeBytes - before.writeBytes;
  const writes = ctx.vers === "3" ? after.v3[NFS3_WRITE] - before.v3[NFS3_WRITE] : after.v4ops[NFS4_OP_WRITE] - before.v4ops[NFS4_OP_WRITE];
  const allocs = ctx.vers === "3" ? 0 : after.v4ops[NFS4_OP_ALLOCATE] - before.v4ops[NFS4_OP_ALLOCATE];
  const perFile = Math.ceil(file / wsize);
  Object.assign(fig, {
    blocks: n,
    file_bytes: file,
    wsize,
    server_bytes_written: bytes,
    write_calls: writes,
    write_calls_expected: n * perFile,
    allocate_calls: allocs,
  });
  // The ledger's line may be written meanwhile (a few dozen bytes per sync).
  check(bytes >= n * file && bytes <= n * file + 64 * KiB, `server wrote ${bytes} bytes for ${n} files of ${file}`);
  check(writes <= n * perFile + 20, `${writes} WRITE calls for ${n} files of ${perFile} wsize pieces each`);
  // On NFS the engine does not preallocate at all: on 4.2 an ALLOCATE would be one more synchronous round trip
  // per block for nothing (the server places the data itself).
  check(allocs === 0, `${allocs} ALLOCATE calls for ${n} files (the engine should not preallocate on NFS)`);
}

/**
 * The engine's mount benchmark (runMountBench: the code behind `ucm-engine
 * bench --dir`, called directly for figures finer than its table's) beside
 * fio, on the same mount in the same run: same I/O size (one block file per
 * I/O), threads and O_DIRECT; reads cold. Under TCG every byte costs emulated
 * CPU, the engine's checksum and copies included, so the guest's loopback is
 * made a link of 100 Mbit/s with 0.5 ms round trips (netem): the network is
 * the bottleneck, as on a real NFS deployment. Two rounds, each the engine
 * then fio; the better figure of each side counts (a burst of load on the
 * host running the guest can starve one round). Asserts >= 90 % of fio both
 * ways; the figures without the link limit are kept too.
 */
export async function bench(ctx: Ctx, t: T): Promise<void> {
  const fig = t.fig;
  const d = testDir(ctx, "bench");
  const blockBytes = 16 * MiB; // QwQ-32B at TP=2, block size 128: ucm-engine bench's default
  const threads = 4;
  const blocks = 8;
  const file = blockFileSize(blockBytes);
  const measure = async () => {
    const r = await runMountBench({
      dir: d.a,
      blockBytes,
      shards: 128,
      totalBytes: blocks * blockBytes,
      threads,
      odirect: true,
      progress: null,
    });
    check(r.failed === 0, `ucm bench: ${r.failed} failed block(s)`);
    const f = fio(path.join(d.a, "fio"), file, blocks, threads);
    return {
      ucm_dump_MBps: round(r.dumpGBps * 1000),
      ucm_load_MBps: round(r.loadGBps * 1000),
      fio_write_MBps: round(f.writeMBps),
      fio_read_MBps: round(f.readMBps),
    };
  };
  type M = Awaited<ReturnType<typeof measure>>;
  const ratios = (m: M) => ({
    ...m,
    dump_pct: round((100 * m.ucm_dump_MBps) / m.fio_write_MBps, 0),
    load_pct: round((100 * m.ucm_load_MBps) / m.fio_read_MBps, 0),
  });
  const best = (ms: M[]): M => ({
    ucm_dump_MBps: Math.max(...ms.map((m) => m.ucm_dump_MBps)),
    ucm_load_MBps: Math.max(...ms.map((m) => m.ucm_load_MBps)),
    fio_write_MBps: Math.max(...ms.map((m) => m.fio_write_MBps)),
    fio_read_MBps: Math.max(...ms.map((m) => m.fio_read_MBps)),
  });
  fig.shape = `${blocks} x ${blockBytes / MiB} MiB blocks of 128 shards, ${threads} threads, O_DIRECT; fio bs=${file} numjobs=${threads} direct=1 psync`;
  fig.cpu_bound = ratios(await measure()); // emulated CPU is the limit: figures only
  const rate = "100mbit";
  check(trySh("modprobe", ["sch_netem"]).ok, "modprobe sch_netem failed");
  const tc = trySh("tc", ["qdisc", "replace", "dev", "lo", "root", "netem", "delay", "250us", "rate", rate, "limit", "100000"]);
  check(tc.ok, `tc netem on lo: ${tc.out}`);
  try {
    const rounds = [await measure(), await measure()];
    const linked = ratios(best(rounds));
    fig.link = `${rate}, 0.5 ms round trips`;
    fig.link_rounds = rounds.map(ratios);
    fig.link_limited = linked;
    check(linked.dump_pct >= 90, `dump ${linked.ucm_dump_MBps} MB/s is ${linked.dump_pct} % of fio's ${linked.fio_write_MBps} MB/s`);
    check(linked.load_pct >= 90, `load ${linked.ucm_load_MBps} MB/s is ${linked.load_pct} % of fio's ${linked.fio_read_MBps} MB/s`);
  } finally {
    trySh("tc", ["qdisc", "del", "dev", "lo", "root"]);
  }
}
