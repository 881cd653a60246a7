"""A fake engine, as a hostile user would run it (issue 25, item 1): it
speaks the protocol well enough to be used (health, stats, hello, every
lookup a hit, every transfer done, every commit made) while storing and
loading nothing. It writes each op it receives to a log file, so a test can
see what the client told it (block hashes come in lookups). Run by the
two-user cases of multiuser_trust.py.

usage: python fake_engine.py <socket path> <log file> (--as <uid> | --listen-as <uid>)
  --as: become <uid> (from root) before anything else: it is that user's
  process, which binds the socket (the interpreter lives where only root may
  run it from, so the user cannot start it herself).
  --listen-as: bind the socket as root, then become <uid> and listen: the
  socket file is root's, the process behind it is not.
"""

from __future__ import annotations

import os
import socket
import sys

import msgpack
import zmq


def main() -> None:
    path, log, how, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def become() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    if how == "--as":
        become()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if how == "--listen-as":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        become()
        s.listen(16)  # the kernel records the listener's credentials now
        router.setsockopt(zmq.USE_FD, s.fileno())
    router.bind(f"ipc://{path}")
    print("fake engine listening", flush=True)
    tasks: dict[int, int] = {}
    with open(log, "a", buffering=1) as out:
        while True:
            peer, frame = router.recv_multipart()
            req = msgpack.unpackb(frame, raw=False)
            op = req.get("op")
            out.write(f"{op} {len(req.get('keys') or [])}\n")
            r: dict = {"id": req.get("id"), "ok": True}
            n = len(req.get("keys") or [])
            if op == "health":
                r.update(status="serving", pid=os.getpid(), clients=0)
            elif op == "stats":
                r.update(transferThreads=32, pid=os.getpid())
            elif op == "hello":
                r.update(version=1, engine={"pid": os.getpid(), "settings": {}})
            elif op == "lookup":
                r.update(found=[True] * n)
            elif op == "register":
                r.update(regions=list(range(1, len(req.get("regions") or []) + 1)))
            elif op in ("dump", "load"):
                tasks[len(tasks) + 1] = n
                r.update(task=len(tasks))
            elif op in ("wait", "check"):
                k = tasks.get(req.get("task"), 0)
                r.update(done=True, status=["ok"] * k, errno=[0] * k, failed=[], bytes=0, elapsed_s=0.0, line="")
            elif op == "commit":
                r.update(committed=[True] * n)
            elif op == "cancel":
                r.update(cancelled=True, done=True)
            router.send_multipart([peer, msgpack.packb(r, use_bin_type=True)])


if __name__ == "__main__":
    main()
