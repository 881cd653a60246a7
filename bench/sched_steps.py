"""Time vLLM's scheduler spends in the connector per step, when a burst of
waiting requests arrives (issue 30).

    .venv/bin/python bench/sched_steps.py [--waiting 1,64,512] [--rounds 30] [--steps 8]
                                          [--keys 256] [--step-ms 20] [--pause-ms 100] [--slow-us 1000]
                                          [--model DIR]

vLLM's real scheduler (test/python/sched_kit.py) with the connector and a
real engine, which the connector starts in a temporary storage directory
(stopped at the end). Prefix caching is off, so every block of a prompt is
the store's to find. Each request has `--keys` blocks of 16 tokens: the
first half shared by all and stored before, the second half its own (a
miss). A round adds `--waiting` requests at once and runs `--steps` steps:
schedule(), a sleep of `--step-ms` for the forward pass, update_from_output
with every planned load reported good and every finished request's blocks
handed back; then the requests left are aborted (untimed). Every call vLLM
makes into the connector is timed; a step's figure is their sum, less the
time the connector, while no request runs (the burst step of a round),
waits for lookup replies (the first new request's, and an empty step's
instead of letting vLLM spin): no request is held back by it, and it is
printed in a column of its own. Printed per waiting count: the
burst step (the first of a round, where vLLM asks the connector about every
waiting request), all steps, and vLLM's own schedule() for scale; then the same with the engine stopped (SIGSTOP) for
`--pause-ms` from just before each burst step. Last, the steps over
`--slow-us`, slowest first, each split by the connector's method (inclusive
of any wait for replies, given apart) and the garbage collections that ran
inside those methods (gc0-gc2 by generation).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))
sys.path.insert(0, os.path.join(ROOT, "test", "python"))

import sched_kit as sk  # noqa: E402
import yaml  # noqa: E402

BLOCK = 16
#: connector methods vLLM's scheduler calls
TIMED = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "request_finished",
    "update_connector_output",
    "get_kv_connector_stats",
)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


class Clock:
    """Sums the time spent in the connector's methods (wrapped on the instance),
    less the time the connector waits for lookup replies while no request
    runs (the pump's await_reply and await_answer, summed apart in
    `idle_ns`): that wait holds nobody back."""

    def __init__(self, conn) -> None:
        self.ns = 0
        self.asks = 0
        self.idle_ns = 0
        self.split: dict[str, int] = {}  # this step's ns by method, and "gc" for collections inside them
        self._gc_t0 = 0
        gc.callbacks.append(self._gc)
        for name in TIMED:
            setattr(conn, name, self._timed(getattr(conn, name), name))
        pump = conn.connector_scheduler._lookups.pump
        pump.await_reply = self._idle(pump.await_reply)
        pump.await_answer = self._idle(pump.await_answer)

    def _idle(self, wait):
        def waited(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return wait(*a, **k)
            finally:
                d = time.perf_counter_ns() - t0
                self.idle_ns += d
                self.ns -= d

        return waited

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter_ns()
        elif self._gc_t0:
            key = f"gc{info.get('generation', '?')}"
            self.split[key] = self.split.get(key, 0) + time.perf_counter_ns() - self._gc_t0
            self._gc_t0 = 0

    def _timed(self, fn, name: str):
        is_ask = name == "get_num_new_matched_tokens"

        def call(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                d = time.perf_counter_ns() - t0
                self.ns += d
                self.asks += is_ask
                self.split[name] = self.split.get(name, 0) + d

        return call

    def take(self) -> tuple[float, int]:
        out = (self.ns / 1000, self.asks)
        self.ns, self.asks = 0, 0
        return out

    def take_idle(self) -> float:
        out, self.idle_ns = self.idle_ns / 1000, 0
        return out

    def take_split(self) -> dict[str, float]:
        out = {k: v / 1000 for k, v in self.split.items()}
        self.split = {}
        return out


def tiny_model(dest: str) -> str:
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "make_tiny_model.py"), dest, "--layers", "2", "--hidden", "128"]
        + ["--heads", "4", "--kv-heads", "2", "--intermediate", "256"],
        check=True,
        capture_output=True,
    )
    return dest


def engine_pid(conn) -> int:
    from ucm.client import EngineClient

    c = EngineClient(conn.config.endpoint, 2000)
    try:
        return int(c.raw("health")["pid"])
    finally:
        c.close()


def run(model: str, cfg: str, waiting: int, a: argparse.Namespace, pause_ms: int) -> dict:
    from ucm.integration.vllm.common import UCMWorkerMetadata
    from vllm.utils.gc_utils import freeze_gc_heap
    from vllm.v1.request import RequestStatus

    prompt_len = a.keys * BLOCK + 1
    vc = sk.vllm_config(
        model,
        cfg,
        BLOCK,
        prefix_caching=False,
        max_model_len=prompt_len + 64,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
    )
    sched = sk.scheduler(vc, num_blocks=64 * (a.keys + 4))
    conn = sched.connector
    shared = sk.prompt(a.keys // 2 * BLOCK, seed=0)
    probe = sk.request(shared + [1] * (prompt_len - len(shared)), BLOCK)
    sk.store_blocks(cfg, conn.connector_scheduler.namespaces, [bytes(h) for h in probe.block_hashes[: a.keys // 2]])
    pid = engine_pid(conn)
    clock = Clock(conn)
    freeze_gc_heap()  # as vLLM's engine core does once it is set up: collections then skip what was there
    burst, steps, own, idle, slow = [], [], [], [], []
    burst_asks = 0
    for rnd in range(a.rounds):
        reqs = [
            sk.request(shared + sk.prompt(prompt_len - len(shared), seed=1000 * rnd + i + 1), BLOCK, max_tokens=2)
            for i in range(waiting)
        ]
        for r in reqs:
            sched.add_request(r)
        cont = None
        if pause_ms:
            os.kill(pid, signal.SIGSTOP)
            cont = threading.Timer(pause_ms / 1000, os.kill, (pid, signal.SIGCONT))
            cont.start()
        clock.take()
        for i in range(a.steps):
            s0 = time.perf_counter_ns()
            out = sched.schedule()
            own_us = (time.perf_counter_ns() - s0) / 1000
            in_schedule, asks = clock.take()
            waited = clock.take_idle()
            time.sleep(a.step_ms / 1000)  # the forward pass: the GIL is free, as while vLLM waits for its workers
            plan = sk.planned(out)
            meta = UCMWorkerMetadata({t.load_id: (1, len(t.keys)) for t in plan["loads"]}) if plan["loads"] else None
            sched.update_from_output(
                out, sk.output(out, worker_meta=meta, finished_sending=set(plan["finished"]) or None)
            )
            us = in_schedule + clock.take()[0]
            split = clock.take_split()
            if us > a.slow_us:
                slow.append((us, rnd, i, asks, waited, split))
            steps.append(us)
            own.append(own_us - in_schedule - waited)
            if i == 0:
                burst.append(us)
                idle.append(waited)
                burst_asks = max(burst_asks, asks)
        if cont is not None:
            cont.join()
        sched.finish_requests(None, RequestStatus.FINISHED_ABORTED)
        for _ in range(3):  # hand back what the aborted requests held
            out = sched.schedule()
            plan = sk.planned(out)
            sched.update_from_output(out, sk.output(out, finished_sending=set(plan["finished"]) or None))
        clock.take()
        clock.take_idle()
        clock.take_split()
    conn.shutdown()
    gc.callbacks.remove(clock._gc)
    return dict(burst=burst, steps=steps, own=own, asks=burst_asks, idle=idle, slow=slow)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waiting", default="1,64,512")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keys", type=int, default=256, help="blocks per request (half of them stored)")
    ap.add_argument("--step-ms", type=float, default=20.0, help="the forward pass between two schedule() calls")
    ap.add_argument("--pause-ms", type=int, default=100, help="engine stopped this long from each burst (0: skip)")
    ap.add_argument(
        "--slow-us",
        type=float,
        default=1000.0,
        help="steps over this many us are listed after the table, split by method",
    )
    ap.add_argument("--model", help="a model directory (default: the tiny local one, built in a temporary folder)")
    a = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    tmp = tempfile.mkdtemp(prefix="ucm-sched-")
    os.chmod(tmp, 0o700)
    endpoint = f"ipc://{tmp}/e.sock"
    cfg = os.path.join(tmp, "ucm.yaml")
    os.mkdir(os.path.join(tmp, "store"))
    with open(cfg, "w") as f:
        yaml.safe_dump(
            {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_connector_config": {"storage_backends": os.path.join(tmp, "store"), "endpoint": endpoint},
            },
            f,
        )
    model = a.model or tiny_model(os.path.join(tmp, "model"))
    pid = None
    try:
        print(
            "| engine | waiting | asks in the burst step | burst step p50 / p99 / max us | every step p50 / p99 / max us "
            "| steps | vLLM's own schedule() p50 us | burst step's wait for replies (runs nothing) p50 / max us |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        slow = []
        for pause in [0, a.pause_ms] if a.pause_ms else [0]:
            for w in [int(x) for x in a.waiting.split(",")]:
                r = run(model, cfg, w, a, pause)
                b, s = r["burst"], r["steps"]
                what = f"stopped {pause} ms at each burst" if pause else "answering"
                print(
                    f"| {what} | {w} | {r['asks']} | {pct(b, 0.5):.0f} / {pct(b, 0.99):.0f} / {max(b):.0f} "
                    f"| {pct(s, 0.5):.0f} / {pct(s, 0.99):.0f} / {max(s):.0f} | {len(s)} | {pct(r['own'], 0.5):.0f} "
                    f"| {pct(r['idle'], 0.5):.0f} / {max(r['idle']):.0f} |",
                    flush=True,
                )
                slow += [(what, w) + s for s in r["slow"]]
        print(f"\nSteps over {a.slow_us:.0f} us: {len(slow)}")
        for what, w, us, rnd, i, asks, waited, split in sorted(slow, key=lambda s: -s[2])[:40]:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
            print(
                f"- {what}, {w} waiting, round {rnd} step {i}: {us:.0f} us, {asks} asks, waited {waited:.0f} us; {parts}"
            )
    finally:
        from ucm.client import EngineClient, EngineError

        try:
            c = EngineClient(endpoint, 2000)
            pid = c.raw("health")["pid"]
            c.close()
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
        except (EngineError, OSError):
            pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
