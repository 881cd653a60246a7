// The client's half of the credential socket (core/identity.ts): where it is
// and how a token is read from it. No addon here: the CLI and the tests use it
// through client.ts, and the Python shim has its own copy
// (python_shim/ucm/engine_trust.py).
import * as net from "net";

/** The credential socket of an ipc endpoint: its socket's path plus ".cred" (none on tcp). */
export function credentialPath(endpoint: string): string | undefined {
  return endpoint.startsWith("ipc://") ? `${endpoint.slice("ipc://".length)}.cred` : undefined;
}

/** A token from the credential socket of `endpoint`, or undefined when there is none or it does not answer in time. */
export function fetchToken(endpoint: string, timeoutMs: number): Promise<string | undefined> {
  const file = credentialPath(endpoint);
  if (!file) return Promise.resolve(undefined);
  return new Promise((resolve) => {
    let got = "";
    const s = net.createConnection(file);
    const done = (v: string | undefined) => {
      clearTimeout(t);
      s.destroy();
      resolve(v);
    };
    const t = setTimeout(() => done(undefined), timeoutMs);
    s.on("data", (d) => {
      got += String(d);
      if (got.length >= 32) done(got.slice(0, 32));
    });
    s.on("error", () => done(undefined));
    s.on("close", () => done(got.length === 32 ? got : undefined));
  });
}
