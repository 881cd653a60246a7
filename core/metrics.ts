// What the engine is doing, as Prometheus metrics (prom-client) and as the
// figures `ucm-engine stats` prints. The store keeps plain counters; this
// module reads them at scrape time, so the hot paths never touch prom-client
// except for one histogram observation per finished task.
import * as http from "http";
import * as client from "prom-client";
import { Logger } from "./log";
import { Store } from "./store";

/** Task latency buckets, seconds: 0.5 ms .. 60 s. */
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export interface LatencySummary {
  count: number;
  meanS: number;
  /** Upper bucket bounds containing the median and the 99th percentile. */
  p50S: number;
  p99S: number;
}

export class Metrics {
  readonly registry = new client.Registry();
  private readonly latency: client.Histogram<"direction">;
  private server?: http.Server;

  constructor(
    store: Store,
    private readonly extra: () => { clients: number; protocolErrors: Record<string, number> },
  ) {
    const r = this.registry;
    client.collectDefaultMetrics({ register: r, prefix: "ucm_" });
    const c = store.counters;
    // A metric whose value lives in the store, read at scrape time: counters
    // (monotonic figures) are re-added from zero, gauges set.
    type Read<L extends string> = () => Array<[Partial<Record<L, string>>, number]>;
    const fromStore = <L extends string>(kind: "counter" | "gauge", name: string, help: string, labelNames: L[], read: Read<L>) => {
      const config = {
        name,
        help,
        labelNames,
        registers: [r],
        collect(this: client.Counter<L> | client.Gauge<L>) {
          this.reset();
          for (const [labels, v] of read()) {
            const l = labels as client.LabelValues<L>;
            if (this instanceof client.Gauge) this.set(l, v);
            else if (v > 0) this.inc(l, v);
          }
        },
      };
      return kind === "counter" ? new client.Counter<L>(config) : new client.Gauge<L>(config);
    };
    const mirror = <L extends string>(name: string, help: string, labelNames: L[], read: Read<L>) => fromStore("counter", name, help, labelNames, read);
    const gauge = <L extends string>(name: string, help: string, labelNames: L[], read: Read<L>) => fromStore("gauge", name, help, labelNames, read);

    mirror("ucm_bytes_total", "Payload bytes moved, by direction", ["direction"], () => [
      [{ direction: "dump" }, c.bytesDumped],
      [{ direction: "load" }, c.bytesLoaded],
    ]);
    mirror("ucm_blocks_total", "Blocks by direction and result", ["direction", "result"], () => [
      [{ direction: "dump", result: "stored" }, c.blocksDumped],
      [{ direction: "dump", result: "already_stored" }, c.blocksSkipped],
      [{ direction: "dump", result: "dropped" }, c.droppedInflight + c.droppedCapacity + c.droppedQueueAge + c.deferredFirstSight],
      [{ direction: "load", result: "loaded" }, c.blocksLoaded],
    ]);
    mirror("ucm_tasks_total", "Tasks submitted, by direction", ["direction"], () => [
      [{ direction: "dump" }, c.dumpTasks],
      [{ direction: "load" }, c.loadTasks],
    ]);
    mirror("ucm_lookups_total", "Lookup requests", [], () => [[{}, c.lookups]]);
    mirror("ucm_lookup_keys_total", "Keys looked up, by result", ["result"], () => [
      [{ result: "hit" }, c.hits],
      [{ result: "miss" }, c.misses],
    ]);
    mirror("ucm_dropped_writes_total", "Dumped blocks not written, by reason", ["reason"], () => [
      [{ reason: "inflight_bytes" }, c.droppedInflight],
      [{ reason: "capacity" }, c.droppedCapacity],
      [{ reason: "queue_age" }, c.droppedQueueAge],
      [{ reason: "first_sight" }, c.deferredFirstSight],
    ]);
    mirror("ucm_errors_total", "Errors by kind: failed blocks, refused requests, ledger trouble", ["kind"], () => {
      const out: Array<[{ kind?: string }, number]> = [
        [{ kind: "block_not_found" }, c.blocksNotFound],
        [{ kind: "block_corrupt" }, c.blocksCorrupt],
        [{ kind: "block_mismatch" }, c.blocksMismatch],
        [{ kind: "block_io_error" }, c.blocksIoError],
        [{ kind: "block_cancelled" }, c.blocksCancelled],
        [{ kind: "ledger" }, store.capacity.usage().reduce((a, b) => a + b.ledgerErrors, 0)],
      ];
      for (const [code, n] of Object.entries(this.extra().protocolErrors)) out.push([{ kind: `request_${code}` }, n]);
      return out;
    });
    mirror("ucm_commits_total", "Blocks made visible", [], () => [[{}, c.commits]]);
    mirror("ucm_evicted_blocks_total", "Blocks evicted for capacity, by backend", ["backend"], () =>
      store.capacity.usage().map((b) => [{ backend: b.dir }, b.evictedFiles]),
    );
    mirror("ucm_evicted_bytes_total", "Bytes evicted for capacity, by backend", ["backend"], () =>
      store.capacity.usage().map((b) => [{ backend: b.dir }, b.evictedBytes]),
    );
    gauge("ucm_capacity_bytes", "Configured capacity per backend (0 = unlimited)", ["backend"], () =>
      store.capacity.usage().map((b) => [{ backend: b.dir }, b.capacity]),
    );
    gauge("ucm_capacity_used_bytes", "Bytes of block files in the backend, all engines", ["backend"], () =>
      store.capacity.usage().map((b) => [{ backend: b.dir }, b.usedBytes]),
    );
    gauge("ucm_capacity_used_blocks", "Block files in the backend, all engines", ["backend"], () =>
      store.capacity.usage().map((b) => [{ backend: b.dir }, b.usedFiles]),
    );
    gauge("ucm_queue_depth", "Blocks queued for a transfer thread", [], () => [[{}, store.native.stats().queuedBlocks]]);
    gauge("ucm_inflight_bytes", "Dump bytes admitted and not yet written", [], () => [[{}, store.inflightDumpBytes]]);
    gauge("ucm_tasks_in_flight", "Tasks running", [], () => [[{}, store.tasksInFlight]]);
    gauge("ucm_clients", "Connected clients", [], () => [[{}, this.extra().clients]]);
    this.latency = new client.Histogram({
      name: "ucm_task_duration_seconds",
      help: "Task latency from submit to the last block done, by direction",
      labelNames: ["direction"],
      buckets: LATENCY_BUCKETS,
      registers: [r],
    });
    store.onTask = (direction, seconds) => this.latency.observe({ direction: direction === "D2S" ? "dump" : "load" }, seconds);
  }

