// A tcp endpoint's connections that can never be served. Every local user can
// connect to the port, but only holders of the CURVE key (the engine's user and
// root, who alone can read it) complete the handshake. Until ZeroMQ gives up on
// a handshake each such connection holds one of the engine's descriptors, so
// a flood of them would keep the engine's own clients out. Two bounds:
// - a connection whose client socket belongs to another user (the kernel's
//   socket table says whose it is: native/src/tcp_peers.h) is closed as soon
//   as the engine sees it, right after the accept;
// - any other connection that has not completed the handshake within
//   HANDSHAKE_MS is closed by ZeroMQ (a client of the engine's user without
//   the key; a real client needs milliseconds).
import * as zmq from "zeromq";
import { Logger } from "./log";
import { endTcpConnection, tcpPeers } from "./native";

/** How long ZeroMQ waits for a tcp client's CURVE handshake (ZMQ_HANDSHAKE_IVL). */
export const HANDSHAKE_MS = 5000;

export class TcpGuard {
  private readonly port: number;
  private readonly owners = new Map<number, number>(); // socket inode -> uid of the client's end
  private readonly uid = typeof process.geteuid === "function" ? process.geteuid() : 0;
  private timer?: NodeJS.Timeout;
  private queued = false;
  private lastSweep = 0;
  private lastLog = 0;
  private unlogged = 0;
  /** Connections of other users closed, in all. */
  ended = 0;

  constructor(
    sock: zmq.Router,
    endpoint: string,
    private readonly log: Logger,
  ) {
    this.port = Number(endpoint.slice(endpoint.lastIndexOf(":") + 1));
    sock.events.on("accept", () => this.soon());
    // Accepts the event loop did not hear of yet (they come in bursts) are found by the next pass.
    this.timer = setInterval(() => this.sweep(), 1000);
    this.timer.unref();
    this.sweep(); // opens what every sweep reads now, while descriptors are free (tcp_peers.cc)
  }

  /** A pass right after an accept: at most one every 20 ms. */
  private soon(): void {
    if (this.queued) return;
    this.queued = true;
    setTimeout(
      () => {
        this.queued = false;
        this.sweep();
      },
      Math.max(0, 20 - (Date.now() - this.lastSweep)),
    );
  }

  /** Closes the connections of other users; reads the kernel's socket table only for connections not seen yet. */
  sweep(): void {
    this.lastSweep = Date.now();
    let peers = tcpPeers(this.port, false);
    if (peers.some((p) => !this.owners.has(p.inode))) peers = tcpPeers(this.port, true);
    const seen = new Set<number>();
    for (const p of peers) {
      seen.add(p.inode);
      const uid = this.owners.get(p.inode) ?? p.uid;
      if (uid < 0) continue; // its client is gone already, or not in this host's table: the handshake limit decides
      this.owners.set(p.inode, uid);
      if (uid === this.uid || uid === 0) continue;
      if (endTcpConnection(this.port, p.fd, p.inode)) {
        this.ended++;
        this.unlogged++;
      }
    }
    for (const inode of this.owners.keys()) if (!seen.has(inode)) this.owners.delete(inode);
    if (this.unlogged > 0 && Date.now() - this.lastLog > 10_000) {
      this.log.warn(
        `closed ${this.unlogged} tcp connection(s) of other users: only this user (uid ${this.uid}) and root can hold the CURVE key`,
      );
      this.unlogged = 0;
      this.lastLog = Date.now();
    }
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }
}
