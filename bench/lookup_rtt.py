"""Lookup round trip as the vLLM scheduler sees it: a Python (pyzmq + msgpack)
client asking a running engine about 256 committed keys, warm metadata.

    python bench/lookup_rtt.py --endpoint ipc:///path/engine.sock [--n 5000]

Needs pyzmq and msgpack (the shim's own dependencies). Registers a small
shared-memory region, dumps and commits 256 blocks, then times `health` (the
transport floor) and `lookup` of all 256 keys.
"""
import argparse
import hashlib
import os
import time

import msgpack
import zmq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--keys", type=int, default=256)
    a = ap.parse_args()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(a.endpoint)
    ids = iter(range(1, 1 << 62))

    def call(op, **kw):
        kw.update(op=op, id=next(ids))
        sock.send(msgpack.packb(kw, use_bin_type=True))
        r = msgpack.unpackb(sock.recv(), raw=False)
        if not r.get("ok"):
            raise RuntimeError(r)
        return r

    call("hello", version=1, pid=os.getpid(), name="lookup_rtt")
    keys = [hashlib.sha256(b"rtt%d" % i).digest() for i in range(a.keys)]
    shm = f"/ucm-rtt-{os.getpid()}"
    with open("/dev/shm" + shm, "wb") as f:
        f.truncate(4096 * a.keys)
    try:
        reg = call("register", regions=[dict(medium="host", source=shm, size=4096 * a.keys)])["regions"][0]
        shards = dict(count=1, region=[reg] * a.keys, offset=[i * 4096 for i in range(a.keys)], length=[4096] * a.keys)
        task = call("dump", ns="lookup-rtt", keys=keys, shards=shards)["task"]
        call("wait", task=task, timeout_ms=30000)
        call("commit", ns="lookup-rtt", keys=keys)
        print(f"| request | p50 us | p99 us | n |\n| --- | ---: | ---: | ---: |")
        for name, fn in (("health (transport floor)", lambda: call("health")),
                         (f"lookup {a.keys} keys", lambda: call("lookup", ns="lookup-rtt", keys=keys))):
            for _ in range(500):
                fn()
            lat = []
            for _ in range(a.n):
                t0 = time.perf_counter_ns()
                fn()
                lat.append((time.perf_counter_ns() - t0) / 1000)
            lat.sort()
            print(f"| {name} | {lat[len(lat) // 2]:.0f} | {lat[int(len(lat) * 0.99)]:.0f} | {a.n} |")
        call("goodbye")
    finally:
        os.unlink("/dev/shm" + shm)


if __name__ == "__main__":
    main()
