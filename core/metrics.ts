// What the engine is doing, as Prometheus metrics (prom-client) and as the
// figures `ucm-engine stats` prints. The store keeps plain counters; this
// module reads a snapshot of them (`stats()`) at scrape time, so the hot paths
// never touch prom-client except for one histogram observation per finished
// task.
import * as fs from "fs";
import * as http from "http";
import * as client from "prom-client";
import { Logger } from "./log";
import { StoreStats, TaskObserver } from "./store";

/** What metrics need of the store: its snapshot, and a word per finished task. */
export interface MetricsSource {
  stats(): StoreStats;
  onTask?: TaskObserver;
}

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
  private readonly servers: http.Server[] = [];

  constructor(
    store: MetricsSource,
    private readonly extra: () => { clients: number; protocolErrors: Record<string, number>; requests: Record<string, number> },
  ) {
    const r = this.registry;
    // The event-loop lag histogram (perf_hooks' monitorEventLoopDelay) samples with a timer of its own: prom-client's
    // default of 10 ms woke the engine's thread a hundred times a second, idle or not, each time taking a core from
    // vLLM's model threads on a CPU node. Sampled every 100 ms it still sees the stalls that matter (the engine warns
    // of any over a second itself).
    client.collectDefaultMetrics({ register: r, prefix: "ucm_", eventLoopMonitoringPrecision: 100 });
    // A metric whose value lives in the store, read from one snapshot at scrape
    // time: counters (monotonic figures) are re-added from zero, gauges set.
    type Read<L extends string> = (st: StoreStats) => Array<[Partial<Record<L, string>>, number]>;
    const fromStore = <L extends string>(kind: "counter" | "gauge", name: string, help: string, labelNames: L[], read: Read<L>) => {
      const config = {
        name,
        help,
        labelNames,
        registers: [r],
        collect(this: client.Counter<L> | client.Gauge<L>) {
          this.reset();
          for (const [labels, v] of read(store.stats())) {
            const l = labels as client.LabelValues<L>;
            if (this instanceof client.Gauge) this.set(l, v);
            else if (v > 0) this.inc(l, v);
          }
        },
      };
      return kind === "counter" ? new client.Counter<L>(config) : new client.Gauge<L>(config);
    };
    const mirror = <L extends string>(name: string, help: string, labelNames: L[], read: Read<L>) =>
      fromStore("counter", name, help, labelNames, read);
    const gauge = <L extends string>(name: string, help: string, labelNames: L[], read: Read<L>) =>
      fromStore("gauge", name, help, labelNames, read);

    mirror("ucm_bytes_total", "Payload bytes moved, by direction", ["direction"], (st) => [
      [{ direction: "dump" }, st.counters.bytesDumped],
      [{ direction: "load" }, st.counters.bytesLoaded],
    ]);
    mirror("ucm_blocks_total", "Blocks by direction and result", ["direction", "result"], (st) => [
      [{ direction: "dump", result: "stored" }, st.counters.blocksDumped],
      [{ direction: "dump", result: "already_stored" }, st.counters.blocksSkipped],
      [
        { direction: "dump", result: "dropped" },
        st.counters.droppedInflight + st.counters.droppedCapacity + st.counters.droppedQueueAge + st.counters.deferredFirstSight,
      ],
      [{ direction: "load", result: "loaded" }, st.counters.blocksLoaded],
    ]);
    mirror("ucm_tasks_total", "Tasks submitted, by direction", ["direction"], (st) => [
      [{ direction: "dump" }, st.counters.dumpTasks],
      [{ direction: "load" }, st.counters.loadTasks],
    ]);
    mirror("ucm_requests_total", "Requests received from clients, by op", ["op"], () =>
      Object.entries(this.extra().requests).map(([op, n]) => [{ op }, n]),
    );
    mirror("ucm_lookups_total", "Lookup requests", [], (st) => [[{}, st.counters.lookups]]);
    mirror("ucm_lookup_keys_total", "Keys looked up, by result", ["result"], (st) => [
      [{ result: "hit" }, st.counters.hits],
      [{ result: "miss" }, st.counters.misses],
    ]);
    mirror("ucm_dropped_writes_total", "Dumped blocks not written, by reason", ["reason"], (st) => [
      [{ reason: "inflight_bytes" }, st.counters.droppedInflight],
      [{ reason: "capacity" }, st.counters.droppedCapacity],
      [{ reason: "queue_age" }, st.counters.droppedQueueAge],
      [{ reason: "first_sight" }, st.counters.deferredFirstSight],
    ]);
    mirror("ucm_errors_total", "Errors by kind: failed blocks, refused requests, ledger trouble", ["kind"], (st) => {
      const out: Array<[{ kind?: string }, number]> = [
        [{ kind: "block_not_found" }, st.counters.blocksNotFound],
        [{ kind: "block_corrupt" }, st.counters.blocksCorrupt],
        [{ kind: "block_mismatch" }, st.counters.blocksMismatch],
        [{ kind: "block_io_error" }, st.counters.blocksIoError],
        [{ kind: "block_cancelled" }, st.counters.blocksCancelled],
        [{ kind: "ledger" }, st.capacity.reduce((a, b) => a + b.ledgerErrors, 0)],
      ];
      for (const [code, n] of Object.entries(this.extra().protocolErrors)) out.push([{ kind: `request_${code}` }, n]);
      return out;
    });
    mirror(
      "ucm_storage_busy_seconds_total",
      "Seconds of storage reads and writes, summed over the transfers in flight; its rate over transferStreamNumber is how busy the streams keep storage",
      [],
      (st) => [[{}, st.storageBusySeconds]],
    );
    mirror(
      "ucm_storage_wait_seconds_total",
      "Seconds prepared blocks waited for a transfer stream, summed: storage was the bottleneck",
      [],
      (st) => [[{}, st.storageWaitSeconds]],
    );
    gauge("ucm_store_health_open", "1 while the store-health breaker is open: the store is off (storage unhealthy)", [], (st) => [
      [{}, st.health.open],
    ]);
    mirror("ucm_store_health_opens_total", "Times the store-health breaker opened", [], (st) => [[{}, st.health.opens]]);
    mirror("ucm_store_health_open_seconds_total", "Seconds the store-health breaker has been open", [], (st) => [
      [{}, st.health.openSeconds],
    ]);
    mirror("ucm_store_health_shed_total", "Operations answered without storage while the breaker was open", ["what"], (st) => [
      [{ what: "lookup" }, st.health.shedLookups],
      [{ what: "dump_block" }, st.health.shedDumpBlocks],
      [{ what: "load_block" }, st.health.shedLoadBlocks],
    ]);
    mirror("ucm_tier_lookups_total", "Loads of blocks asked of the Cache stage (host-memory tier), by result", ["result"], (st) => [
      [{ result: "hit" }, st.tier.hits],
      [{ result: "miss" }, st.tier.misses],
    ]);
    mirror("ucm_tier_hit_bytes_total", "Payload bytes loaded from the Cache stage", [], (st) => [[{}, st.tier.hitBytes]]);
    mirror("ucm_tier_blocks_total", "Blocks entering and leaving the Cache stage", ["event"], (st) => [
      [{ event: "inserted" }, st.tier.inserted],
      [{ event: "evicted" }, st.tier.evicted],
      [{ event: "refused" }, st.tier.refused],
    ]);
    mirror("ucm_tier_write_behind_total", "Blocks written behind from the Cache stage, by outcome", ["event"], (st) => [
      [{ event: "written" }, st.tier.written],
      [{ event: "shed" }, st.tier.shed],
      [{ event: "failed" }, st.tier.writeFailed],
    ]);
    mirror("ucm_tier_pinned_bytes_total", "Cache stage buffers page-locked for GPU transfers, bytes", [], (st) => [
      [{}, st.tier.pinnedBytes],
    ]);
    gauge("ucm_tier_unwritten_blocks", "Blocks answered from the Cache stage whose files are not written yet", [], (st) => [
      [{}, st.tier.unwritten],
    ]);
    gauge("ucm_tier_write_lag_seconds", "Age of the oldest block waiting for its write behind", [], (st) => [[{}, st.tier.lagMs / 1000]]);
    gauge("ucm_tier_blocks", "Committed blocks the Cache stage holds", [], (st) => [[{}, st.tier.blocks]]);
    gauge("ucm_tier_pending_blocks", "Dumped blocks held by the Cache stage until their commit", [], (st) => [[{}, st.tier.pending]]);
    gauge("ucm_tier_bytes", "Host memory of the Cache stage: used (every buffer it made) and capacity", ["what"], (st) => [
      [{ what: "used" }, st.tier.usedBytes],
      [{ what: "capacity" }, st.tier.capacityBytes],
    ]);
    mirror("ucm_commits_total", "Blocks made visible", [], (st) => [[{}, st.counters.commits]]);
    mirror(
      "ucm_commits_kept_first_total",
      "Commits of blocks another client or engine had stored meanwhile: the first copy kept, the new one deleted",
      [],
      (st) => [[{}, st.counters.commitsKeptFirst]],
    );
    mirror("ucm_evicted_blocks_total", "Blocks evicted for capacity, by backend (its index in storage_backends)", ["backend"], (st) =>
      st.capacity.map((b, i) => [{ backend: String(i) }, b.evictedFiles]),
    );
    mirror("ucm_evicted_bytes_total", "Bytes evicted for capacity, by backend (its index in storage_backends)", ["backend"], (st) =>
      st.capacity.map((b, i) => [{ backend: String(i) }, b.evictedBytes]),
    );
    gauge("ucm_capacity_bytes", "Configured capacity per backend, by its index in storage_backends (0 = unlimited)", ["backend"], (st) =>
      st.capacity.map((b, i) => [{ backend: String(i) }, b.capacity]),
    );
    gauge("ucm_capacity_used_bytes", "Bytes of block files in the backend, all engines", ["backend"], (st) =>
      st.capacity.map((b, i) => [{ backend: String(i) }, b.usedBytes]),
    );
    gauge("ucm_capacity_used_blocks", "Block files in the backend, all engines", ["backend"], (st) =>
      st.capacity.map((b, i) => [{ backend: String(i) }, b.usedFiles]),
    );
    gauge("ucm_queue_depth", "Blocks queued for a transfer thread", [], (st) => [[{}, st.queuedBlocks]]);
    gauge("ucm_inflight_bytes", "Dump bytes admitted and not yet written", [], (st) => [[{}, st.inflightDumpBytes]]);
    gauge("ucm_tasks_in_flight", "Tasks running", [], (st) => [[{}, st.tasksInFlight]]);
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

  /**
   * Serves GET /metrics on host:port, or on a unix socket when `port` is a path (mode 0600: only the engine's user
   * and root may read it). A port or path in use is logged, not fatal.
   */
  listen(host: string, port: number | string, log: Logger): Promise<void> {
    const where = typeof port === "string" ? `unix:${port}` : `http://${host}:${port}/metrics`;
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
        log.error(`metrics endpoint ${where} not started: ${e.message}`);
        resolve();
      });
      const ready = () => {
        if (typeof port === "string") fs.chmodSync(port, 0o600);
        this.servers.push(server);
        server.unref();
        log.info(`metrics on ${where}${typeof port === "string" ? " (GET /metrics; mode 0600)" : ""}`);
        resolve();
      };
      if (typeof port === "string") server.listen(port, ready);
      else server.listen(port, host, ready);
    });
  }

  close(): Promise<void> {
    const all = this.servers.splice(0);
    return Promise.all(
      all.map((s) => {
        s.closeAllConnections();
        return new Promise<void>((r) => s.close(() => r()));
      }),
    ).then(() => undefined);
  }
}
