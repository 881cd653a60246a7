// Blocks that are dumped and never committed: a live client's are discarded
// once uncommittedTimeoutS has passed; temporary files of engines that are
// gone are swept when an engine starts: a dead writer's on this host at
// once, another host's only when older than twice uncommittedTimeoutS
// (core/pending_commits.ts, core/orphans.ts).
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { ShmRegion } from "./helpers/fixtures";
import { NS, key, regions, shards, waitDone } from "./helpers/blocks";
import { RunningEngine, hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

let dir: string;
let store: string;
let engine: RunningEngine | undefined;
const shm: ShmRegion[] = [];

beforeEach(() => {
  dir = shortTmp();
  store = path.join(dir, "store");
  fs.mkdirSync(store);
});
afterEach(async () => {
  await engine?.stop("SIGKILL");
  engine = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

async function start(extra: Record<string, unknown>): Promise<RunningEngine> {
  engine = await startEngine(
    writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock`, transferStreamNumber: 2, ...extra }),
  );
  return engine;
}

const tmp = () => path.join(store, NS, ".tmp");

test("a dumped block nobody commits within uncommittedTimeoutS is discarded; one committed in time stays", async () => {
  const e = await start({ uncommittedTimeoutS: 1 });
  const c = e.client();
  await hello(c);
  const src = await regions(c, 1, 3, "random", shm);
  const late = [key(0, "late"), key(1, "late")];
  const kept = key(2, "late");
  expect(
    (await waitDone(c, (await c.call("dump", { ns: NS, keys: late, shards: shards(src.ids, [0, 1]) })).task as number)).status,
  ).toEqual(["ok", "ok"]);
  await waitDone(c, (await c.call("dump", { ns: NS, keys: [kept], shards: shards(src.ids, [2]), commit: true })).task as number);
  expect(fs.readdirSync(tmp())).toHaveLength(2);
  // The engine looks for stale blocks every 10 s.
  await until(
    "the stale blocks discarded",
    () => /discarded 2 dumped block\(s\) of client jest .*never committed within 1s/.test(e.output()),
    40000,
  );
  await until("their temporary files removed", () => fs.readdirSync(tmp()).length === 0);
  expect((await c.call("commit", { ns: NS, keys: late })).committed).toEqual([false, false]);
  expect((await c.call("lookup", { ns: NS, keys: [...late, kept] })).found).toEqual([false, false, true]);
  expect((await c.call("stats")).discards).toBe(2);
}, 60000);

test("at start, temporary files of dead writers on this host and of other hosts' writers older than twice uncommittedTimeoutS are swept; the rest are kept", async () => {
  fs.mkdirSync(tmp(), { recursive: true, mode: 0o700 });
  const host = os.hostname().replace(/[^A-Za-z0-9-]/g, "_");
  const exited = spawnSync(process.execPath, ["-e", "console.log(process.pid)"], { encoding: "utf8" });
  const deadPid = Number(exited.stdout.trim());
  const hex = key(7, "orphan").toString("hex");
  const files = {
    otherHostOld: `${hex}.elsewhere-4242-m1abc.1`,
    otherHostNew: `${hex}.elsewhere-4242-m1abc.2`,
    deadWriter: `${hex}.${host}-${deadPid}-m1abc.3`,
    liveWriter: `${hex}.${host}-${process.pid}-m1abc.4`,
  };
  for (const f of Object.values(files)) fs.writeFileSync(path.join(tmp(), f), Buffer.alloc(4096));
  const hourAgo = new Date(Date.now() - 3600_000);
  fs.utimesSync(path.join(tmp(), files.otherHostOld), hourAgo, hourAgo);
  fs.utimesSync(path.join(tmp(), files.liveWriter), hourAgo, hourAgo); // age does not matter on this host: the pid does
  const e = await start({ uncommittedTimeoutS: 60 }); // other hosts' files are abandoned after 120 s
  await until("the start-up sweep", () => /removed 2 temporary block file\(s\) left by engines that are gone/.test(e.output()));
  expect(fs.readdirSync(tmp()).sort()).toEqual([files.otherHostNew, files.liveWriter].sort());
});
