// The engine and the shim name the same runtime directory (and so the same
// default socket) for a storage_backends string: one table of cases, shared
// with test/python/test_config.py.
import * as crypto from "crypto";
import * as os from "os";
import * as path from "path";
import { defaultEndpoint, defaultRuntimeDir } from "../core/config";
// eslint-disable-next-line @typescript-eslint/no-require-imports
const table = require("./fixtures/runtime_dir_cases.json") as { cwd: string; cases: Array<{ storage_backends: string; absolute: string }> };

test.each(table.cases)("runtime directory of $storage_backends", ({ storage_backends, absolute }) => {
  const before = process.cwd();
  process.chdir(table.cwd);
  try {
    const digest = crypto.createHash("sha256").update(absolute).digest("hex").slice(0, 12);
    const dir = path.join(os.tmpdir(), `ucm-${process.getuid!()}`, digest);
    expect(defaultRuntimeDir(storage_backends)).toBe(dir);
    expect(defaultEndpoint(storage_backends)).toBe(`ipc://${dir}/engine.sock`);
  } finally {
    process.chdir(before);
  }
});
