"""Two-user cases of issue 25 (test_multiuser.py makes the assertions): a
neighbour who poses as a user's engine (a socket she bound first, a runtime
directory she made before the user's first run, a process of hers behind a
socket file of root's), and a process that names another one's pid in its
hello. Run by multiuser_cases.py inside the world of multiuser_world.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from multiuser_cases import ALICE, HELLO, MALLORY, NODE, ROOT, Engine, client, sh, user_dir

HERE = os.path.dirname(os.path.abspath(__file__))
NEVER_STORED = [b"never-stored-0", b"never-stored-1"]


class Fake:
    """test/python/fake_engine.py at `path`: a process of `uid` that binds it, or (listen_only) a root process
    that binds it and becomes `uid` before it listens."""

    def __init__(self, path: str, uid: int, listen_only: bool = False):
        self.log = f"/tmp/fake-{os.path.basename(path)}.log"
        open(self.log, "w").close()
        os.chown(self.log, uid, uid)
        how = "--listen-as" if listen_only else "--as"
        cmd = [sys.executable, os.path.join(HERE, "fake_engine.py"), path, self.log, how, str(uid)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if "listening" not in line:
            raise RuntimeError(f"fake engine did not start: {line}{self.proc.communicate()[0]}")

    def saw(self) -> list[str]:
        try:
            with open(self.log) as f:
                return [x for x in f.read().splitlines() if x]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def use_store(config: dict[str, Any]) -> dict[str, Any]:
    """What vLLM's side would see through NfsStore: the engine found (or
    started) as usual, then, with a store that does not start engines (as the
    connector's link after a failure), lookups of blocks never stored and a
    load of one."""
    import torch

    from ucm.store import NfsStore

    out: dict[str, Any] = {"error": None}
    try:
        NfsStore(config).close()
    except Exception as e:  # noqa: BLE001 - what it raises is what the test looks at
        out["error"] = f"{type(e).__name__}: {e}"
    store = NfsStore(config, start_engine=False)
    try:
        out["found"] = store.lookup(NEVER_STORED)
        dst = torch.zeros(1024)
        out["wait"] = store.wait(store.load(NEVER_STORED[:1], [0], [dst]))
    finally:
        store.close()
    return out


def root_config(**extra: Any) -> dict[str, Any]:
    user_dir("/tmp/rootstore", 0)
    return {
        "ucm_connector_name": "UcmNfsStore",
        "ucm_connector_config": {"storage_backends": "/tmp/rootstore", "clientTimeoutMs": 2000, **extra},
    }


def case_fake_engine_in_squatted_runtime_dir(uids: dict[str, int]) -> dict[str, Any]:
    """Mallory makes root's runtime directory before root's first run and serves a fake engine in it."""
    from ucm.config import runtime_dir

    config = root_config()
    rdir = runtime_dir("/tmp/rootstore")
    user_dir(os.path.dirname(rdir), uids[MALLORY], 0o755)
    user_dir(rdir, uids[MALLORY], 0o755)
    fake = Fake(os.path.join(rdir, "engine.sock"), uids[MALLORY])
    try:
        out = use_store(config)
    finally:
        fake.stop()
    return {**out, "fake_saw": fake.saw()}


def case_fake_engine_at_an_endpoint_in_tmp(uids: dict[str, int]) -> dict[str, Any]:
    """An endpoint directly in /tmp: Mallory binds it first. Neither the shim nor root's engine use such a path."""
    config = root_config(endpoint="ipc:///tmp/x.sock")
    fake = Fake("/tmp/x.sock", uids[MALLORY])
    try:
        out = use_store(config)
    finally:
        fake.stop()
    e = Engine({"storage_backends": "/tmp/rootstore", "endpoint": "ipc:///tmp/y.sock"}, "/tmp")
    e.stop()
    return {**out, "fake_saw": fake.saw(), "engine_started": bool(e.endpoint), "engine_output": e.output}


def case_socket_of_root_served_by_another_user(uids: dict[str, int]) -> dict[str, Any]:
    """Root's own runtime directory and socket file, but the process listening is Mallory's (it took over the
    listening socket): only the kernel's SO_PEERCRED tells."""
    from ucm.config import runtime_dir

    config = root_config()
    rdir = runtime_dir("/tmp/rootstore")
    os.makedirs(rdir, 0o700)
    fake = Fake(os.path.join(rdir, "engine.sock"), uids[MALLORY], listen_only=True)
    try:
        out = use_store(config)
    finally:
        fake.stop()
    return {**out, "fake_saw": fake.saw()}


# A client holding a session and an open shared memory file; after a go-file appears it says hello again.
VICTIM_JS = r"""
const fs = require("fs");
const { EngineClient } = require(process.argv[2] + "/dist/core/client.js");
const [endpoint, seg, go] = process.argv.slice(3);
(async () => {
  const fd = fs.openSync(seg, "r+");
  const c = new EngineClient(endpoint, 5000);
  await c.call("hello", { version: 1, pid: process.pid, name: "victim" });
  console.log(JSON.stringify({ pid: process.pid, fd }));
  const end = Date.now() + 30000;
  while (!fs.existsSync(go) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
  const again = new EngineClient(endpoint, 5000);
  try { await again.call("hello", { version: 1, pid: process.pid, name: "victim" }); console.log(JSON.stringify({ ok: true })); }
  catch (e) { console.log(JSON.stringify({ ok: false, code: e.code, error: e.message })); }
  process.exit(0);
})();
"""

# Seventeen connections, each saying hello in the victim's name and mapping the victim's memory through /proc.
ATTACK_JS = r"""
const { EngineClient } = require(process.argv[2] + "/dist/core/client.js");
const [endpoint, pid, fd] = process.argv.slice(3);
(async () => {
  const out = [];
  for (let i = 0; i < 17; i++) {
    const c = new EngineClient(endpoint, 5000);
    const r = {};
    try { await c.call("hello", { version: 1, pid: Number(pid), name: "impostor" }); r.hello = "ok"; }
    catch (e) { r.hello = e.code + ": " + e.message; }
    try { await c.call("register", { regions: [{ medium: "host", source: `/proc/${pid}/fd/${fd}`, size: 8192 }] }); r.register = "ok"; }
    catch (e) { r.register = e.code; }
    out.push(r);
  }
  console.log(JSON.stringify(out));
  process.exit(0);
})();
"""


def _script(name: str, text: str) -> str:
    path = f"/tmp/{name}"
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def case_hello_with_the_victims_pid(uids: dict[str, int]) -> dict[str, Any]:
    """Another of Alice's processes says hello in the name of Alice's vLLM process (pid of a connected process)."""
    home = user_dir("/tmp/alice", uids[ALICE])
    user_dir(f"{home}/store", uids[ALICE])
    sh("sh", "-c", "umask 077; truncate -s 8192 /dev/shm/alice-seg", user=ALICE, check=True)
    e = Engine({"storage_backends": f"{home}/store", "endpoint": f"ipc://{home}/e.sock"}, home, user=ALICE)
    go = f"{home}/go"
    try:
        victim = subprocess.Popen(
            [
                "runuser",
                "-u",
                ALICE,
                "--",
                NODE,
                _script("victim.js", VICTIM_JS),
                ROOT,
                e.endpoint,
                "/dev/shm/alice-seg",
                go,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",
        )
        first = json.loads(victim.stdout.readline())  # type: ignore[union-attr]
        attack = sh(
            NODE, _script("attack.js", ATTACK_JS), ROOT, e.endpoint, str(first["pid"]), str(first["fd"]), user=ALICE
        )
        sh("touch", go, user=ALICE, check=True)
        again = json.loads(victim.stdout.readline())  # type: ignore[union-attr]
        victim.wait(timeout=30)
        return {
            "started": bool(e.endpoint),
            "output": e.output,
            "attack": json.loads(attack.stdout.strip().splitlines()[-1]),
            "victim_again": again,
        }
    finally:
        e.stop()


# Holds `n` plain tcp connections to the port (no ZeroMQ, no key: what any user can do), opening a new one
# whenever one is closed, until killed.
FLOOD_JS = r"""
const net = require("net");
const [port, n] = process.argv.slice(2).map(Number);
let open = 0, made = 0;
const one = () => {
  made++;
  const s = net.connect(port, "127.0.0.1");
  s.on("connect", () => open++);
  s.on("error", () => {});
  s.on("close", (hadErr) => { open = Math.max(0, open - 1); setTimeout(one, 5); });
};
for (let i = 0; i < n; i++) one();
setInterval(() => console.log(JSON.stringify({ open, made })), 500);
"""


def case_tcp_flood_of_another_user(uids: dict[str, int]) -> dict[str, Any]:
    """Mallory holds 600 keyless connections to Alice's tcp engine (256 descriptors), opening a new one whenever one
    is closed; Alice's client says hello meanwhile."""
    home = user_dir("/tmp/alice", uids[ALICE])
    user_dir(f"{home}/store", uids[ALICE])
    port = 20000 + os.getpid() % 20000
    e = Engine(
        {"storage_backends": f"{home}/store", "endpoint": f"tcp://127.0.0.1:{port}"},
        home,
        user=ALICE,
        wrap=("prlimit", "--nofile=256:256", "--"),
    )
    if not e.endpoint:
        return {"started": False, "output": e.output}
    flood = subprocess.Popen(
        # setpriv execs (runuser would fork, and killing it would leave the flood running)
        ["setpriv", f"--reuid={uids[MALLORY]}", f"--regid={uids[MALLORY]}", "--clear-groups", NODE]
        + [_script("flood.js", FLOOD_JS), str(port), "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd="/",
    )
    try:
        time.sleep(3)  # the flood at full strength
        t0 = time.monotonic()
        # Alice's client asks as the shim does: a request that gets no reply within its 2 s is asked again on a
        # new connection (under the flood the first connection can wait behind the flood's in the accept queue).
        attempts = 0
        while True:
            attempts += 1
            hello = client(e.endpoint, [HELLO, ("health", {})], user=ALICE)
            took = time.monotonic() - t0
            if all(isinstance(h, dict) and h.get("ok") for h in hello) or took > 10:
                break
    finally:
        flood.kill()
        out = flood.communicate()[0]
        e.stop()
    rest = e.proc.stdout.read()  # type: ignore[union-attr]
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {
        "started": True,
        "output": e.output + rest,
        "hello": hello,
        "hello_attempts": attempts,
        "took_s": took,
        "flood": lines[-1] if lines else None,
    }
