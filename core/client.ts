// A small TypeScript client of the engine protocol (docs/PROTOCOL.md), used by
// the CLI (health, stats) and the tests. The Python shim has its own.
import * as zmq from "zeromq";
import { Packr } from "msgpackr";
import { fetchToken } from "./credentials";
import { isTcp, readServerKey } from "./curve";

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: "number" });

export class EngineError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "EngineError";
  }
}

export class EngineClient {
  private readonly sock: zmq.Dealer;
  private nextId = 1;
  private readonly waiting = new Map<
    number,
    { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }
  >();
  private sending: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(
    readonly endpoint: string,
    private readonly timeoutMs = 10_000,
  ) {
    const options: zmq.SocketOptions<zmq.Dealer> = { linger: 0 };
    if (isTcp(endpoint)) {
      // The engine on tcp:// serves only clients that know its public key (see curve.ts).
      const mine = zmq.curveKeyPair();
      Object.assign(options, { curveServerKey: readServerKey(endpoint), curvePublicKey: mine.publicKey, curveSecretKey: mine.secretKey });
    }
    this.sock = new zmq.Dealer(options);
    this.sock.connect(endpoint);
    void this.receive();
  }

  private async receive(): Promise<void> {
    try {
      for await (const [frame] of this.sock) {
        const msg = packr.unpack(frame) as Record<string, unknown>;
        const w = typeof msg.id === "number" ? this.waiting.get(msg.id) : undefined;
        if (!w) continue;
        this.waiting.delete(msg.id as number);
        clearTimeout(w.timer);
        w.resolve(msg);
      }
    } catch {
      /* socket closed */
    }
  }

  /** Sends raw frames (for malformed-message tests). */
  async sendRaw(frames: Buffer[]): Promise<void> {
    this.sending = this.sending.then(() => this.sock.send(frames));
    await this.sending;
  }

  /**
   * Sends one request and returns the whole reply map (ok or not). A hello gets a token from the engine's credential
   * socket (core/identity.ts) unless it names `cred` itself.
   */
  async raw(req: Record<string, unknown>, timeoutMs = this.timeoutMs): Promise<Record<string, unknown>> {
    if (this.closed) throw new Error("client is closed");
    if (req.op === "hello" && !("cred" in req)) {
      const cred = await fetchToken(this.endpoint, timeoutMs);
      if (cred !== undefined) req = { ...req, cred };
    }
    const id = this.nextId++;
    const reply = new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new EngineError("timeout", `no reply to ${String(req.op)} within ${timeoutMs} ms from ${this.endpoint}`));
      }, timeoutMs);
      this.waiting.set(id, { resolve, reject, timer });
    });
    await this.sendRaw([packr.pack({ ...req, id })]);
    return reply;
  }

  /** Sends one request; an error reply throws EngineError with its code. */
  async call(op: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<Record<string, unknown>> {
    const r = await this.raw({ op, ...args }, timeoutMs);
    if (r.ok !== true) {
      const err = (r.error ?? {}) as { code?: string; message?: string };
      throw new EngineError(err.code ?? "unknown", err.message ?? "error reply without message");
    }
    return r;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.waiting.values()) {
      clearTimeout(w.timer);
      w.reject(new Error("client closed"));
    }
    this.waiting.clear();
    this.sock.close();
  }
}
