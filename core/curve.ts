// tcp:// endpoints can be reached by every user of the machine, unlike an
// ipc:// socket in a 0700 directory. On tcp the engine therefore speaks
// CURVE: it makes a fresh key pair at every start and writes the public key
// to /tmp/ucm-<uid>/tcp-<host>-<port>.curve (0600, in a directory only its
// user may enter). A client must present that key to be served, so only
// processes of the engine's own user (and root) can talk to it. The shim
// reads the same file (python_shim/ucm/client.py).
import * as fs from "fs";
import * as os from "os";
import * as path from "path";

export function isTcp(endpoint: string): boolean {
  return endpoint.startsWith("tcp://");
}

/** Where the public key of the engine serving `endpoint` is published for this user. */
export function curveKeyFile(endpoint: string): string {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  const hostPort = endpoint.slice("tcp://".length).replace(/[^A-Za-z0-9.-]/g, "-");
  return path.join(os.tmpdir(), `ucm-${uid}`, `tcp-${hostPort}.curve`);
}

/**
 * Creates `dir` 0700 when missing, and accepts an existing one only if it is a real directory of this user that
 * nobody else can write (its mode is never changed: it may be someone's on purpose).
 */
export function ownDir(dir: string): void {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  try {
    fs.mkdirSync(dir, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
  }
  const st = fs.lstatSync(dir);
  if (!st.isDirectory()) throw new Error(`${dir} is not a plain directory (a symbolic link?)`);
  if (st.uid !== uid) throw new Error(`${dir} belongs to uid ${st.uid}, not to this user (${uid})`);
  if ((st.mode & 0o022) !== 0) throw new Error(`${dir} is writable by other users (mode ${(st.mode & 0o777).toString(8)})`);
}

/** Writes the engine's public key for its clients; never through a symbolic link. */
export function publishServerKey(endpoint: string, publicKey: string): string {
  const file = curveKeyFile(endpoint);
  ownDir(path.dirname(file));
  fs.rmSync(file, { force: true });
  const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
  try {
    fs.writeSync(fd, `${publicKey}\n`);
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

/** Removes the published key at shutdown, if it is still this engine's (a stale key only misleads clients). */
export function unpublishServerKey(endpoint: string, publicKey: string): void {
  const file = curveKeyFile(endpoint);
  try {
    if (fs.readFileSync(file, "utf8").trim() === publicKey) fs.rmSync(file, { force: true });
  } catch {
    /* gone already */
  }
}

/** The public key a client needs for `endpoint`; an error naming the file when this user has none. */
export function readServerKey(endpoint: string): string {
  const file = curveKeyFile(endpoint);
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch (e) {
    throw new Error(
      `no CURVE key for ${endpoint} at ${file} (${(e as Error).message}): the engine there is not running, or belongs to another user`,
      { cause: e },
    );
  }
}
