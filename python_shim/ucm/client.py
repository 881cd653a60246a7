"""ZeroMQ client of the engine (docs/PROTOCOL.md, version 1).

Every request has a deadline. When the engine does not answer in time, or a
restarted engine no longer knows this client, the socket is replaced and the
client says hello again; `epoch` counts those sessions so that callers know
their registered regions must be registered again.
"""
from __future__ import annotations

import itertools
import os
import re
import tempfile
import threading
import time
from typing import Any

import msgpack
import zmq

PROTOCOL_VERSION = 1


class EngineError(RuntimeError):
    """The engine refused a request; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class EngineUnavailable(EngineError):
    """No answer within the deadline (engine down, busy or unreachable)."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


def curve_key_file(endpoint: str) -> str:
    """Mirror of core/curve.ts curveKeyFile: where the engine serving a tcp://
    endpoint publishes its CURVE public key for its own user."""
    host_port = re.sub(r"[^A-Za-z0-9.-]", "-", endpoint[len("tcp://"):])
    return os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}", f"tcp-{host_port}.curve")


class EngineClient:
    def __init__(self, endpoint: str, timeout_ms: int = 5000, name: str = "ucm"):
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.name = name
        self.epoch = 0  # increases with every new session (hello)
        self.engine_info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._session = False

    # ---- transport ---------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10000)
            s.setsockopt(zmq.RCVHWM, 10000)
            if self.endpoint.startswith("tcp://"):
                # Every local user can reach a tcp port: the engine there serves
                # only clients that present its public key, which only its own
                # user can read (core/curve.ts).
                try:
                    with open(curve_key_file(self.endpoint), "rb") as f:
                        server_key = f.read().strip()
                except OSError as e:
                    s.close(linger=0)
                    raise EngineUnavailable(f"no CURVE key for {self.endpoint} ({e}): the engine there is not running, "
                                            "or belongs to another user") from None
                public, secret = zmq.curve_keypair()
                s.curve_serverkey = server_key
                s.curve_publickey = public
                s.curve_secretkey = secret
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None
        self._session = False

    def _roundtrip(self, req: dict[str, Any], timeout_ms: int) -> dict[str, Any]:
        sock = self._socket()
        rid = next(self._ids)
        req["id"] = rid
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            sock.send(msgpack.packb(req, use_bin_type=True), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._reset()
            raise EngineUnavailable(f"cannot send {req.get('op')} to {self.endpoint}: queue full")
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self._reset()  # a late reply must never be taken for a later request's
                raise EngineUnavailable(f"no reply to {req.get('op')} from {self.endpoint} within {timeout_ms} ms")
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if isinstance(reply, dict) and reply.get("id") == rid:
                return reply

    # ---- requests ----------------------------------------------------------

    def raw(self, op: str, deadline_ms: int | None = None, **args: Any) -> dict[str, Any]:
        """One request without a session (health, stats)."""
        with self._lock:
            return self._roundtrip({"op": op, **args}, deadline_ms or self.timeout_ms)

    def hello(self) -> None:
        with self._lock:
            r = self._roundtrip({"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid(), "name": self.name}, self.timeout_ms)
            if not r.get("ok"):
                err = r.get("error") or {}
                raise EngineError(err.get("code", "unknown"), err.get("message", str(r)))
            self.engine_info = r.get("engine") or {}
            self._session = True
            self.epoch += 1

    def ensure_session(self) -> int:
        """Says hello if this client has no session; returns the session epoch."""
        with self._lock:
            if not self._session:
                self.hello()
            return self.epoch

    def call(self, op: str, deadline_ms: int | None = None, **args: Any) -> dict[str, Any]:
        """A session request; says hello first when needed. Errors raise EngineError.
        `deadline_ms` bounds the round trip (default: the client's timeout)."""
        with self._lock:
            for attempt in (0, 1):
                if not self._session:
                    self.hello()
                r = self._roundtrip({"op": op, **args}, deadline_ms or self.timeout_ms)
                if r.get("ok"):
                    return r
                err = r.get("error") or {}
                if err.get("code") == "no_session" and attempt == 0:
                    self._session = False  # the engine restarted: new session
                    continue
                raise EngineError(err.get("code", "unknown"), err.get("message", str(r)))
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._session:
                try:
                    self._roundtrip({"op": "goodbye"}, 500)
                except EngineError:
                    pass
            self._reset()
