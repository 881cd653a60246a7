// The engine process's ZeroMQ front: one ROUTER socket, one session per
// client, every request validated and answered (never crashing the engine),
// replies sent through one queue (zeromq.js allows one send at a time).
import * as fs from "fs";
import * as path from "path";
import * as zmq from "zeromq";
import { EngineConfig } from "./config";
import { EngineClient } from "./client";
import { buildId } from "./build";
import { ConnectionGuard } from "./connections";
import { isTcp, publishServerKey, unpublishServerKey } from "./curve";
import { socketDir } from "./endpoint";
import { ClientIdentity } from "./identity";
import { HANDSHAKE_MS, TcpGuard } from "./tcp_guard";
import { Logger } from "./log";
import { Metrics } from "./metrics";
import { cudaStatus } from "./native";
import { processAlive } from "./orphans";
import { MAX_MESSAGE_BYTES, PROTOCOL_VERSIONS, ProtocolError, decodeRequest, describe, encode, reqOp } from "./protocol";
import {
  HelloRequest,
  decodeCommit,
  decodeDump,
  decodeHello,
  decodeLoad,
  decodeLookup,
  decodeNamespace,
  decodeRegister,
  decodeRelease,
  decodeTask,
  decodeWait,
} from "./requests";
import { Session, Store } from "./store";

/** How often the event loop's punctuality is checked, and how late it must be to be said (watchEventLoop). */
const EVENT_LOOP_TICK_MS = 100;
/** The ops a client may send (docs/PROTOCOL.md). */
const KNOWN_OPS = [
  "hello",
  "goodbye",
  "register",
  "release",
  "namespace",
  "lookup",
  "dump",
  "load",
  "wait",
  "check",
  "cancel",
  "commit",
  "stats",
  "health",
];
const EVENT_LOOP_LATE_MS = 1000;

type Msg = Record<string, unknown>;

export class EngineServer {
  readonly store: Store;
  private readonly sock: zmq.Router;
  /** tcp:// only: the CURVE key pair of this run (see curve.ts). */
  private readonly curve?: { publicKey: string; secretKey: string };
  private guard?: ConnectionGuard;
  private tcpGuard?: TcpGuard;
  private readonly identity: ClientIdentity;
  private readonly sessions = new Map<string, Session>();
  private readonly outbox: Buffer[][] = [];
  private pumping = false;
  private stopping = false;
  private timers: NodeJS.Timeout[] = [];
  private readonly started = Date.now();
  private readonly errors: Record<string, number> = {};
  /** Requests received, by op (only ops the engine knows: a client's made-up op cannot add a key). */
  private readonly requests: Record<string, number> = Object.fromEntries(KNOWN_OPS.map((op) => [op, 0]));
  private loop?: Promise<void>;

  readonly metrics: Metrics;

  constructor(
    readonly config: EngineConfig,
    readonly log: Logger,
  ) {
    const options: zmq.SocketOptions<zmq.Router> = {
      linger: 0,
      maxMessageSize: MAX_MESSAGE_BYTES,
      // ZMTP heartbeats: a peer that sends nothing for heartbeatTimeoutS after a PING is disconnected. A client's
      // ZeroMQ answers PINGs on its own thread, busy or not; what stops answering is a process stopped, gone, or
      // stuck halfway through a message, which would otherwise hold what it sent (up to the message size) for good.
      heartbeatInterval: Math.min(5000, Math.max(100, Math.floor((config.heartbeatTimeoutS * 1000) / 3))),
      heartbeatTimeout: config.heartbeatTimeoutS * 1000,
      sendHighWaterMark: 100_000,
      receiveHighWaterMark: 100_000,
    };
    if (isTcp(config.endpoint)) {
      this.curve = zmq.curveKeyPair();
      Object.assign(options, {
        curveServer: true,
        curveSecretKey: this.curve.secretKey,
        curvePublicKey: this.curve.publicKey,
        handshakeInterval: HANDSHAKE_MS, // a connection without the key is closed this soon (tcp_guard.ts)
      });
    }
    this.sock = new zmq.Router(options);
    // ZMQ_ROUTER_NOTIFY (97) with ZMQ_NOTIFY_DISCONNECT (2): an empty message from a peer whose connection ended,
    // so that its session ends with it (a client that gave up on a request opens a new socket and says hello
    // again; the old session would otherwise count against its process until the process exits).
    (this.sock as unknown as { setInt32Option(option: number, value: number): void }).setInt32Option(97, 2);
    this.identity = new ClientIdentity(config.endpoint, log);
    this.store = new Store(config, log);
    this.metrics = new Metrics(this.store, () => ({
      clients: this.sessions.size,
      protocolErrors: this.errors,
      requests: this.requests,
    }));
  }

