// A registered host region's pages are mapped into the engine in the
// background (region.cc), so that a first copy does not fault each of them:
// only the pages the client's memory already has, never its holes (mapping
// a hole of shared memory would allocate it). The real engine process and a
// real shared memory object, watched from outside (/proc, the object's size
// on tmpfs).
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { ShmRegion } from "./helpers/fixtures";
import { RunningEngine, hello, shortTmp, startEngine, writeConfig } from "./helpers/engine";
import { enginePid, residentBytes, residentSettled } from "./helpers/pause";

const MiB = 2 ** 20;
let dir: string;
let engine: RunningEngine | undefined;
const shm: ShmRegion[] = [];

afterEach(async () => {
  await engine?.stop("SIGKILL");
  engine = undefined;
  shm.splice(0).forEach((r) => r.unlink());
  fs.rmSync(dir, { recursive: true, force: true });
});

test("registering maps the pages the client wrote, and allocates none of those it never touched", async () => {
  dir = shortTmp();
  const store = path.join(dir, "store");
  fs.mkdirSync(store);
  engine = await startEngine(writeConfig(dir, { storage_backends: store, endpoint: `ipc://${dir}/e.sock` }));
  const pid = enginePid(engine.output());
  const c = engine.client();
  await hello(c);
  // 256 MiB of which the client wrote the first 64.
  const r = new ShmRegion(256 * MiB);
  shm.push(r);
  r.write(0, crypto.randomBytes(64 * MiB));
  const allocated = () => fs.statSync(r.file).blocks * 512;
  expect(allocated()).toBeLessThan(70 * MiB);
  await residentSettled(pid);
  const before = residentBytes(pid);
  await c.call("register", { regions: [{ medium: "host", source: r.name, size: r.size }] });
  await residentSettled(pid);
  const grown = residentBytes(pid) - before;
  expect(grown).toBeGreaterThan(60 * MiB); // the written part mapped without a transfer touching it
  expect(grown).toBeLessThan(120 * MiB);
  expect(allocated()).toBeLessThan(70 * MiB); // the holes are still holes
});
