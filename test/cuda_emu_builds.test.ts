// Which builds of the addon the GPU-path tests run: the one over the
// emulated CUDA runtime (not the production build by mistake), and backends
// compiled for older CUDA runtimes than the emulation's default.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { EMU_ADDON, EmuDeviceMemory, EmuEvent, buildEmuAddon } from "./helpers/cuda_emu";
import { GPU_A, Node, all, roundTrip, sameBlocks, startNode, stopNode } from "./helpers/cuda_emu_node";
import { hello, shortTmp, startEngine, until, writeConfig } from "./helpers/engine";

let node: Node | undefined;
const mem: Array<EmuDeviceMemory | EmuEvent> = [];

beforeAll(() => {
  buildEmuAddon();
}, 300000);

afterEach(async () => {
  await stopNode(node);
  node = undefined;
  mem.splice(0).forEach((m) => m.free());
});

describe("older CUDA runtimes", () => {
  test("the backend compiles for CUDA 12.8 (batched copies with failIdx) and before 12.8 (kernel only)", () => {
    const root = path.resolve(__dirname, "..");
    for (const v of [12080, 12040]) {
      const r = spawnSync(
        "g++",
        [
          "-std=c++17",
          "-fsyntax-only",
          "-Wall",
          "-Wextra",
          "-Werror",
          "-DUCM_CUDA_EMU=1",
          `-DUCM_EMU_CUDART_VERSION=${v}`,
          "-Inative/cuda_emu",
          "-Inative/src",
          "native/src/cuda_backend.cc",
          "native/src/cuda_stager.cc",
        ],
        { cwd: root, encoding: "utf8" },
      );
      expect({ v, status: r.status, err: r.stderr }).toEqual({ v, status: 0, err: "" });
    }
  });

  test("a CUDA 12.8 build on a 12.4 driver moves blocks with the kernel after one notice", async () => {
    const out = path.resolve(__dirname, "../native/build-emu-12080");
    const addon = buildEmuAddon(out, 12080);
    node = await startNode([GPU_A], { cudaCopy: "batch" }, { UCM_NATIVE_ADDON: addon, UCM_CUDA_EMU_DRIVER: "12040" });
    expect(node.engine.output()).toMatch(/runtime 12080, driver 12040/);
    const c = node.engine.client();
    await hello(c);
    const r = await roundTrip(c, mem, GPU_A, "old");
    expect([r.dump, r.load]).toEqual([r.ok, r.ok]);
    expect(sameBlocks(r.dst, r.src, all)).toBe(true);
    await until("the notice", () =>
      /cudaMemcpyBatchAsync is not available with this driver \(CUDA 12\.4; cudaMemcpyBatchAsync: cudaErrorCallRequiresNewerDriver/.test(
        node!.engine.output(),
      ),
    );
  }, 300000);
});

test("the emulated addon is the one under test: these engines map native/build-emu's addon, a plain engine the production one", async () => {
  const mapped = (pid: number) =>
    new Set(
      fs
        .readFileSync(`/proc/${pid}/maps`, "utf8")
        .split("\n")
        .map((l) => l.slice(l.indexOf("/")))
        .filter((f) => f.endsWith("ucm_native.node")),
    );
  node = await startNode([GPU_A]);
  expect([...mapped(node.engine.proc.pid!)]).toEqual([EMU_ADDON]);
  const c = node.engine.client();
  expect((await c.call("stats")).cuda).toMatchObject({ built: true, usable: true, emulated: true, devices: 1 });
  // Without UCM_NATIVE_ADDON the engine loads native/build, which knows nothing of the emulation.
  const env = { ...process.env };
  delete env.UCM_NATIVE_ADDON;
  const dir = shortTmp("ucmp-");
  fs.mkdirSync(path.join(dir, "store"));
  const plain = await startEngine(
    writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/p.sock` }),
    [],
    env,
  );
  try {
    expect([...mapped(plain.proc.pid!)]).toEqual([path.resolve(__dirname, "../native/build/Release/ucm_native.node")]);
    expect((await plain.client().call("stats")).cuda).toMatchObject({ emulated: false });
  } finally {
    await plain.stop("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
