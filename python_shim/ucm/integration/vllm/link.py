"""The connector's engine connection: every request degrades to a miss.

Both halves of the connector (the scheduler's lookups, the workers'
transfers) talk to the engine through `EngineLink`. Nothing from the store may
reach vLLM's forward pass or stall it: an engine that does not answer, or
answers with an error, makes the request return None (a miss, logged). The
link then sends nothing more until a thread of its own has found an engine
that answers again (starting one if none runs): no step ever waits for an
engine that is not there, however long it stays away. That thread tries
after 2, 4, 8 ... s (at once after a request found no engine), at most 10 s
apart, or a minute while the engine refuses its config or is refused. So an
engine that cannot start (a storage directory that does not exist yet, such
as an NFS mount still coming up) is used once it can, and costs one engine
start a minute meanwhile. Why the store is off is logged once, with the
engine's own reason, and again only when the reason changes; that it serves
again, once. An engine started with other settings than this config's is refused,
all misses, until that changes. Failures nobody foresaw (a bug, a socket
error) are logged at most once a minute per operation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...client import EngineClient, EngineError, UntrustedEngine
from ...launcher import EngineStartError, SettingsMismatch, ensure_engine
from ...runtime_dir import RuntimeDirError
from . import stats as ucm_stats
from .common import ConnectorOptions

logger = logging.getLogger("ucm")

#: the first retry of an engine that cannot be had, and the longest wait
#: between two: a minute while the engine refuses its config or is refused
#: (what mends that is a change by somebody), 10 s otherwise
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 60.0
RETRY_MAX_TRANSIENT_S = 10.0
#: after a request found no engine, none is sent for this long (even if one answers at once)
QUIET_S = 2.0


class EngineLink:
    def __init__(self, opts: ConnectorOptions, name: str):
        self.opts = opts
        self.config = opts.config
        self.client = EngineClient(
            self.config.endpoint,
            self.config.timeout_ms,
            name=name,
            on_hello=self.config.on_hello,
            engine_uid=self.config.engine_uid,
        )
        #: an engine answered the last attempt to find one, and no request found it gone since
        self._up = False
        #: no request before this, even when up (just after a failure)
        self._retry_at = 0.0
        #: when the reconnecting thread tries next, and how many attempts failed in a row
        self._next_try = 0.0
        self._failures = 0
        #: why the engine is not used (its settings differ from this config's), or None
        self._refused: str | None = None
        #: why the store is off, as last logged (said once per reason)
        self._said: str | None = None
        self._lock = threading.Lock()  # one attempt at a time
        self._thread_lock = threading.Lock()
        self._reconnector: threading.Thread | None = None
        self._closing = threading.Event()
        self._stats = ucm_stats.empty()  # since the last get_kv_connector_stats
        self._unexpected_at: dict[str, float] = {}  # op -> when an unexpected failure of it was last logged

    def _connect(self) -> bool:
        """Makes sure an engine answers (starting one if needed). Called once
        when the connector is built (vLLM's startup may wait for it), then
        only by the reconnecting thread. On failure the store is off until
        that thread finds an engine."""
        if not self._lock.acquire(blocking=False):
            return self._up  # another thread is already at it
        try:
            return self._connect_locked()
        finally:
            self._lock.release()

    def _connect_locked(self) -> bool:
        try:
            ensure_engine(self.config, start_timeout_s=max(5.0, self.config.timeout_ms / 1000))
        except (SettingsMismatch, UntrustedEngine, RuntimeDirError) as e:
            # Another config's engine (using it would silently ignore ours), or
            # what answers is not this user's engine, or its runtime directory
            # is another user's: all misses until that changes.
            self._refused = str(e)
            self._off(str(e), logging.ERROR, RETRY_MAX_S)
            return False
        except EngineStartError as e:
            # The engine's own reason; a config it refuses stays refused until
            # the config or the directory changes (retried all the same).
            if e.config_error:
                self._off(str(e), logging.ERROR, RETRY_MAX_S)
            else:
                self._off(str(e), logging.WARNING, RETRY_MAX_TRANSIENT_S)
            return False
        except Exception as e:  # noqa: BLE001 - any failure here means "no store for now"
            self._off(f"engine unavailable ({e})", logging.WARNING, RETRY_MAX_TRANSIENT_S)
            return False
        self._refused = None
        self._failures = 0
        self._up = True
        if self._said is not None:
            logger.info("UCM: the engine on %s answers again; the store serves", self.config.endpoint)
            self._said = None
        return True

    def _off(self, why: str, level: int, longest_s: float) -> None:
        """No engine to use: misses until the reconnecting thread finds one
        (after RETRY_FIRST_S, doubled after each failure up to `longest_s`)."""
        self._up = False
        self._failures += 1
        wait = min(longest_s, RETRY_FIRST_S * 2 ** min(self._failures - 1, 10))
        self._next_try = time.monotonic() + wait
        if why != self._said:
            self._said = why
            logger.log(
                level,
                "UCM: serving without the store: %s. Trying again in the background (in %.0f s, then at most "
                "every %.0f s); no step waits for it",
                why,
                wait,
                longest_s,
            )
        else:
            logger.debug("UCM: still no engine (attempt %d); next in %.0f s", self._failures, wait)
        self._reconnect_soon()

    def _reconnect_soon(self) -> None:
        """Starts the reconnecting thread unless it runs (also in a process
        forked from the one that started it, which has no thread)."""
        if self._closing.is_set():
            return
        with self._thread_lock:
            t = self._reconnector
            if t is not None and t.is_alive():
                return
            t = self._reconnector = threading.Thread(target=self._reconnect_loop, name="ucm-reconnect", daemon=True)
            t.start()

    def _reconnect_loop(self) -> None:
        while not self._closing.is_set():
            wait = self._next_try - time.monotonic()
            if wait > 0 and self._closing.wait(wait):
                return
            if self._connect():
                return
            if self._next_try <= time.monotonic() and self._closing.wait(RETRY_FIRST_S):
                return  # (an attempt of another thread was under way: not a failure of this one)

    def _down(self) -> bool:
        """True while no engine is known to answer, or just after one did not (no request is sent then)."""
        return not self._up or time.monotonic() < self._retry_at

    def _usable(self) -> bool:
        """False while the engine is known down, or refused for its settings
        (the reconnecting thread then looks for one: this never waits)."""
        if self._up:
            return time.monotonic() >= self._retry_at
        self._reconnect_soon()
        return False

    def _call(self, op: str, **args: Any) -> dict[str, Any] | None:
        """A request that degrades to None (a miss) when the engine is down."""
        if not self._usable():
            return None
        try:
            return self.client.call(op, **args)
        except EngineError as e:
            self._failed(op, e)
            return None
        except Exception as e:  # noqa: BLE001 - nothing from the store may reach vLLM's forward pass
            self._unexpected(op, e)
            return None

    def _failed(self, op: str, e: EngineError) -> None:
        if isinstance(e, UntrustedEngine):
            self._refused = str(e)
            self._failures = max(self._failures, 5)  # a minute: what answers is not ours
            self._off(str(e), logging.ERROR, RETRY_MAX_S)
            return
        if e.code == "unavailable":
            # Nothing more is sent until the reconnecting thread (at once)
            # has found an engine that answers, and not for QUIET_S anyway.
            self._retry_at = time.monotonic() + QUIET_S
            if self._up:
                logger.warning("UCM: %s failed (%s); treating as a miss", op, e)
            self._up = False
            self._next_try = 0.0
            self._reconnect_soon()
        else:
            logger.warning("UCM: engine refused %s: %s", op, e)

    def _unexpected(self, op: str, e: BaseException) -> None:
        """A bug or an unforeseen failure (not an engine answer). It is
        logged, with its traceback the first time, at most once a minute per
        operation, and treated as a miss: vLLM must keep serving."""
        now = time.monotonic()
        last = self._unexpected_at.get(op)
        if last is not None and now - last < 60:
            return
        self._unexpected_at[op] = now
        logger.error(
            "UCM: %s failed unexpectedly (%s: %s); treating it as a miss, vLLM recomputes",
            op,
            type(e).__name__,
            e,
            exc_info=last is None,
        )

    # ---- stats (vLLM logs them as "KV Transfer metrics: ...") -----------------

    def get_kv_connector_stats(self) -> Any:
        if not any(self._stats.values()):
            return None
        out, self._stats = ucm_stats.build(self._stats), ucm_stats.empty()
        return out

    def shutdown(self) -> None:
        self._closing.set()
        try:
            self.client.close()
        except Exception as e:  # noqa: BLE001
            self._unexpected("shutdown", e)
