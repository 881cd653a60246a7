"""The two-user cases of test_multiuser.py, run as root inside the world that
multiuser_world.sh builds (private /etc, /tmp and /dev/shm). Each case adds two
users, plays the engine's owner and a hostile neighbour, and prints what it
observed as one JSON line; the test makes the assertions.

usage: python multiuser_cases.py <case>
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from typing import Any

from procs import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "dist", "core", "cli.js")
NODE = "/usr/bin/node"
ALICE, MALLORY = "ucmalice", "ucmmallory"

# A client of the engine protocol that any user can run: the calls to make,
# in order, from argv; one JSON line with each call's reply or error.
CLIENT_JS = r"""
const zmq = require(process.argv[2] + "/node_modules/zeromq");
const { EngineClient } = require(process.argv[2] + "/dist/core/client.js");
const [endpoint, callsJson, plain] = process.argv.slice(3);
(async () => {
  const out = [];
  if (plain === "plain") {
    // No CURVE keys: what anyone can send to a tcp port.
    const s = new zmq.Dealer({ linger: 0, receiveTimeout: 1500 });
    s.connect(endpoint);
    await s.send(Buffer.from([0x81, 0xa2, 0x6f, 0x70, 0xa6, 0x68, 0x65, 0x61, 0x6c, 0x74, 0x68]));
    try { await s.receive(); out.push({ ok: true }); } catch (e) { out.push({ ok: false, error: String(e.message) }); }
    s.close();
  } else {
    let c;
    try { c = new EngineClient(endpoint, 2000); } catch (e) { console.log(JSON.stringify([{ ok: false, error: e.message }])); return; }
    for (const [op, args] of JSON.parse(callsJson)) {
      if (op === "hello") args.pid = process.pid;
      try { out.push({ ok: true, reply: await c.call(op, args) }); }
      catch (e) { out.push({ ok: false, code: e.code, error: e.message }); }
    }
    c.close();
  }
  console.log(JSON.stringify(out));
})();
"""


def free_port() -> int:
    """A tcp port nobody listens on now, the kernel's pick (inside the world's pid namespace every pid is small,
    so a port derived from one would be the same for every run on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, user: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd="/", timeout=60)


def add_users() -> dict[str, int]:
    for name in (ALICE, MALLORY):
        sh("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name, check=True)
    return {name: pwd.getpwnam(name).pw_uid for name in (ALICE, MALLORY)}


def client(
    endpoint: str, calls: list[tuple[str, dict[str, Any]]], user: str | None = None, plain: bool = False
) -> list[dict[str, Any]]:
    script = "/tmp/ucm-client.js"
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(CLIENT_JS)
        os.chmod(script, 0o644)
    r = sh(NODE, script, ROOT, endpoint, json.dumps(calls), "plain" if plain else "keys", user=user)
    lines = r.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"client as {user} printed nothing: {r.stderr}")
    return json.loads(lines[-1])


HELLO = ("hello", {"version": 1, "name": "multiuser"})  # the client puts in its own pid


