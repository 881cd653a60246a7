"""Lookup latency as vLLM's scheduler sees it: the connector's own client
(`ucm.client.EngineClient`, pyzmq + msgpack) asking a running engine, one
lookup of `--keys` keys per waiting request, as `get_num_new_matched_tokens`
does.

    python bench/lookup_rtt.py --endpoint ipc:///path/engine.sock [--n 5000] [--keys 256]
                               [--waiting 1,64,512] [--steps 20]

Registers a small shared-memory region, dumps and commits the first half of
the keys (a shared prefix every request finds), then times `health` (the
transport floor), `lookup` on its own, and scheduler steps with 1, 64 and
512 waiting requests: each step asks once for every waiting request (its
own keys: the shared half, then half it alone has, which misses), one
after the other as the scheduler does. Prints p50/p99 per lookup and per
step.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python_shim"))

from ucm.client import EngineClient  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--n", type=int, default=5000, help="timed calls of health and of a single lookup")
    ap.add_argument("--keys", type=int, default=256)
    ap.add_argument("--waiting", default="1,64,512", help="waiting requests per scheduler step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per waiting count")
    a = ap.parse_args()
    c = EngineClient(a.endpoint, 10000, name="lookup_rtt")
    ns = f"lookup-rtt-{os.getpid()}"
    shared = [hashlib.sha256(b"shared%d" % i).digest() for i in range(a.keys // 2)]
    shm = f"/ucm-rtt-{os.getpid()}"
    with open("/dev/shm" + shm, "wb") as f:
        f.truncate(4096 * len(shared))
    try:
        reg = c.call("register", regions=[dict(medium="host", source=shm, size=4096 * len(shared))])["regions"][0]
        n = len(shared)
        shards = dict(count=1, region=[reg] * n, offset=[i * 4096 for i in range(n)], length=[4096] * n)
        task = c.call("dump", ns=ns, keys=shared, shards=shards)["task"]
        c.call("wait", task=task, timeout_ms=30000)
        c.call("commit", ns=ns, keys=shared)

        def keys_of(req: int) -> list[bytes]:
            return shared + [hashlib.sha256(b"own%d-%d" % (req, i)).digest() for i in range(a.keys - len(shared))]

        print("| what | p50 us | p99 us | samples |\n| --- | ---: | ---: | ---: |")
        one = keys_of(0)
        for name, fn in (
            ("health (transport floor)", lambda: c.call("health")),
            (f"lookup of {a.keys} keys ({len(shared)} found)", lambda: c.call("lookup", ns=[ns], keys=one)),
        ):
            for _ in range(300):
                fn()
            lat = []
            for _ in range(a.n):
                t0 = time.perf_counter_ns()
                fn()
                lat.append((time.perf_counter_ns() - t0) / 1000)
            print(f"| {name} | {pct(lat, 0.5):.0f} | {pct(lat, 0.99):.0f} | {a.n} |", flush=True)
        for w in [int(x) for x in a.waiting.split(",")]:
            reqs = [keys_of(r) for r in range(w)]
            for k in reqs[: min(w, 50)]:  # warm
                c.call("lookup", ns=[ns], keys=k)
            per, steps = [], []
            for _ in range(a.steps):
                s0 = time.perf_counter_ns()
                for k in reqs:
                    t0 = time.perf_counter_ns()
                    r = c.call("lookup", ns=[ns], keys=k)
                    per.append((time.perf_counter_ns() - t0) / 1000)
                    assert sum(r["found"]) == len(shared), r["found"]
                steps.append((time.perf_counter_ns() - s0) / 1000)
            print(f"| {w} waiting: one lookup | {pct(per, 0.5):.0f} | {pct(per, 0.99):.0f} | {len(per)} |")
            print(
                f"| {w} waiting: the whole step | {pct(steps, 0.5):.0f} | {pct(steps, 0.99):.0f} | {len(steps)} |",
                flush=True,
            )
        c.call("release", regions=[reg])
    finally:
        os.unlink("/dev/shm" + shm)
        c.close()


if __name__ == "__main__":
    main()