  get endpoint(): string {
    return this.config.endpoint;
  }

  /** Prepares the socket directory, refuses to steal a live engine's socket, binds. */
  async start(): Promise<void> {
    const ep = this.config.endpoint;
    if (ep.startsWith("ipc://")) {
      const file = ep.slice("ipc://".length);
      socketDir(path.dirname(file));
      if (fs.existsSync(file)) {
        const probe = new EngineClient(ep, 1000);
        try {
          const h = await probe.call("health", {}, 1000);
          throw new Error(`another engine (pid ${String(h.pid)}) already serves ${ep}`);
        } catch (e) {
          if (!(e instanceof Error) || !/timeout|no reply/.test(e.message)) throw e;
          fs.rmSync(file, { force: true }); // stale socket of a dead engine
        } finally {
          probe.close();
        }
      }
    }
    await this.store.start();
    if (this.config.metricsPort > 0) await this.metrics.listen(this.config.metricsHost, this.config.metricsPort, this.log);
    if (this.config.metricsSocket) {
      // A directory of this user's, like the endpoint's: the figures are for the operator, not every local user.
      socketDir(path.dirname(this.config.metricsSocket));
      fs.rmSync(this.config.metricsSocket, { force: true }); // a stale one of an engine that died
      await this.metrics.listen("", this.config.metricsSocket, this.log);
    }
    this.guard = new ConnectionGuard(this.sock, ep, this.config, this.log, () => new Set(Array.from(this.sessions.values(), (s) => s.pid)));
    if (isTcp(ep)) this.tcpGuard = new TcpGuard(this.sock, ep, this.log);
    this.identity.start();
    await this.sock.bind(ep);
    if (ep.startsWith("ipc://")) fs.chmodSync(ep.slice("ipc://".length), 0o600);
    if (this.curve)
      this.log.info(`tcp endpoint: CURVE, public key in ${publishServerKey(ep, this.curve.publicKey)} (readable by this user only)`);
    this.loop = this.receive();
    this.timers.push(setInterval(() => this.checkClients(), this.config.clientCheckMs));
    this.timers.push(setInterval(() => this.store.sweep(this.sessions.values()), 10_000));
    this.timers.push(this.watchEventLoop());
    void this.store.sweepOrphans();
    this.timers.push(setInterval(() => void this.store.sweepOrphans(), 300_000));
    const cuda = cudaStatus();
    this.log.info(
      cuda.usable
        ? `CUDA backend: ${cuda.devices} GPU(s), runtime ${cuda.runtimeVersion}, driver ${cuda.driverVersion}, ${this.config.cudaCopy} copies` +
            `${cuda.batchCopies ? "" : " (this runtime has no batched copies: kernel)"}, ` +
            `${(this.config.pinnedStagingBytes / 2 ** 20).toFixed(0)} MiB pinned staging at most${cuda.emulated ? " [emulated CUDA runtime, for tests]" : ""}`
        : `CUDA backend: ${cuda.built ? "built, not usable here" : "not built"} (${cuda.why}); host memory only`,
    );
    const tier = this.config.hostCacheBytes;
    this.log.info(
      tier > 0
        ? `Cache stage: ${(tier / 2 ** 30).toFixed(2)} GiB of host memory in front of the storage directories` +
            (this.config.storePipeline === "Cache|Posix"
              ? this.config.cacheBufferBytes
                ? " (cache_buffer_capacity_gb)"
                : " (cache_buffer_capacity_gb not given: 4 GiB, or a quarter of this host's memory if less)"
              : " (hostCacheBytes)") +
            (this.config.writeBehind
              ? "; dumps answered once in host memory, their files written behind (writeBehind)"
              : "; dumps answered once their files are written (writeBehind off)")
        : "Cache stage: off (hostCacheBytes 0): every load reads the storage directories",
    );
    this.log.info(
      `listening on ${ep} (backends ${this.config.storageBackends.join(":")}, transferStreamNumber ${this.config.transferStreamNumber}, pid ${process.pid})`,
    );
  }

  private async receive(): Promise<void> {
    try {
      for await (const [peer, ...frames] of this.sock) void this.handle(peer, frames);
    } catch (e) {
      if (!this.stopping) this.log.error(`receive loop ended: ${(e as Error).message}`);
    }
  }

