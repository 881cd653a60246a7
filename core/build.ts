// Which build of the engine this is: a digest of what runs (the compiled
// TypeScript of core/ and the native addon). A shim started from one checkout
// or wheel compares it with the build it ships, so an engine left running
// from an older build is noticed instead of silently serving new clients.
// python_shim/ucm/launcher.py build_id computes the same digest.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";

let cached: string | undefined;

/** sha256 over (relative path, contents) of dist/core/*.js and the addon, in name order; 16 hex digits. */
export function buildId(root = path.resolve(__dirname, "..", "..")): string {
  if (cached !== undefined && root === path.resolve(__dirname, "..", "..")) return cached;
  const files: string[] = [];
  const core = path.join(root, "dist", "core");
  for (const f of fs.readdirSync(core).sort()) if (f.endsWith(".js")) files.push(path.join("dist", "core", f));
  files.push(path.join("native", "build", "Release", "ucm_native.node"));
  const h = crypto.createHash("sha256");
  for (const rel of files) {
    h.update(rel + "\0");
    try {
      h.update(fs.readFileSync(path.join(root, rel)));
    } catch {
      h.update("missing");
    }
    h.update("\0");
  }
  const id = h.digest("hex").slice(0, 16);
  if (root === path.resolve(__dirname, "..", "..")) cached = id;
  return id;
}
