// UCM's current configuration (issue 27): the engine takes UCM's config as UCM
// writes it today (ucm_connectors, UcmPipelineStore, store_pipeline
// "Cache|Posix" or "Posix", UCM's key names), maps each UCM key that means one
// of our options onto it, says once at start which keys have no effect here,
// and refuses keys nobody documents, UCM's other pipelines and two keys that
// set one option differently. The table of cases is shared with the shim's
// test (test/python/test_config.py): both parsers must read each alike.
import * as fs from "fs";
import * as path from "path";
import { stringify } from "yaml";
import { parseConfig } from "../core/config";
import { OPTIONS } from "../core/options";
import { CACHE_STAGE, translateConnectorConfig } from "../core/ucm_keys";
import { hello, runCli, shortTmp, startEngine } from "./helpers/engine";

// eslint-disable-next-line @typescript-eslint/no-require-imports
const table = require("./fixtures/ucm_config_cases.json") as {
  cases: Array<{
    name: string;
    doc: Record<string, unknown>;
    ours?: Record<string, unknown>;
    notes?: string[];
    storePipeline?: string;
    cacheBufferBytes?: number;
    error?: string;
  }>;
};

/** The document with "$DIR" replaced by `dir` in every string. */
function withDir(v: unknown, dir: string): unknown {
  if (typeof v === "string") return v.split("$DIR").join(dir);
  if (Array.isArray(v)) return v.map((x) => withDir(x, dir));
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, withDir(x, dir)]));
  return v;
}

/** The connector's config and its path in the document (the first entry of the list form). */
function section(doc: Record<string, unknown>): { name: string; at: string; cc: Record<string, unknown> } {
  const list = doc.ucm_connectors as Array<Record<string, unknown>> | undefined;
  const entry = list ? list[0] : doc;
  return {
    name: entry.ucm_connector_name as string,
    at: list ? "ucm_connectors[0].ucm_connector_config" : "ucm_connector_config",
    cc: entry.ucm_connector_config as Record<string, unknown>,
  };
}

describe("UCM's config forms and key names", () => {
  let dir: string;
  beforeAll(() => {
    dir = shortTmp("ucmk-");
    fs.mkdirSync(path.join(dir, "a"));
    fs.mkdirSync(path.join(dir, "b"));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  test.each(table.cases.map((c) => [c.name, c] as const))("%s", (_name, c) => {
    const doc = withDir(c.doc, dir) as Record<string, unknown>;
    if (c.error !== undefined) {
      expect(() => parseConfig(doc)).toThrow(c.error);
      return;
    }
    const { config, warnings, notes } = parseConfig(doc);
    expect(warnings).toEqual([]);
    // Each "accepted, no effect here" line once, in the file's order, naming the key's path.
    expect(notes.map((n) => n.slice(0, n.indexOf(": ")))).toEqual(c.notes);
    // UCM's keys land on our options: as translated, and in the engine's settled config.
    const s = section(doc);
    const ours = withDir(c.ours, dir) as Record<string, unknown>;
    expect(translateConnectorConfig(s.cc, s.name, s.at, new Set(["storage_backends", ...Object.keys(OPTIONS)])).raw).toEqual(ours);
    // Written with our own keys, the same config settles to the same values.
    const written = parseConfig({ ucm_connector_name: "UcmNfsStore", ucm_connector_config: ours }).config as unknown as Record<
      string,
      unknown
    >;
    for (const k of Object.keys(ours)) expect({ k, v: (config as unknown as Record<string, unknown>)[k] }).toEqual({ k, v: written[k] });
    expect(config.storePipeline).toBe(c.storePipeline);
    expect(config.cacheBufferBytes).toBe(c.cacheBufferBytes);
  });

  test("a UCM key that sets one of ours is named in the errors about that option", () => {
    const cc = (extra: Record<string, unknown>) => ({
      ucm_connector_name: "UcmNfsStore",
      ucm_connector_config: { storage_backends: path.join(dir, "a"), ...extra },
    });
    expect(() => parseConfig(cc({ store_health: { health_window_size: 2, failure_threshold: 3 } }))).toThrow(
      "ucm_connector_config.store_health.failure_threshold (healthFailureThreshold here) must be at most healthWindowSize (2), got 3",
    );
    expect(() => parseConfig(cc({ posix_data_trans_concurrency: 2000 }))).toThrow(
      "ucm_connector_config.posix_data_trans_concurrency (transferStreamNumber here) must be between 1 and 1024, got 2000",
    );
  });

  test("the engine starts from UCM's current YAML, says each key with no effect once at start, and serves", async () => {
    const doc = withDir(table.cases[0].doc, dir) as Record<string, unknown>;
    (section(doc).cc as Record<string, unknown>).endpoint = `ipc://${dir}/u.sock`;
    const file = path.join(dir, "ucm_config.yaml");
    fs.writeFileSync(file, stringify(doc));
    const e = await startEngine(file);
    try {
      const c = e.client();
      const settings = ((await hello(c)).engine as Record<string, unknown>).settings as Record<string, unknown>;
      expect({
        odirect: settings.odirect,
        capacity: settings.capacity,
        loadTimeoutMs: settings.loadTimeoutMs,
        writeBehind: settings.writeBehind,
      }).toEqual({
        odirect: true,
        capacity: [2 ** 40, 2 ** 40],
        loadTimeoutMs: 30000,
        writeBehind: true, // UCM's Cache stage answers a dump once its bytes are in host memory
      });
      const lines = e.output().split("\n");
      const said = (what: string) => lines.filter((l) => l.includes(what));
      for (const what of [
        "[I] config: enable_event_sync: true accepted, no effect here: ",
        "[I] config: use_layerwise: true accepted, no effect here: ",
        `[I] config: ucm_connectors[0].ucm_connector_config.store_pipeline: "Cache|Posix": ${CACHE_STAGE}`,
        "[I] Cache stage: 32.00 GiB of host memory in front of the storage directories (cache_buffer_capacity_gb)",
      ])
        expect({ what, times: said(what).length }).toEqual({ what, times: 1 });
      expect(said("accepted").length).toBe(2);
      expect(said("[W]")).toEqual([]);
    } finally {
      await e.stop();
    }
  });

  test("UCM's other pipelines stop startup, naming the value and what is accepted", async () => {
    const doc = withDir(table.cases[0].doc, dir) as Record<string, unknown>;
    section(doc).cc.store_pipeline = "Mooncake";
    const file = path.join(dir, "mooncake.yaml");
    fs.writeFileSync(file, stringify(doc));
    const r = await runCli(["serve", "--config", file]);
    expect(r.code).toBe(2);
    expect(r.out).toContain(
      'ucm_connectors[0].ucm_connector_config.store_pipeline is "Mooncake", which this store does not provide; accepted: "Cache|Posix", "Posix"',
    );
  });
});