  private async handle(peer: Buffer, frames: Buffer[]): Promise<void> {
    let id: unknown = null;
    if (frames.length === 1 && frames[0].length === 0) {
      // The connection ended (ZMQ_ROUTER_NOTIFY), or its client sent an empty frame, which ends nothing but its own.
      this.drop(peer.toString("hex"), "its connection ended");
      return;
    }
    try {
      if (frames.length !== 1) throw new ProtocolError("bad_message", `a request is one frame, got ${frames.length}`);
      const req = decodeRequest(frames[0]);
      id = typeof req.id === "number" || typeof req.id === "string" ? req.id : null;
      const result = await this.dispatch(peer, req.msg);
      this.send(peer, { ...result, id, ok: true });
    } catch (e) {
      const pe = e instanceof ProtocolError ? e : new ProtocolError("internal", (e as Error)?.message ?? String(e));
      if (pe.code === "internal") this.log.error(`internal error: ${(e as Error)?.stack ?? String(e)}`);
      else this.log.debug(`request refused (${pe.code}): ${pe.message}`);
      this.errors[pe.code] = (this.errors[pe.code] ?? 0) + 1;
      this.send(peer, { id, ok: false, error: { code: pe.code, message: pe.message } });
    }
  }

  private async dispatch(peer: Buffer, msg: Msg): Promise<object> {
    const op = reqOp(msg);
    if (Object.hasOwn(this.requests, op)) this.requests[op]++;
    const key = peer.toString("hex");
    // Answered without a session: operators' probes.
    if (op === "health") return this.health();
    if (op === "stats") return this.stats();
    if (this.stopping) throw new ProtocolError("shutting_down", `engine is shutting down; ${op} refused`);
    if (op === "hello") return this.hello(key, decodeHello(msg));
    const s = this.sessions.get(key);
    if (!s)
      throw new ProtocolError("no_session", `send hello (protocol version ${PROTOCOL_VERSIONS.join("/")}) before ${JSON.stringify(op)}`);
    switch (op) {
      case "goodbye":
        this.drop(key, "said goodbye");
        return {};
      case "register":
        return this.store.register(s, decodeRegister(msg));
      case "release":
        return this.store.release(s, decodeRelease(msg));
      case "namespace":
        return this.store.namespace(s, decodeNamespace(msg));
      case "lookup":
        return this.store.lookup(decodeLookup(msg, this.config));
      case "dump":
        return this.store.dump(s, decodeDump(msg, this.config));
      case "load":
        return this.store.load(s, decodeLoad(msg, this.config));
      case "wait":
        return this.store.wait(s, decodeWait(msg));
      case "check":
        return this.store.check(s, decodeTask(msg));
      case "commit":
        return this.store.commit(s, decodeCommit(msg, this.config), this.sessions.values());
      case "cancel":
        return this.store.cancel(s, decodeTask(msg));
      default:
        throw new ProtocolError("unknown_op", `unknown op ${describe(op)}; known: ${KNOWN_OPS.join(", ")}`);
    }
  }

  private hello(key: string, req: HelloRequest): Msg {
    const { version, name } = req;
    // The pid is what the engine watches for liveness, counts sessions by, and the only process whose
    // /proc/<pid>/fd a client may name: on ipc the kernel's, not the hello's (identity.ts).
    const { pid, verified } = this.identity.of(req);
    // Per-client quotas hold per session: a process may not multiply them without bound.
    const held = Array.from(this.sessions.values()).filter((x) => x.pid === pid && x.peer !== key).length;
    if (held >= this.config.maxSessionsPerProcess) {
      throw new ProtocolError(
        "busy",
        `process ${pid} already holds ${held} sessions, the most allowed (maxSessionsPerProcess ${this.config.maxSessionsPerProcess})`,
      );
    }
    if (this.sessions.has(key)) this.drop(key, "said hello again");
    this.sessions.set(key, new Session(key, pid, name, verified));
    this.log.debug(`client ${name || "?"} (pid ${pid}${verified ? "" : ", unverified"}) connected`);
    return {
      version,
      pid_verified: verified,
      engine: {
        pid: process.pid,
        id: this.store.engineId,
        endpoint: this.config.endpoint,
        backends: this.config.storageBackends,
        build: buildId(),
        clients: this.sessions.size,
        settings: this.settings(),
        // A GPU block larger than this cannot move: the shim refuses such KV caches at registration.
        maxDeviceBlockBytes: this.store.maxDeviceBlockBytes,
      },
    };
  }

  /**
   * Every option's effective value, keyed as in the YAML (sizes in bytes, capacity one per backend): what a shim
   * compares with the config it was given before it uses this engine. The backends and the endpoint are left
   * out (they name the engine).
   */
  private settings(): Msg {
    const { storageBackends: _b, storageBackendsRaw: _r, endpoint: _e, ...rest } = this.config;
    return rest as unknown as Msg;
  }

