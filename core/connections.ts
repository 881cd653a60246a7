// Keeps the engine within its file descriptors, whatever clients do. One
// engine serves every vLLM process of a node: a client that opens thousands
// of connections and leaves them idle must not exhaust the descriptors (libzmq
// aborts the whole process when an ipc accept fails for lack of one), nor keep
// others out.
//
// - At start the soft limit on open files is raised to the hard limit.
// - On ipc the engine asks the kernel who is connected (SO_PEERCRED: the
//   process at the other end of each accepted connection, not what a client
//   says) and ends connections with shutdown(2) (libzmq then closes them as if
//   the peer had left; a real client's socket reconnects by itself):
//   - a process keeps at most `maxConnectionsPerProcess` connections;
//   - a connection whose process has no session is closed after
//     `idleConnectionS`, or at once while the engine is at `maxConnections`.
//   The sweep runs every quarter of `idleConnectionS`, and right after an
//   accept that reached `maxConnections`.
// - Last resort, when connections near the open-file limit anyway (ipc): a
//   native thread hides the socket's name (renames it) before libzmq could
//   meet EMFILE on an accept (libzmq 4.3 aborts the process then), and puts it
//   back once idle connections are closed. Clients already connected go on;
//   new ones retry until the name is back. (On tcp libzmq survives EMFILE.)
// Which process a hello comes from is identity.ts's business.
import * as zmq from "zeromq";
import { Logger } from "./log";
import { ConnectedPeer, connectedPeers, endConnection, listenerPause, listenerPauseState, listenerPauseStop, raiseFdLimit } from "./native";

export interface ConnectionLimits {
  /** Connections at which sessionless ones are closed at once; 0: a quarter of the open-file limit, at most 4096. */
  maxConnections: number;
  /** Connections one process may hold. */
  maxConnectionsPerProcess: number;
  /** Seconds a connection whose process has no session may stay open (ipc only). */
  idleConnectionS: number;
}

export class ConnectionGuard {
  readonly max: number;
  private pauses = 0;
  private pauseError = "";
  private open = 0;
  private readonly socketPath?: string;
  private readonly sessionless = new Map<number, number>(); // socket inode -> first seen without a session
  private timer?: NodeJS.Timeout;
  private pauseTimer?: NodeJS.Timeout;
  private lastSweep = 0;
  /** Connections the engine ended, in all. */
  ended = 0;

  constructor(
    sock: zmq.Router,
    endpoint: string,
    private readonly limits: ConnectionLimits,
    private readonly log: Logger,
    /** Pids of the processes that have a session now. */
    private readonly sessionPids: () => Set<number>,
  ) {
    const lim = raiseFdLimit();
    this.max = limits.maxConnections > 0 ? limits.maxConnections : Math.max(16, Math.min(4096, Math.floor(lim.soft / 4)));
    if (endpoint.startsWith("ipc://")) this.socketPath = endpoint.slice("ipc://".length);
    log.info(
      `open files: limit ${lim.soft} (hard ${lim.hard}); client connections: ${this.max} before idle ones are closed at once` +
        (this.socketPath
          ? `, ${limits.maxConnectionsPerProcess} per process, without a session closed after ${limits.idleConnectionS} s`
          : ""),
    );
    sock.events.on("accept", () => {
      this.open++;
      if (this.open >= this.max && Date.now() - this.lastSweep > 100) this.sweep();
    });
    sock.events.on("disconnect", () => {
      this.open = Math.max(0, this.open - 1);
    });
    if (this.socketPath) {
      const every = Math.max(250, Math.min(10_000, (limits.idleConnectionS * 1000) / 4));
      this.timer = setInterval(() => this.sweep(), every);
      this.timer.unref();
      // Hidden at 60 % of the descriptors taken, back under 40 %: room for the listen backlog and a burst.
      const pauseAt = Math.max(64, Math.floor(lim.soft * 0.6));
      listenerPause(this.socketPath, pauseAt, Math.max(32, Math.floor(lim.soft * 0.4)));
      this.pauseTimer = setInterval(() => this.checkPause(), 250);
      this.pauseTimer.unref();
    }
  }

  /** While the socket is hidden, closes every connection without a session at once. */
  private checkPause(): void {
    const st = listenerPauseState();
    if (st.error && st.error !== this.pauseError) this.log.error(`connection guard: ${st.error}`);
    this.pauseError = st.error;
    if (st.pauses > this.pauses) {
      this.pauses = st.pauses;
      this.log.warn(
        `descriptors near the open-file limit: ${this.socketPath} hidden (at ${st.hiddenPath}) until idle ` +
          `connections are closed; connected clients go on, new ones wait`,
      );
    }
    if (st.paused) this.sweep(true);
  }

  get connections(): number {
    return this.open;
  }

  /** The kernel's list of processes connected to our ipc socket (empty on tcp). */
  peers(): ConnectedPeer[] {
    return this.socketPath ? connectedPeers(this.socketPath) : [];
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.pauseTimer) clearInterval(this.pauseTimer);
    if (this.socketPath) listenerPauseStop(); // the socket's name back, for libzmq to remove on close
  }

  /** Applies the per-process and idle rules to the kernel's list of connections; recounts from it. */
  sweep(force = false): void {
    if (!this.socketPath) return;
    this.lastSweep = Date.now();
    const now = Date.now();
    const idleMs = this.limits.idleConnectionS * 1000;
    const pids = this.sessionPids();
    const peers = this.peers();
    const full = force || peers.length >= this.max;
    const perPid = new Map<number, number>();
    const seen = new Set<number>();
    let tooMany = 0;
    let idle = 0;
    const end = (p: ConnectedPeer): boolean => endConnection(this.socketPath!, p.fd, p.inode);
    for (const p of peers) {
      seen.add(p.inode);
      const n = (perPid.get(p.pid) ?? 0) + 1;
      perPid.set(p.pid, n);
      if (n > this.limits.maxConnectionsPerProcess) {
        if (end(p)) tooMany++;
        continue;
      }
      if (pids.has(p.pid)) {
        this.sessionless.delete(p.inode);
        continue;
      }
      const since = this.sessionless.get(p.inode) ?? now;
      this.sessionless.set(p.inode, since);
      if ((full || now - since >= idleMs) && end(p)) {
        this.sessionless.delete(p.inode);
        idle++;
      }
    }
    for (const inode of this.sessionless.keys()) if (!seen.has(inode)) this.sessionless.delete(inode);
    this.open = peers.length - tooMany - idle;
    if (tooMany + idle > 0) {
      this.ended += tooMany + idle;
      this.log.warn(
        `closed ${idle} connection(s) whose process had no session${force ? " (socket hidden)" : full ? " (at maxConnections)" : ` for ${idleMs / 1000} s`}` +
          ` and ${tooMany} beyond maxConnectionsPerProcess ${this.limits.maxConnectionsPerProcess}; ${this.open} open`,
      );
    }
  }
}
