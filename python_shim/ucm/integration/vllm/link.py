"""The connector's engine connection: every request degrades to a miss.

Both halves of the connector (the scheduler's lookups, the workers'
transfers) talk to the engine through `EngineLink`. Nothing from the store may
reach vLLM's forward pass or stall it: an engine that does not answer, or
answers with an error, makes the request return None (a miss, logged), the
link stops asking for a while and reconnects in the background (starting the
engine if none runs), and an engine started with other settings than this
config's is refused, all misses, until that changes. Failures nobody foresaw
(a bug, a socket error) are logged at most once a minute per operation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...client import EngineClient, EngineError, UntrustedEngine
from ...launcher import SettingsMismatch, ensure_engine
from ...runtime_dir import RuntimeDirError
from . import stats as ucm_stats
from .common import ConnectorOptions

logger = logging.getLogger("ucm")


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
        self._retry_at = 0.0
        #: why the engine is not used (its settings differ from this config's), or None
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._stats = ucm_stats.empty()  # since the last get_kv_connector_stats
        self._unexpected_at: dict[str, float] = {}  # op -> when an unexpected failure of it was last logged

    def _connect(self, force: bool = False) -> bool:
        """Makes sure an engine answers (starting one if needed); on failure stays in miss mode for a while."""
        if not force and time.monotonic() < self._retry_at:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is already at it
        try:
            return self._connect_locked()
        finally:
            self._lock.release()

    def _connect_locked(self) -> bool:
        try:
            ensure_engine(self.config, start_timeout_s=max(5.0, self.config.timeout_ms / 1000))
            self._refused = None
            return True
        except (SettingsMismatch, UntrustedEngine, RuntimeDirError) as e:
            # Another config's engine (using it would silently ignore ours), or
            # what answers is not this user's engine, or its runtime directory
            # is another user's. All misses until that changes (checked again
            # every minute), said once with what to do.
            self._retry_at = time.monotonic() + 60.0
            if self._refused != str(e):
                logger.error("UCM: serving without the store: %s", e)
            self._refused = str(e)
            return False
        except Exception as e:  # noqa: BLE001 - any failure here means "no store for now"
            self._retry_at = time.monotonic() + 5.0
            logger.warning("UCM: engine unavailable (%s); serving without the store, retrying in 5 s", e)
            return False

    def _down(self) -> bool:
        """True while the engine is known down or stuck (not asked again before the retry time)."""
        return time.monotonic() < self._retry_at

    def _usable(self) -> bool:
        """False while the engine is known down, or refused for its settings."""
        if self._down():
            return False
        return self._refused is None or self._connect()

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
            self._retry_at = time.monotonic() + 60.0
            if self._refused != str(e):
                logger.error("UCM: serving without the store: %s", e)
            self._refused = str(e)
            return
        if e.code == "unavailable":
            self._retry_at = time.monotonic() + 2.0
            logger.warning("UCM: %s failed (%s); treating as a miss", op, e)
            threading.Thread(target=self._connect, kwargs={"force": True}, daemon=True).start()
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
        try:
            self.client.close()
        except Exception as e:  # noqa: BLE001
            self._unexpected("shutdown", e)