  private health(): Msg {
    return {
      status: this.stopping ? "stopping" : "serving",
      pid: process.pid,
      uptime_s: (Date.now() - this.started) / 1000,
      clients: this.sessions.size,
      build: buildId(),
      settings: this.settings(),
    };
  }

  async stats(): Promise<Msg> {
    const st = this.store.stats();
    return {
      ...st.counters,
      tasksInFlight: st.tasksInFlight,
      inflightDumpBytes: st.inflightDumpBytes,
      maxInflightBytes: st.maxInflightBytes,
      capacity: st.capacity,
      latency: await this.metrics.latencySummary(),
      clients: this.sessions.size,
      queuedBlocks: st.queuedBlocks,
      stagingBytes: st.stagingBytes,
      pinnedBytes: st.pinnedBytes,
      cuda: cudaStatus(),
      transferThreads: st.transferThreads,
      storageBusySeconds: st.storageBusySeconds,
      storageWaitSeconds: st.storageWaitSeconds,
      health: st.health,
      tier: st.tier,
      errors: { ...this.errors },
      requests: { ...this.requests },
      pid: process.pid,
      uptime_s: (Date.now() - this.started) / 1000,
    };
  }

  private drop(key: string, why: string): void {
    const s = this.sessions.get(key);
    if (!s) return;
    this.sessions.delete(key);
    this.store.closeSession(s);
    this.log.debug(`client ${s.name || "?"} (pid ${s.pid}) released: ${why}`);
  }

  /**
   * A client whose process is gone loses its session, regions and tasks. An unverified pid (tcp) proves nothing
   * either way: such a session ends with its connection.
   */
  /**
   * Says when the event loop was held up: every request waits while it is, and a client gives up after its
   * clientTimeoutMs (a scheduler's lookup then counts a miss, and its request waits that long). Found this way:
   * Node's own threads bound to the core of the vLLM worker that started the engine (widenCpuAffinity).
   */
  private watchEventLoop(): NodeJS.Timeout {
    let last = Date.now();
    const t = setInterval(() => {
      const now = Date.now();
      const late = now - last - EVENT_LOOP_TICK_MS;
      last = now;
      if (late >= EVENT_LOOP_LATE_MS) this.log.warn(`the event loop was held up for ${late} ms: every request waited that long`);
    }, EVENT_LOOP_TICK_MS);
    t.unref();
    return t;
  }

  private checkClients(): void {
    for (const [key, s] of this.sessions) {
      if (s.verified && !processAlive(s.pid)) this.drop(key, "process is gone");
    }
  }

  private send(peer: Buffer, msg: Msg): void {
    this.outbox.push([peer, encode(msg)]);
    if (!this.pumping) void this.pump();
  }

  private async pump(): Promise<void> {
    this.pumping = true;
    while (this.outbox.length > 0) {
      const m = this.outbox.shift()!;
      try {
        await this.sock.send(m);
      } catch (e) {
        if (this.sock.closed) break;
        this.log.warn(`reply dropped: ${(e as Error).message}`);
      }
    }
    this.pumping = false;
  }

  /**
   * For an engine a shim started on its own: calls `exit` once no client has had a session and no task has run
   * for `seconds` (an engine an operator started runs until stopped).
   */
  exitWhenIdle(seconds: number, exit: () => void): void {
    let idleSince = Date.now();
    const t = setInterval(
      () => {
        if (this.sessions.size > 0 || this.store.tasksInFlight > 0) idleSince = Date.now();
        else if (Date.now() - idleSince >= seconds * 1000) {
          clearInterval(t);
          this.log.info(`no client for ${seconds} s: exiting (started with --exit-when-idle)`);
          exit();
        }
      },
      Math.min(1000, seconds * 250),
    );
    this.timers.push(t);
  }

  /** Finishes or cancels running tasks, deletes uncommitted blocks, removes the socket. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.log.info(`shutting down: ${this.store.tasksInFlight} task(s) in flight`);
    for (const t of this.timers) clearInterval(t);
    this.guard?.stop();
    this.tcpGuard?.stop();
    this.identity.stop();
    await this.metrics.close();
    await this.store.close(this.config.shutdownTimeoutS * 1000, [...this.sessions.values()]);
    // Let queued replies go out before the socket closes.
    const deadline = Date.now() + 1000;
    while ((this.pumping || this.outbox.length) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    this.sock.close();
    await this.loop;
    if (this.config.endpoint.startsWith("ipc://")) fs.rmSync(this.config.endpoint.slice("ipc://".length), { force: true });
    if (this.config.metricsSocket) fs.rmSync(this.config.metricsSocket, { force: true });
    if (this.curve) unpublishServerKey(this.config.endpoint, this.curve.publicKey);
    this.log.info("stopped");
  }
}
