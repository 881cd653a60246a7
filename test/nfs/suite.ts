// The NFS suite: runs inside the QEMU guest that test/nfs/run.sh boots (as
// root, chrooted into the host's root; guest.sh has started a kernel NFS
// server exporting a tmpfs at /srv/export over loopback). It drives the
// project's built engine (dist/core/cli.js serve) through its ZeroMQ
// protocol, on the real Linux NFS client: for NFS 4.2 and NFS 3, mounts of
// the same export with nosharecache stand for nodes (separate attribute,
// dentry and page caches), each with its own engine. /srv/export is the
// server's own view of the files, the ground truth no client cache hides.
//
//   node .test-tmp/nfs/snap/test/nfs/suite.js --out <dir> --export /srv/export [--mode all|vers=3,only=bench+hung]
//   node .test-tmp/nfs/snap/test/nfs/suite.js --report <dir> <elapsed s>   (host: summary, "N passed, N failed")
//
// run.sh compiles it into .test-tmp/nfs/snap/test/nfs/, beside the copy of the
// built engine (dist/, native/build) that it takes, so "../.." is that copy.
//
// The tests: tests.ts (each on NFS 4.2 and NFS 3: xnode, visible, evict,
// capacity, sigkill, odirect, onewrite, bench), hung.ts (one server outage
// for hard and soft mounts of both versions); harness.ts runs them.
//
// Results: <out>/results.jsonl (one line per test, written as it ends),
// <out>/figures.json, engine logs in <out>/engines/.
import * as fs from "fs";
import * as path from "path";
import { Ctx, T, Vers, log, mount, now, report, results, setOut, sleep, test, umount } from "./harness";
import { hungServer } from "./hung";
import { bench, crossNode, evictionRace, odirect, sharedCapacity, sigkill, singleWrite, visibility } from "./tests";

const TESTS = ["xnode", "visible", "evict", "capacity", "sigkill", "odirect", "onewrite", "bench"] as const;

async function runVersion(vers: Vers, exportDir: string, only: Set<string> | null): Promise<void> {
  const tag = `v${vers}`;
  const want = (t: string) => !only || only.has(t);
  fs.rmSync(path.join(exportDir, tag), { recursive: true, force: true });
  fs.mkdirSync(path.join(exportDir, tag), { recursive: true });
  let ctx: Ctx;
  try {
    ctx = {
      vers,
      tag,
      a: mount(vers, `/mnt/nfs/${tag}-a`, []),
      b: mount(vers, `/mnt/nfs/${tag}-b`, ["nosharecache"]),
      c: mount(vers, `/mnt/nfs/${tag}-c`, ["nosharecache", "lookupcache=positive"]),
      exportDir,
    };
  } catch (e) {
    await test(`${tag} mounts`, 1000, async () => {
      throw e;
    });
    return;
  }
  // The server's grace period (NFSv4: no new opens or locks) ends before anything is timed.
  const t0 = now();
  for (const m of [ctx.a, ctx.b]) {
    const f = path.join(m.where, tag, `.warm-${path.basename(m.where)}`);
    fs.writeFileSync(f, "x");
    fs.rmSync(f);
  }
  log(`${tag}: mounted (${ctx.a.opts}); first create took ${now() - t0} ms`);
  const run = (name: string, timeoutMs: number, fn: (ctx: Ctx, t: T) => Promise<void>) =>
    test(`${tag} ${name}`, timeoutMs, (t) => fn(ctx, t));
  // The visibility test waits for attribute caches to expire (up to a minute):
  // it runs beside the next tests, and ends before the benchmark.
  const vis = want("visible") ? run("visible", 150_000, visibility) : Promise.resolve(true);
  await sleep(200);
  if (want("xnode")) await run("xnode", 120_000, crossNode);
  if (want("evict")) await run("evict", 240_000, evictionRace);
  if (want("capacity")) await run("capacity", 240_000, sharedCapacity);
  if (want("sigkill")) await run("sigkill", 180_000, sigkill);
  if (want("odirect")) await run("odirect", 120_000, odirect);
  await vis;
  if (want("onewrite")) await run("onewrite", 120_000, singleWrite);
  if (want("bench")) await run("bench", 300_000, bench);
  for (const m of [ctx.a, ctx.b, ctx.c]) umount(m.where);
}

async function main(argv: string[]): Promise<number> {
  const arg = (k: string, d?: string) => {
    const i = argv.indexOf(`--${k}`);
    return i >= 0 ? argv[i + 1] : d;
  };
  if (argv.includes("--report")) return report(arg("report")!, Number(argv[argv.indexOf("--report") + 2] ?? 0));
  const out = arg("out", "/mnt/out")!;
  setOut(out);
  const exportDir = arg("export", "/srv/export")!;
  const mode = arg("mode", "all")!;
  fs.mkdirSync(path.join(out, "engines"), { recursive: true });
  // mode: "all", or comma-separated "vers=3", "only=bench+hung"
  const flags = new Map(mode.split(",").map((f) => [f.split("=")[0], f.split("=")[1] ?? ""] as [string, string]));
  const versions: Vers[] = flags.has("vers") ? (flags.get("vers")!.split("+") as Vers[]) : ["4.2", "3"];
  const only = flags.has("only") ? new Set(flags.get("only")!.split("+")) : null;
  log(
    `suite: NFS ${versions.join(" and ")}${only ? `, only ${[...only].join(" ")}` : ""}; node ${process.version}; tests ${TESTS.join(" ")} hung`,
  );
  const tStart = now();
  for (const v of versions) await runVersion(v, exportDir, only);
  if (!only || only.has("hung")) {
    await test("hung server", 420_000, (t) => hungServer(exportDir, versions, t));
  }
  const passed = results.filter((r) => r.ok).length;
  log(`suite done in ${((now() - tStart) / 1000).toFixed(0)} s: ${passed} passed, ${results.length - passed} failed`);
  return results.length - passed === 0 ? 0 : 1;
}

// A test that timed out leaves its work running until its engines stop; what
// fails in it then is no longer anybody's result.
process.on("unhandledRejection", (e) => log(`(late failure of a finished test: ${(e as Error)?.message ?? String(e)})`));

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    log(`suite crashed: ${e.stack ?? e.message}`);
    process.exit(2);
  },
);
