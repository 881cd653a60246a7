// Where the engine's ipc socket may live. A client finds the engine by the
// socket's path alone, so whoever can put a socket at that path can pose as
// the engine: see every block hash and answer every lookup with a hit. The
// engine therefore binds only in a directory that nobody but its user (or
// root) can write, and the shim checks the same before it connects
// (python_shim/ucm/engine_trust.py).
import * as fs from "fs";
import * as path from "path";

function uid(): number {
  return typeof process.getuid === "function" ? process.getuid() : 0;
}

/**
 * The directory of an ipc:// socket. Created 0700 (with a missing parent) when missing; an existing one must be a
 * real directory of this user or of root that nobody else can write, and its parent the same or sticky (like
 * /tmp, where nobody can rename a directory of ours). The mode of a directory the engine did not create is never
 * changed. Throws, saying what to do.
 */
export function socketDir(dir: string): void {
  const me = uid();
  fs.mkdirSync(path.dirname(dir), { recursive: true, mode: 0o700 });
  try {
    fs.mkdirSync(dir, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
  }
  for (const d of [dir, path.dirname(dir)]) {
    const st = fs.lstatSync(d);
    const mode = (st.mode & 0o7777).toString(8);
    if (!st.isDirectory()) throw new Error(`socket directory ${d} is not a plain directory (a symbolic link?)`);
    if (st.uid !== me && st.uid !== 0) {
      throw new Error(
        `socket directory ${d} belongs to uid ${st.uid}, not to this user (${me}) or root: another user made it, and could ` +
          `put a socket of their own in it. Remove it (as root or uid ${st.uid}), or choose another endpoint ` +
          "(a directory of your own, or set XDG_RUNTIME_DIR for the default one)",
      );
    }
    if ((st.mode & 0o022) === 0) continue;
    if (d === dir && (st.mode & 0o1000) !== 0) {
      throw new Error(
        `socket directory ${d} is writable by other users (mode ${mode}, sticky like /tmp): any of them could bind ` +
          "the socket's name first and pose as the engine. Put the socket in a directory of your own " +
          "(the default endpoint does: leave endpoint out)",
      );
    }
    if ((st.mode & 0o1000) === 0) throw new Error(`socket directory ${d} is writable by other users (mode ${mode}) without the sticky bit`);
  }
}
