// Which process a client is. A hello names a pid, and the engine trusts that
// pid with a lot: it maps /proc/<pid>/fd/<n> of that process as the client's
// memory, counts sessions per pid, and keeps a session while the pid lives.
// ZeroMQ does not tell which connection a message came in on, so the kernel's
// word about that connection (SO_PEERCRED) cannot be had for a hello. On ipc
// the engine therefore serves a second unix socket beside its endpoint (the
// credential socket, native/src/peer_tokens.h): a client reads a one-time
// token there, the kernel tells the engine which process connected, and the
// hello carries the token. The hello's pid must be that process. On tcp no
// such proof exists: the pid is taken as said, marked unverified, and never
// used to reach into a process (see sessions.ts).
import { credentialPath } from "./credentials";
import { Logger } from "./log";
import { credentialListen, credentialStop, redeemToken } from "./native";
import { ProtocolError } from "./protocol";
import { HelloRequest } from "./requests";

/** How long a token stays good (native/src/peer_tokens.cc, kLifetime). */
export const TOKEN_LIFETIME_S = 30;

export interface ClientProcess {
  pid: number;
  /** True when the kernel vouched for the pid (ipc); false when it is only what the hello said (tcp). */
  verified: boolean;
}

export class ClientIdentity {
  private readonly path?: string;
  private listening = false;

  constructor(
    readonly endpoint: string,
    private readonly log: Logger,
  ) {
    this.path = credentialPath(endpoint);
  }

  /** Serves the credential socket (ipc), mode 0600 like the endpoint's; throws what failed. */
  start(): void {
    if (!this.path) {
      this.log.info(
        "tcp endpoint: a client's pid cannot be verified (no SO_PEERCRED over tcp): sessions are kept by their connection, " +
          "and /proc/<pid>/fd regions are refused (use named shared memory, or an ipc endpoint)",
      );
      return;
    }
    const err = credentialListen(this.path, 0o600);
    if (err) throw new Error(`credential socket: ${err}`);
    this.listening = true;
  }

  stop(): void {
    if (this.listening) credentialStop();
    this.listening = false;
  }

  /** The process a hello's session belongs to; a ProtocolError naming the field when the hello cannot be believed. */
  of(req: HelloRequest): ClientProcess {
    if (!this.path) return { pid: req.pid, verified: false };
    if (req.cred === undefined) {
      throw new ProtocolError(
        "bad_message",
        `a hello on ipc must carry cred, a token read from ${this.path} just before (docs/PROTOCOL.md, hello): ` +
          "the engine takes a client's pid from the kernel, not from the hello",
      );
    }
    const peer = redeemToken(req.cred);
    if (!peer) {
      throw new ProtocolError(
        "bad_message",
        `cred: token unknown, used or older than ${TOKEN_LIFETIME_S} s; read a fresh one from ${this.path}`,
      );
    }
    const euid = typeof process.geteuid === "function" ? process.geteuid() : 0;
    if (peer.uid !== euid && peer.uid !== 0)
      throw new ProtocolError("bad_message", `the process that connected runs as uid ${peer.uid}; this engine serves uid ${euid} only`);
    if (peer.pid !== req.pid) {
      throw new ProtocolError(
        "bad_message",
        `hello names pid ${req.pid}, but the process that connected is pid ${peer.pid} (the kernel says so; ` +
          "a client in a pid namespace of its own must run in the engine's, e.g. --pid=host)",
      );
    }
    return { pid: peer.pid, verified: true };
  }
}