  /** Count, mean and bucket-resolution percentiles of task latency, by direction. */
  async latencySummary(): Promise<Record<"dump" | "load", LatencySummary>> {
    const m = await this.latency.get();
    const out = {} as Record<"dump" | "load", LatencySummary>;
    for (const dir of ["dump", "load"] as const) {
      const buckets = m.values.filter((v) => v.labels.direction === dir && v.metricName === "ucm_task_duration_seconds_bucket");
      const count = m.values.find((v) => v.labels.direction === dir && v.metricName === "ucm_task_duration_seconds_count")?.value ?? 0;
      const sum = m.values.find((v) => v.labels.direction === dir && v.metricName === "ucm_task_duration_seconds_sum")?.value ?? 0;
      const q = (p: number) => {
        const b = buckets.find((v) => v.value >= p * count);
        const le = (b?.labels as Record<string, string | number> | undefined)?.le;
        return le === undefined || le === "+Inf" || le === Infinity ? Infinity : Number(le);
      };
      out[dir] = { count, meanS: count ? sum / count : 0, p50S: count ? q(0.5) : 0, p99S: count ? q(0.99) : 0 };
    }
    return out;
  }

  /** Serves GET /metrics on host:port. A port in use is logged, not fatal. */
  listen(host: string, port: number, log: Logger): Promise<void> {
    return new Promise((resolve) => {
      const server = http.createServer((req, res) => {
        if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
          res.writeHead(404, { "content-type": "text/plain" }).end("only GET /metrics here\n");
          return;
        }
        this.registry.metrics().then(
          (text) => res.writeHead(200, { "content-type": this.registry.contentType }).end(text),
          (e: Error) => res.writeHead(500, { "content-type": "text/plain" }).end(`${e.message}\n`),
        );
      });
      server.once("error", (e: Error) => {
        log.error(`metrics endpoint ${host}:${port} not started: ${e.message}`);
        resolve();
      });
      server.listen(port, host, () => {
        this.server = server;
        server.unref();
        log.info(`metrics on http://${host}:${port}/metrics`);
        resolve();
      });
    });
  }

  close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (!s) return Promise.resolve();
    s.closeAllConnections();
    return new Promise((r) => s.close(() => r()));
  }
}
