// The engine and the shim name the same runtime directory (and so the same
// default socket) for a storage_backends string: one table of cases, shared
// with test/python/test_config.py.
import * as crypto from "crypto";
import * as fs from "fs";
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

test("XDG_RUNTIME_DIR holds the runtime directory when it is a private directory of this user; otherwise /tmp/ucm-<uid>", () => {
  const xdg = fs.mkdtempSync(path.join(os.tmpdir(), "xdg-"));
  const before = process.env.XDG_RUNTIME_DIR;
  const digest = crypto.createHash("sha256").update("/srv/kv").digest("hex").slice(0, 12);
  try {
    process.env.XDG_RUNTIME_DIR = xdg;
    fs.chmodSync(xdg, 0o700);
    expect(defaultRuntimeDir("/srv/kv")).toBe(path.join(xdg, "ucm", digest));
    fs.chmodSync(xdg, 0o755); // others may enter: not private
    expect(defaultRuntimeDir("/srv/kv")).toBe(path.join(os.tmpdir(), `ucm-${process.getuid!()}`, digest));
    process.env.XDG_RUNTIME_DIR = path.join(xdg, "missing");
    expect(defaultRuntimeDir("/srv/kv")).toBe(path.join(os.tmpdir(), `ucm-${process.getuid!()}`, digest));
  } finally {
    if (before === undefined) delete process.env.XDG_RUNTIME_DIR;
    else process.env.XDG_RUNTIME_DIR = before;
    fs.rmSync(xdg, { recursive: true, force: true });
  }
});
