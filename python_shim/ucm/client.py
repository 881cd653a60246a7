"""ZeroMQ client of the engine (docs/PROTOCOL.md, version 1).

Every request has a deadline. When the engine does not answer in time, or a
restarted engine no longer knows this client, the socket is replaced and the
client says hello again; `epoch` counts those sessions so that callers know
their registered regions must be registered again. Before a socket connects,
and after its first reply, ucm.engine_trust checks that the engine is this
user's (a fake one must never be believed); a hello carries a token from the
engine's credential socket, by which the engine knows this process's pid.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import threading
import time
from typing import Any, Callable

import msgpack
import zmq

from . import engine_trust
from .engine_errors import EngineError, EngineUnavailable, UntrustedEngine

__all__ = ["EngineClient", "EngineError", "EngineUnavailable", "UntrustedEngine", "process_gone", "process_identity"]

PROTOCOL_VERSION = 1

#: while a session request waits for its reply, how often the engine's
#: process is looked at (/proc): a reply that can no longer come (the engine
#: died) ends the wait within this, not at the request's deadline
WATCH_MS = 100
#: how long a verdict "the engine still runs" (EngineClient.gone) is taken
#: as it is before /proc is read again; "gone" is final
GONE_CHECK_S = 0.05
#: replies of requests sent without waiting (`send`) that may wait to be taken
MAX_DEFERRED = 4096


def process_identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks since boot) of a live process of this
    pid namespace, or None when there is none. The start time tells a process
    from a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    return (pid, int(fields[19]))


def process_gone(identity: tuple[int, int] | None) -> bool:
    """True only when the process is known to have ended (exited, a zombie,
    or its pid now belongs to another process). A process that cannot be
    identified is never called gone."""
    if identity is None:
        return False
    return process_identity(identity[0]) != tuple(identity)


def say_task_line(reply: dict[str, Any] | None) -> None:
    """Prints the seed's `[UCMNFSSTORE] [I] Task(...) finished, elapsed ...s`
    line of a finished task (the engine puts it in the result) on this
    process's stderr, where UCM's in-process store printed it: the engine
    itself logs to a file and never to a client's terminal or pipes.
    UCM_TASK_LINES=0 turns it off. Never raises."""
    line = reply.get("line") if isinstance(reply, dict) else None
    if not isinstance(line, str) or not line or os.environ.get("UCM_TASK_LINES", "1") == "0":
        return
    line = "".join(c if c.isprintable() else "?" for c in line[:512])
    try:
        os.write(2, f"[UCMNFSSTORE] [I] {line}\n".encode())
    except OSError:
        pass


def curve_key_file(endpoint: str) -> str:
    """Mirror of core/curve.ts curveKeyFile: where the engine serving a tcp://
    endpoint publishes its CURVE public key for its own user."""
    host_port = re.sub(r"[^A-Za-z0-9.-]", "-", endpoint[len("tcp://") :])
    return os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}", f"tcp-{host_port}.curve")


class EngineClient:
    def __init__(
        self,
        endpoint: str,
        timeout_ms: int = 5000,
        name: str = "ucm",
        on_hello: Callable[[EngineClient, dict[str, Any]], None] | None = None,
        engine_uid: int | None = None,
    ):
        self.endpoint = endpoint
        #: whose engine this client may talk to: its own user, root and the configured engineUid
        self.trusted = engine_trust.trusted_uids(engine_uid)
        self.timeout_ms = timeout_ms
        self.name = name
        #: called with this client and the engine's description (pid, settings, ...) after each hello
        self.on_hello = on_hello
        self.epoch = 0  # increases with every new session (hello)
        self.engine_info: dict[str, Any] = {}
        #: (pid, start time) of the engine of the current session, when it runs
        #: in this pid namespace (as it must: it watches our pid too)
        self.engine_identity: tuple[int, int] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._session = False
        self._peer_checked = False  # the current socket's peer passed engine_trust.check_connected
        self._gone: dict[tuple[int, int], tuple[float, bool]] = {}  # engine -> (when looked at, gone)
        #: requests sent by `send` whose reply nobody has taken yet: id -> (when
        #: it is due, the reply once read off the socket, else None)
        self._deferred: dict[int, tuple[float, dict[str, Any] | None]] = {}

    # ---- transport ---------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            if self.endpoint.startswith("ipc://"):
                engine_trust.check_ipc_endpoint(self.endpoint, self.trusted)
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10000)
            s.setsockopt(zmq.RCVHWM, 10000)
            if self.endpoint.startswith("tcp://"):
                # Every local user can reach a tcp port: the engine there serves
                # only clients that present its public key, which only its own
                # user can read (core/curve.ts).
                try:
                    key_file = curve_key_file(self.endpoint)
                    engine_trust.check_key_file(key_file, self.trusted)
                    with open(key_file, "rb") as f:
                        server_key = f.read().strip()
                except UntrustedEngine:
                    s.close(linger=0)
                    raise
                except OSError as e:
                    s.close(linger=0)
                    raise EngineUnavailable(
                        f"no CURVE key for {self.endpoint} ({e}): the engine there is not running, "
                        "or belongs to another user"
                    ) from None
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
        self._deferred.clear()  # their replies can no longer come: `take` says so
        self._session = False
        self._peer_checked = False

    def _check_peer(self) -> None:
        """After a socket's first reply: the process that answered is a trusted
        user's (SO_PEERCRED of our connections to the socket). Before that,
        nothing it said is used."""
        path = engine_trust.ipc_path(self.endpoint)
        if path is None or self._peer_checked:
            return
        try:
            checked = engine_trust.check_connected(path, self.trusted)
        except UntrustedEngine:
            self._reset()
            raise
        if checked == 0:
            # Closed right after answering: whoever it was cannot be told, so the answer is not used.
            self._reset()
            raise EngineUnavailable(f"the connection to {path} closed before the engine's identity could be checked")
        self._peer_checked = True

    def _roundtrip(self, req: dict[str, Any], timeout_ms: int, engine: tuple[int, int] | None = None) -> dict[str, Any]:
        """Sends `req` and returns its reply. `engine`: the (pid, start time)
        of the process that must answer; once it is gone the wait ends (no
        reply can come), with an error that says so and, unlike a timeout,
        does not say the request may still be acted on."""
        sock = self._socket()
        rid = next(self._ids)
        req["id"] = rid
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            sock.send(msgpack.packb(req, use_bin_type=True), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._reset()
            raise EngineUnavailable(f"cannot send {req.get('op')} to {self.endpoint}: queue full") from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset()  # a late reply must never be taken for a later request's
                raise EngineUnavailable(
                    f"no reply to {req.get('op')} from {self.endpoint} within {timeout_ms} ms", sent=req.get("op")
                )
            left_ms = max(1, int(left * 1000))
            if not sock.poll(left_ms if engine is None else min(left_ms, WATCH_MS), zmq.POLLIN):
                if engine is not None and process_gone(engine):
                    self._reset()
                    raise EngineUnavailable(
                        f"the engine (pid {engine[0]}) on {self.endpoint} exited before it answered {req.get('op')}"
                    )
                continue
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if isinstance(reply, dict) and reply.get("id") == rid:
                self._check_peer()
                return reply
            self._keep(reply)

    def _keep(self, reply: Any) -> None:
        """A reply read while waiting for another: kept when it answers a
        request sent by `send` (anything else is a late reply nobody waits for)."""
        rid = reply.get("id") if isinstance(reply, dict) else None
        if isinstance(rid, int):
            due = self._deferred.get(rid)
            if due is not None and due[1] is None:
                self._deferred[rid] = (due[0], reply)

    # ---- requests ----------------------------------------------------------

    def raw(self, op: str, deadline_ms: int | None = None, **args: Any) -> dict[str, Any]:
        """One request without a session (health, stats)."""
        with self._lock:
            return self._roundtrip({"op": op, **args}, deadline_ms or self.timeout_ms)

    def hello(self) -> None:
        with self._lock:
            req: dict[str, Any] = {"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid(), "name": self.name}
            timeout_ms = self.timeout_ms
            path = engine_trust.ipc_path(self.endpoint)
            if path is not None:
                # The socket is checked before the token is asked for: a token is only worth something to our engine.
                self._socket()
                t0 = time.monotonic()
                try:
                    token = engine_trust.fetch_token(path, self.trusted, timeout_ms / 1000)
                except UntrustedEngine:
                    self._reset()
                    raise
                if token is not None:
                    req["cred"] = token
                timeout_ms = max(1, timeout_ms - int((time.monotonic() - t0) * 1000))
            r = self._roundtrip(req, timeout_ms)
            if not r.get("ok"):
                err = r.get("error") or {}
                raise EngineError(err.get("code", "unknown"), err.get("message", str(r)))
            self.engine_info = r.get("engine") or {}
            pid = self.engine_info.get("pid")
            self.engine_identity = process_identity(pid) if isinstance(pid, int) and pid > 0 else None
            self._session = True
            self.epoch += 1
            if self.on_hello is not None:
                self.on_hello(self, self.engine_info)

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
            if self._session and self.gone(self.engine_identity):
                # The session's engine died since (another may serve the
                # endpoint now): a new session, on a new connection.
                self._reset()
            for attempt in (0, 1):
                if not self._session:
                    self.hello()
                # Asked of this session's engine: its death ends the wait at once.
                r = self._roundtrip({"op": op, **args}, deadline_ms or self.timeout_ms, self.engine_identity)
                if r.get("ok"):
                    return r
                err = r.get("error") or {}
                if err.get("code") == "no_session" and attempt == 0:
                    self._session = False  # the engine restarted: new session
                    continue
                raise EngineError(err.get("code", "unknown"), err.get("message", str(r)))
            raise AssertionError("unreachable")

    def send(self, op: str, **args: Any) -> int:
        """A session request sent without waiting for its reply (a dump in the
        middle of vLLM's step): returns its id, whose reply `take` gives.
        The reply is due within the client's timeout, like a `call`'s; it is
        read off the socket by whatever request waits next, or by `take`.
        Raises EngineUnavailable when it cannot be sent, EngineError
        ("busy") while MAX_DEFERRED replies wait to be taken."""
        with self._lock:
            if self._session and self.gone(self.engine_identity):
                self._reset()
            if not self._session:
                self.hello()
            if len(self._deferred) >= MAX_DEFERRED:
                # Not the engine's fault (nobody asked about that many tasks): this request is refused, the engine kept.
                raise EngineError("busy", f"{MAX_DEFERRED} replies of {self.endpoint} not taken yet: {op} not sent")
            sock = self._socket()
            rid = next(self._ids)
            try:
                sock.send(msgpack.packb({"op": op, **args, "id": rid}, use_bin_type=True), flags=zmq.NOBLOCK)
            except zmq.Again:
                self._reset()
                raise EngineUnavailable(f"cannot send {op} to {self.endpoint}: queue full") from None
            self._deferred[rid] = (time.monotonic() + self.timeout_ms / 1000, None)
            return rid

    def take(self, rid: int, op: str = "request") -> dict[str, Any]:
        """The reply to request `rid` (sent by `send`), waited for until it is
        due. Raises EngineUnavailable with `sent` set when it did not come in
        time or can no longer come (the engine died, or the socket was replaced
        since: the engine may still act on the request), EngineError when the
        engine refused it."""
        with self._lock:
            if rid not in self._deferred:
                raise EngineUnavailable(
                    f"the reply to {op} from {self.endpoint} was lost (a new connection since)", sent=op
                )
            due, reply = self._deferred[rid]
            engine = self.engine_identity
            if reply is None and self._sock is not None:
                # Whatever the engine answered meanwhile is read first: an
                # answer that came in time but was never read (nothing asked
                # the engine since) is not late, however long ago it came.
                while reply is None and self._sock.poll(0, zmq.POLLIN):
                    self._keep(msgpack.unpackb(self._sock.recv(), raw=False))
                    reply = self._deferred[rid][1]
            while reply is None:
                left = due - time.monotonic()
                if left <= 0:
                    self._reset()  # as a `call` that timed out: a hung engine gets a new connection
                    raise EngineUnavailable(f"no reply to {op} from {self.endpoint} in time", sent=op)
                sock = self._socket()
                if not sock.poll(min(max(1, int(left * 1000)), WATCH_MS), zmq.POLLIN):
                    if engine is not None and process_gone(engine):
                        self._reset()
                        raise EngineUnavailable(f"the engine (pid {engine[0]}) exited before it answered {op}", sent=op)
                    continue
                self._keep(msgpack.unpackb(sock.recv(), raw=False))
                reply = self._deferred[rid][1]
            del self._deferred[rid]
            self._check_peer()
            if reply.get("ok"):
                return reply
            err = reply.get("error") or {}
            if err.get("code") == "no_session":
                self._session = False  # the engine restarted: the next request says hello
            raise EngineError(err.get("code", "unknown"), err.get("message", str(reply)))

    def gone(self, engine: tuple[int, int] | None) -> bool:
        """process_gone(engine), reading /proc at most every GONE_CHECK_S per
        engine (a process found gone stays gone): cheap enough to ask before
        every request. A death it has not seen yet is seen by the request's
        own wait for its reply (WATCH_MS)."""
        if engine is None:
            return False
        now = time.monotonic()
        seen = self._gone.get(engine)
        if seen is not None and (seen[1] or now - seen[0] < GONE_CHECK_S):
            return seen[1]
        verdict = process_gone(engine)
        if seen is None and len(self._gone) >= 16:
            self._gone.clear()
        self._gone[engine] = (now, verdict)
        return verdict

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._session:
                try:
                    self._roundtrip({"op": "goodbye"}, 500)
                except EngineError:
                    pass
            self._reset()
