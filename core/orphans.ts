// Temporary block files whose writer is gone. A dump writes a temporary file
// named after its engine (layout.ts, tempPath); if the engine
// dies before commit, the file stays. It is removed when the writer is known
// dead (same host, pid gone) or, for writers on other nodes sharing the
// directory, when it is older than any live engine would keep it.
import * as fs from "fs";
import * as path from "path";
import { hostTag, parseTempName, tempDir } from "./layout";
import { removeFiles } from "./native";

/** True while a process with this pid exists (EPERM: exists, another user's). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

export interface SweepResult {
  removed: number;
  kept: number;
}

/**
 * Removes orphaned temporary files under every namespace of `backends`.
 * `ownTag` is this engine's own tag (never swept); `maxAgeMs` is the age after
 * which a file of a writer on another host counts as abandoned.
 */
export async function sweepOrphans(backends: readonly string[], ownTag: string, maxAgeMs: number, now = Date.now()): Promise<SweepResult> {
  const me = hostTag();
  const res: SweepResult = { removed: 0, kept: 0 };
  for (const b of backends) {
    let spaces: string[];
    try {
      spaces = await fs.promises.readdir(b);
    } catch {
      continue;
    }
    for (const ns of spaces) {
      if (ns.startsWith(".")) continue;
      const tmp = tempDir(b, ns);
      let names: string[];
      try {
        // Real directories only: a symbolic link planted as a namespace or its .tmp must never lead the
        // sweep to delete files elsewhere.
        if (!(await realDir(path.join(b, ns))) || !(await realDir(tmp))) continue;
        names = await fs.promises.readdir(tmp);
      } catch {
        continue;
      }
      for (const name of names) {
        if (name.includes(`.${ownTag}.`)) {
          res.kept++;
          continue;
        }
        const file = path.join(tmp, name);
        const w = parseTempName(name);
        let orphan: boolean;
        if (w && w.host === me) {
          orphan = !processAlive(w.pid);
        } else {
          try {
            orphan = now - (await fs.promises.stat(file)).mtimeMs > maxAgeMs;
          } catch {
            continue; // already gone
          }
        }
        if (orphan) {
          // Through descriptors: a namespace or .tmp swapped for a link since the check above leads nowhere.
          await removeFiles(backends, [file]);
          res.removed++;
        } else {
          res.kept++;
        }
      }
    }
  }
  return res;
}

async function realDir(p: string): Promise<boolean> {
  try {
    return (await fs.promises.lstat(p)).isDirectory();
  } catch {
    return false;
  }
}
