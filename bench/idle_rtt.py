"""What one round trip to the engine costs when it comes after a pause, as a
new request's lookup on an idle vLLM server does (issue 26 item 1).

    .venv/bin/python bench/idle_rtt.py [--n 200] [--gaps-ms 0,2,20]

Starts an engine through `ucm.store.NfsStore` (a temporary directory),
stores 128 blocks, then times, for each pause between two calls: the
connector's client asking `health` (no work in the engine), a `lookup` of
the 128 stored keys (answered from the engine's cache), and of the same
keys plus one never stored (one `stat` on the engine's lookup thread). In
the same run, for scale, the transports alone with the same pauses: a
pyzmq DEALER to a zeromq.js ROUTER that echoes (the engine's transport
without the engine), pyzmq to pyzmq, and a pipe between two processes.
Prints p50/p90 in microseconds per case and pause.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))

import torch  # noqa: E402
import yaml  # noqa: E402
import zmq  # noqa: E402

from ucm.client import EngineClient  # noqa: E402
from ucm.store import NfsStore  # noqa: E402

#: a zeromq.js ROUTER that sends every message back (the engine's transport, nothing else)
ECHO_JS = """
const zmq = require(process.argv[1]);
(async () => {
  const s = new zmq.Router();
  await s.bind(process.argv[2]);
  process.stdout.write("ready\\n");
  for await (const [peer, m] of s) await s.send([peer, m]);
})();
"""


def timed(call, n: int, gap_s: float) -> tuple[float, float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        ts.append((time.perf_counter_ns() - t0) / 1000)
        if gap_s:
            time.sleep(gap_s)
    ts.sort()
    return ts[len(ts) // 2], ts[int(len(ts) * 0.9)]


def zmq_echo_py(ep: str) -> int:
    pid = os.fork()
    if pid == 0:
        s = zmq.Context().socket(zmq.ROUTER)
        s.bind(ep)
        while True:
            s.send_multipart(s.recv_multipart())
    return pid


def pipe_pair() -> tuple[int, Callable[[], None]]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        while True:
            b = os.read(r1, 1)
            if not b:
                os._exit(0)
            os.write(w2, b)

    def ping() -> None:
        os.write(w1, b"x")
        os.read(r2, 1)

    return pid, ping


def dealer(ep: str):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(ep)

    def ping() -> None:
        s.send(b"x")
        s.recv()

    return ping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="timed calls per case and pause")
    ap.add_argument("--gaps-ms", default="0,2,20", help="pauses between two calls")
    a = ap.parse_args()
    gaps = [float(g) / 1000 for g in a.gaps_ms.split(",")]
    tmp = tempfile.mkdtemp(prefix="ucm-idle-")
    os.chmod(tmp, 0o700)
    os.mkdir(os.path.join(tmp, "store"))
    endpoint = f"ipc://{tmp}/e.sock"
    cfg = os.path.join(tmp, "ucm.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(
            {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_connector_config": {"storage_backends": os.path.join(tmp, "store"), "endpoint": endpoint},
            },
            f,
        )
    children: list[int] = []
    echo = None
    try:
        keys = [os.urandom(16) for _ in range(128)]
        with NfsStore(cfg, namespace="idle") as store:
            src = [torch.full((64,), i, dtype=torch.uint8) for i in range(len(keys))]
            assert store.wait(store.dump(keys, [0] * len(keys), src)) == 0
            assert all(store.commit(keys))
            c = EngineClient(endpoint, 3000, name="idle_rtt")
            c.ensure_session()
            echo = subprocess.Popen(
                ["node", "-e", ECHO_JS, os.path.join(ROOT, "node_modules", "zeromq"), f"ipc://{tmp}/js.sock"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert echo.stdout.readline().strip() == "ready"
            children.append(zmq_echo_py(f"ipc://{tmp}/py.sock"))
            pid, pipe_ping = pipe_pair()
            children.append(pid)
            time.sleep(0.3)
            cases = [
                ("engine: health", lambda: c.raw("health")),
                (
                    "engine: lookup, 128 keys it knows stored",
                    lambda: c.raw("lookup", ns=["idle"], keys=keys, bits=True),
                ),
                (
                    "engine: lookup, the same + 1 never stored",
                    lambda: c.raw("lookup", ns=["idle"], keys=keys + [os.urandom(16)], runs=[129], bits=True),
                ),
                ("transport: pyzmq to a zeromq.js echo", dealer(f"ipc://{tmp}/js.sock")),
                ("transport: pyzmq to a pyzmq echo", dealer(f"ipc://{tmp}/py.sock")),
                ("a pipe to another process and back", pipe_ping),
            ]
            print("| round trip | " + " | ".join(f"pause {g * 1000:g} ms: p50 / p90 us" for g in gaps) + " |")
            print("| --- |" + " ---: |" * len(gaps))
            for name, call in cases:
                cells = []
                for g in gaps:
                    p50, p90 = timed(call, a.n, g)
                    cells.append(f"{p50:.0f} / {p90:.0f}")
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
            c.close()
    finally:
        for pid in children:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except OSError:
                pass
        if echo is not None:
            echo.kill()
        try:
            c2 = EngineClient(endpoint, 2000)
            os.kill(int(c2.raw("health")["pid"]), 15)
        except Exception:  # noqa: BLE001 - gone already
            pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