class Engine:
    """`ucm-engine serve` as `user` (None: root) until stopped; `wrap` runs it under a command (prlimit ...)."""

    def __init__(self, config: dict[str, Any], home: str, user: str | None = None, wrap: tuple[str, ...] = ()):
        import yaml

        self.config_file = os.path.join(home, "config.yaml")
        with open(self.config_file, "w") as f:
            yaml.safe_dump({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": config}, f)
        os.chmod(self.config_file, 0o644)
        cmd = [*wrap, NODE, CLI, "serve", "--config", self.config_file]
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", *cmd] if user else cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",
        )
        self.output = ""
        self.endpoint = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            self.output += line
            if "listening on " in line:
                self.endpoint = line.split("listening on ", 1)[1].split()[0]
                break
        if not self.endpoint:
            self.proc.kill()
            self.output += self.proc.communicate()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def user_dir(path: str, uid: int, mode: int = 0o700) -> str:
    os.makedirs(path)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def mode_of(path: str) -> str | None:
    try:
        return oct(os.lstat(path).st_mode & 0o7777)
    except FileNotFoundError:
        return None


def case_ipc_in_tmp(uids: dict[str, int]) -> dict[str, Any]:
    """A root engine asked for a socket directly in /tmp refuses (anyone could bind the name first); in a directory
    of its own under /tmp nobody else reaches it. /tmp and / keep their modes."""
    before = {"tmp": mode_of("/tmp"), "root": mode_of("/")}
    user_dir("/tmp/rootstore", 0)
    in_tmp = Engine({"storage_backends": "/tmp/rootstore", "endpoint": "ipc:///tmp/x.sock"}, "/tmp")
    in_tmp.stop()
    e = Engine({"storage_backends": "/tmp/rootstore", "endpoint": "ipc:///tmp/rootrun/x.sock"}, "/tmp")
    try:
        return {
            "in_tmp": {"started": bool(in_tmp.endpoint), "output": in_tmp.output},
            "started": bool(e.endpoint),
            "output": e.output,
            "before": before,
            "after": {"tmp": mode_of("/tmp"), "root": mode_of("/")},
            "socket": mode_of("/tmp/rootrun/x.sock"),
            "root_hello": client(e.endpoint, [HELLO]),
            "mallory_hello": client(e.endpoint, [HELLO], user=MALLORY),
        }
    finally:
        e.stop()


def case_tcp(uids: dict[str, int]) -> dict[str, Any]:
    """Alice's engine on tcp: Mallory has no key, cannot read Alice's, and plain ZeroMQ gets nothing."""
    home = user_dir("/tmp/alice", uids[ALICE])
    user_dir(f"{home}/store", uids[ALICE])
    port = free_port()
    e = Engine({"storage_backends": f"{home}/store", "endpoint": f"tcp://127.0.0.1:{port}"}, home, user=ALICE)
    try:
        key = f"/tmp/ucm-{uids[ALICE]}/tcp-127.0.0.1-{port}.curve"
        return {
            "started": bool(e.endpoint),
            "output": e.output,
            "key_mode": mode_of(key),
            "alice_hello": client(e.endpoint, [HELLO], user=ALICE),
            "mallory_client": client(e.endpoint, [HELLO], user=MALLORY),
            "mallory_plain": client(e.endpoint, [], user=MALLORY, plain=True),
            "mallory_reads_key": sh("cat", key, user=MALLORY).returncode,
        }
    finally:
        e.stop()


def case_tcp_key_dir_planted(uids: dict[str, int]) -> dict[str, Any]:
    """Mallory makes Alice's key directory first (to plant a key of her own): Alice's engine refuses it."""
    home = user_dir("/tmp/alice", uids[ALICE])
    user_dir(f"{home}/store", uids[ALICE])
    user_dir(f"/tmp/ucm-{uids[ALICE]}", uids[MALLORY], 0o777)
    port = free_port()
    e = Engine({"storage_backends": f"{home}/store", "endpoint": f"tcp://127.0.0.1:{port}"}, home, user=ALICE)
    e.stop()
    return {"started": bool(e.endpoint), "output": e.output, "planted": os.listdir(f"/tmp/ucm-{uids[ALICE]}")}


def case_regions(uids: dict[str, int]) -> dict[str, Any]:
    """Alice's engine maps only Alice's shared memory: Mallory's segment and root's files are refused."""
    home = user_dir("/tmp/alice", uids[ALICE])
    user_dir(f"{home}/store", uids[ALICE])
    for who, seg in ((MALLORY, "/dev/shm/mallory-seg"), (ALICE, "/dev/shm/alice-seg")):
        sh("sh", "-c", f"umask 0; truncate -s 8192 {seg}", user=who, check=True)
    e = Engine({"storage_backends": f"{home}/store", "endpoint": f"ipc://{home}/e.sock"}, home, user=ALICE)
    try:

        def reg(source: str) -> dict[str, Any]:
            return client(
                e.endpoint,
                [HELLO, ("register", {"regions": [{"medium": "host", "source": source, "size": 8192}]})],
                user=ALICE,
            )[1]

        return {
            "started": bool(e.endpoint),
            "output": e.output,
            "mallory_seg": reg("/dev/shm/mallory-seg"),
            "shadow": reg("/etc/shadow"),
            "own_seg": reg("/dev/shm/alice-seg"),
        }
    finally:
        e.stop()


def decoy(path: str) -> str:
    with open(path, "w") as f:
        f.write("root's own bytes\n")
    os.chmod(path, 0o600)
    return path


def case_runtime_dir_planted(uids: dict[str, int]) -> dict[str, Any]:
    """Mallory plants the root launcher's runtime directory with links to a root-only file: refused, file intact."""
    from ucm.config import load_config, runtime_dir
    from ucm.launcher import RuntimeDirError, ensure_engine

    target = decoy("/etc/ucm-decoy")
    user_dir("/tmp/rootstore", 0)
    cfg = load_config(
        {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": "/tmp/rootstore"}}
    )
    rdir = runtime_dir(cfg.storage_backends)
    top = os.path.dirname(rdir)
    user_dir(top, uids[MALLORY], 0o777)
    user_dir(rdir, uids[MALLORY], 0o777)
    for name in ("launch.lock", "engine.pid", "engine.json", "engine.log"):
        sh("ln", "-s", target, os.path.join(rdir, name), user=MALLORY, check=True)
    try:
        ensure_engine(cfg, start_timeout_s=20)
        error = None
    except RuntimeDirError as e:
        error = str(e)
    with open(target) as f:
        content = f.read()
    return {"error": error, "decoy": content, "decoy_mode": mode_of(target), "rdir": rdir}


def case_store_of_other(uids: dict[str, int]) -> dict[str, Any]:
    """A store directory Mallory made (writable by all, or hers) with links into /etc: a root engine refuses it."""
    os.makedirs("/etc/ucm-decoy-dir")
    decoy("/etc/ucm-decoy-dir/keep")
    out: dict[str, Any] = {}
    for name, owner, mode in (("open", 0, 0o777), ("open-hers", uids[MALLORY], 0o777), ("hers", uids[MALLORY], 0o755)):
        store = user_dir(f"/tmp/store-{name}", owner, mode)
        sh("ln", "-s", "/etc/ucm-decoy-dir", f"{store}/.ucm", user=MALLORY, check=True)
        e = Engine({"storage_backends": store, "endpoint": f"ipc:///tmp/{name}.sock"}, "/tmp")
        e.stop()
        out[name] = {"started": bool(e.endpoint), "output": e.output}
    out["decoy_dir"] = sorted(os.listdir("/etc/ucm-decoy-dir"))
    return out


def stop_started_engine(storage: str) -> None:
    """Stops the engine the shim started for `storage` (it outlives its starter, and this world ends with the case)."""
    from ucm.config import runtime_dir

    try:
        with open(os.path.join(runtime_dir(storage), "engine.json")) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        return
    os.kill(pid, 15)
    if not wait_gone(pid, 5.0):
        os.kill(pid, 9)


def case_private_files(uids: dict[str, int]) -> dict[str, Any]:
    """Blocks a root engine stores cannot be read, or even listed, by another user."""
    import torch

    from ucm.store import NfsStore

    os.umask(0o022)
    user_dir("/tmp/rootstore", 0, 0o755)
    store = NfsStore({"storage_backends": "/tmp/rootstore"})
    try:
        t = [torch.arange(4096, dtype=torch.float32).reshape(4, 1024) for _ in range(2)]
        keys = [b"mu-block-0", b"mu-block-1"]
        task = store.dump(keys, [0, 0], [t[0][0], t[1][0]])
        status = store.wait(task)
        committed = store.commit(keys)
    finally:
        store.close()
        stop_started_engine("/tmp/rootstore")
    files = []
    for d, _, names in os.walk("/tmp/rootstore"):
        files += [os.path.join(d, n) for n in names if not n.startswith(".")]
    return {
        "wait": status,
        "committed": committed,
        "files": len(files),
        "modes": sorted({mode_of(f) for f in files}),
        "mallory_reads": [sh("cat", f, user=MALLORY).returncode for f in files],
        "mallory_lists": sh("ls", "-R", "/tmp/rootstore", user=MALLORY).returncode,
        "alice_reads": [sh("cat", f, user=ALICE).returncode for f in files],
    }


if __name__ == "__main__":
    import multiuser_trust

    name = f"case_{sys.argv[1]}"
    case = getattr(multiuser_trust, name, None) or globals()[name]
    result = case(add_users())
    print(json.dumps(result))
