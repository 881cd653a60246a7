// A config file the engine cannot serve stops it at startup, with the key path
// and the value it got; the seed's YAML, as written, starts it.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { ShmRegion } from "./helpers/fixtures";
import { key } from "./helpers/blocks";
import { hello, runCli, shortTmp, startEngine, writeConfig } from "./helpers/engine";

describe("config errors stop startup with the key path and the value", () => {
  let dir: string;
  beforeAll(() => {
    dir = shortTmp();
    fs.mkdirSync(path.join(dir, "s1"));
    fs.mkdirSync(path.join(dir, "s2"));
    fs.writeFileSync(path.join(dir, "afile"), "");
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  const cases: Array<[string, () => unknown, RegExp]> = [
    ["missing storage_backends", () => ({ transferStreamNumber: 4 }), /ucm_connector_config.storage_backends is required/],
    ["missing directory", () => ({ storage_backends: `${dir}/nope` }), /storage_backends: directory ".*\/nope" does not exist/],
    ["a file, not a directory", () => ({ storage_backends: `${dir}/afile` }), /is not a directory/],
    ["unwritable directory", () => ({ storage_backends: "/proc/1" }), /directory "\/proc\/1" is not writable/],
    [
      "transferStreamNumber 0",
      () => ({ storage_backends: `${dir}/s1`, transferStreamNumber: 0 }),
      /transferStreamNumber must be between 1 and 1024, got 0/,
    ],
    [
      "transferStreamNumber 100000",
      () => ({ storage_backends: `${dir}/s1`, transferStreamNumber: 100000 }),
      /transferStreamNumber must be between 1 and 1024, got 100000/,
    ],
    [
      "transferStreamNumber as a string",
      () => ({ storage_backends: `${dir}/s1`, transferStreamNumber: "32" }),
      /transferStreamNumber must be an integer, got "32"/,
    ],
    ["odirect as a number", () => ({ storage_backends: `${dir}/s1`, odirect: 1 }), /odirect must be true or false, got 1/],
    [
      "bad endpoint",
      () => ({ storage_backends: `${dir}/s1`, endpoint: "tcp://0.0.0.0:5555" }),
      /endpoint must be ipc:\/\/<absolute path> or tcp:\/\/127.0.0.1:<port>, got "tcp:\/\/0.0.0.0:5555"/,
    ],
    ["an empty backend in a colon list", () => ({ storage_backends: `${dir}/s1::${dir}/s2` }), /empty directory at position 1/],
    ["a missing backend in a colon list", () => ({ storage_backends: `${dir}/s1:${dir}/zz` }), /directory ".*\/zz" does not exist/],
  ];
  test.each(cases)("%s", async (_name, cc, expected) => {
    const file = writeConfig(dir, cc() as Record<string, unknown>, `c-${crypto.randomBytes(4).toString("hex")}.yaml`);
    const r = await runCli(["serve", "--config", file]);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(expected);
  });

  test.each(["serve", "health", "stats", "bench"])("ucm-engine %s --help prints its usage and exits 0", async (cmd) => {
    const r = await runCli([cmd, "--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(new RegExp(`^usage: ucm-engine ${cmd} `));
    const bad = await runCli([cmd, "--no-such-option"]);
    expect(bad.code).toBe(2);
    expect(bad.out).toMatch(/Unknown option '--no-such-option'[\s\S]*usage: ucm-engine/);
  });

  test("wrong connector name and the list form", async () => {
    const f1 = path.join(dir, "n1.yaml");
    fs.writeFileSync(f1, 'ucm_connector_name: "Other"\nucm_connector_config:\n  storage_backends: /tmp\n');
    expect((await runCli(["serve", "--config", f1])).out).toMatch(
      /ucm_connector_name must be "UcmNfsStore" or "UcmPipelineStore", got "Other"/,
    );
    const f2 = path.join(dir, "n2.yaml");
    fs.writeFileSync(
      f2,
      'ucm_connectors:\n  - ucm_connector_name: "UcmNfsStore"\n    ucm_connector_config:\n      transferStreamNumber: 0\n      storage_backends: /tmp\n',
    );
    expect((await runCli(["serve", "--config", f2])).out).toMatch(
      /ucm_connectors\[0\].ucm_connector_config.transferStreamNumber must be between 1 and 1024, got 0/,
    );
  });

  test("a key nobody documents stops startup, named with its value", async () => {
    const f = path.join(dir, "mystery.yaml");
    fs.writeFileSync(
      f,
      `ucm_connectors:\n  - ucm_connector_name: "UcmNfsStore"\n    ucm_connector_config:\n      storage_backends: "${dir}/s1"\n      mystery: 1\n`,
    );
    const r = await runCli(["serve", "--config", f]);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(
      /unknown key ucm_connectors\[0\].ucm_connector_config.mystery \(value 1\): neither this store nor UCM documents it/,
    );
  });

  test("the seed's YAML works as written (colon list, list form)", async () => {
    const f = path.join(dir, "seed.yaml");
    fs.writeFileSync(
      f,
      `# UCM Configuration File Example\nucm_connectors:\n  - ucm_connector_name: "UcmNfsStore"\n    ucm_connector_config:\n      storage_backends: "${dir}/s1:${dir}/s2"\n      transferStreamNumber: 32\n      endpoint: "ipc://${dir}/seed.sock"\n`,
    );
    const e = await startEngine(f);
    try {
      expect(e.output()).not.toMatch(/\[W\]/);
      const c = e.client();
      await hello(c);
      // Keys spread over both backends.
      const region = new ShmRegion(64 * 4096, "random");
      try {
        const ids = (await c.call("register", { regions: [{ medium: "host", source: region.name, size: region.size }] }))
          .regions as number[];
        const keys = Array.from({ length: 64 }, (_, i) => key(i, "sb"));
        const d = await c.call("dump", {
          ns: "seed",
          keys,
          shards: { count: 1, region: keys.map(() => ids[0]), offset: keys.map((_, i) => i * 4096), length: keys.map(() => 4096) },
        });
        await c.call("wait", { task: d.task, timeout_ms: 20000 });
        await c.call("commit", { ns: "seed", keys });
        const count = (b: string) =>
          fs
            .readdirSync(path.join(dir, b, "seed"))
            .filter((x) => x.length === 2)
            .reduce((n, x) => n + fs.readdirSync(path.join(dir, b, "seed", x)).length, 0);
        expect(count("s1") + count("s2")).toBe(64);
        expect(count("s1")).toBeGreaterThan(10);
        expect(count("s2")).toBeGreaterThan(10);
      } finally {
        region.unlink();
      }
    } finally {
      await e.stop();
    }
  });
});
