"""Finds the engine for a config, or starts one.

Many processes (the scheduler and every TP rank) may start at once; a file
lock in the runtime directory makes exactly one of them spawn the engine,
the others wait until it answers. The engine runs detached (its own session,
stdin from /dev/null, stdout and stderr to a log file) so it outlives any
single vLLM process, serves them all, and never depends on the pipes of the
process that happened to start it.

The runtime directory (/tmp/ucm-<uid>/<digest>, ucm.runtime_dir) holds the
lock, the engine's log and a record of the engine this launcher started (pid
and settings); ucm.engine_cmd says where the engine is and how it runs.

One engine holds one set of settings for a storage directory. A config
whose settings differ from the running engine's gets that engine replaced
when this launcher started it and it serves no client; otherwise it is
refused with an error naming each setting, both values and the way out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import yaml

from . import settings as engine_settings
from .client import EngineClient, EngineUnavailable, process_gone, process_identity
from .config import CONNECTOR_NAMES, ConfigError, StoreConfig, default_cache_bytes, runtime_dir
from .engine_cmd import build_id, engine_command, engine_env, engine_main, node_binary, repo_root
from .runtime_dir import (
    RECORD,
    RuntimeDirError,
    open_in,
    open_log,
    read_record,
    secure_runtime_dir,
    startup_reason,
    write_in,
)

# Their home before they had modules of their own (tests, tools and the
# ucm-engine console script name them here).
__all__ = [
    "EngineStartError",
    "RuntimeDirError",
    "SettingsMismatch",
    "alive",
    "build_id",
    "check_settings",
    "engine_command",
    "engine_env",
    "engine_main",
    "ensure_engine",
    "health",
    "node_binary",
    "repo_root",
    "secure_runtime_dir",
]

logger = logging.getLogger("ucm")

_said_log: set[str] = set()
#: an engine this launcher starts exits after this long without a client
#: (UCM_ENGINE_IDLE_EXIT_S; 0: never), so that none is left behind for good
_IDLE_EXIT_S = 600


class SettingsMismatch(ConfigError):
    """A running engine holds other settings than this config asks for."""


class EngineStartError(RuntimeError):
    """The engine this launcher started exited before it served. The message
    is one line that begins with the engine's own reason (`reason`, read
    from its log, None when it wrote none) and names the log and the
    command. `config_error`: the engine refused its config (a storage
    directory that does not exist or that every user may write, a bad
    value), which no retry mends until the config or the directory
    changes."""

    def __init__(self, reason: str | None, log_path: str, cmd: list[str]):
        self.reason = reason
        self.log_path = log_path
        self.config_error = reason is not None and reason.startswith("config error:")
        why = reason if reason is not None else "it wrote no reason to its log"
        super().__init__(f"engine exited at startup: {why} (its log: {log_path}; command: {' '.join(cmd)})")


def health(endpoint: str, timeout_ms: int = 300, engine_uid: int | None = None) -> dict[str, Any] | None:
    """The engine's health reply, or None when nothing answers in time.
    Raises UntrustedEngine when what answers is not this user's engine."""
    c = EngineClient(endpoint, timeout_ms, engine_uid=engine_uid)
    try:
        r = c.raw("health", deadline_ms=timeout_ms)
        return r if r.get("ok") is True else None
    except EngineUnavailable:
        return None
    finally:
        c.close()


def alive(endpoint: str, timeout_ms: int = 300, engine_uid: int | None = None) -> bool:
    return health(endpoint, timeout_ms, engine_uid) is not None


def _record_of(cfg: StoreConfig, pid: int | None) -> dict[str, Any] | None:
    """The launcher's record of the engine now serving cfg, when it started
    that very process (pid and start time match)."""
    if pid is None:
        return None
    rdir = runtime_dir(cfg.storage_backends)
    try:
        fd = os.open(rdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        rec = read_record(fd, rdir)
    finally:
        os.close(fd)
    if not rec or rec.get("pid") != pid:
        return None
    ident = process_identity(pid)
    if ident is None or list(ident) != rec.get("identity"):
        return None
    return rec


# ---- settings ---------------------------------------------------------------------


def _backends(cfg: StoreConfig) -> int:
    return len(cfg.storage_backends.split(":"))


def wanted_settings(cfg: StoreConfig) -> dict[str, Any]:
    """The engine settings cfg states, with the Cache stage's size that UCM's
    store_pipeline implies, as the engine derives it (core/config.ts): an
    engine started from cfg runs with exactly these."""
    out = engine_settings.explicit(cfg.connector_config)
    if cfg.store_pipeline == "Cache|Posix":
        out["hostCacheBytes"] = cfg.cache_buffer_bytes or default_cache_bytes()
        out.setdefault("writeBehind", True)
    elif cfg.store_pipeline == "Posix":
        out["hostCacheBytes"] = 0
    return out


def check_settings(cfg: StoreConfig, h: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any] | None]:
    """(differences, record) between the engine that answered `h` and cfg.
    The engine's own report of its settings is used when it gives one
    (`settings` in health); else the record this launcher wrote when it
    started it; else only transferStreamNumber can be checked (stats)."""
    wanted = wanted_settings(cfg)
    pid = h.get("pid")
    rec = _record_of(cfg, pid)
    # An engine left running from another build (an upgrade since) counts as
    # another setting: it may not do what this shim relies on.
    ours = build_id()
    built = {"build": (h["build"], ours)} if isinstance(h.get("build"), str) and ours and h["build"] != ours else {}
    if isinstance(h.get("settings"), dict):
        return {
            **built,
            **engine_settings.differences(h["settings"], wanted, _backends(cfg), running_is_effective=True),
        }, rec
    if rec is not None:
        return {**built, **engine_settings.differences(rec.get("settings") or {}, wanted, _backends(cfg))}, rec
    # Started by hand (or by another launcher version): what stats shows.
    c = EngineClient(cfg.endpoint, 2000, engine_uid=cfg.engine_uid)
    try:
        threads = c.raw("stats").get("transferThreads")
    except EngineUnavailable:
        return {}, None
    finally:
        c.close()
    want = wanted.get("transferStreamNumber", engine_settings.DEFAULTS["transferStreamNumber"])
    return {
        **built,
        **({"transferStreamNumber": (threads, want)} if isinstance(threads, int) and threads != want else {}),
    }, None


def _mismatch(cfg: StoreConfig, h: dict[str, Any], diff: dict[str, tuple[Any, Any]], why: str) -> SettingsMismatch:
    have, want = engine_settings.describe(diff)
    pid = h.get("pid")
    where = cfg.config_file or "the config given as a dict"
    return SettingsMismatch(
        f"the engine serving {cfg.storage_backends} (pid {pid}, {cfg.endpoint}) runs with {have}; "
        f"{where} asks for {want}. One engine holds one set of settings for a storage directory, and {why}. "
        f"Use the same values in every config for {cfg.storage_backends}, or stop that engine "
        f"(kill {pid}) so that the next start uses the new ones"
    )


def _stop_engine(pid: int, ident: tuple[int, int], within_s: float) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process_gone(ident):
            return True
        time.sleep(0.05)
    return False


# ---- starting ----------------------------------------------------------------------


def ensure_engine(cfg: StoreConfig, start_timeout_s: float = 60.0) -> None:
    """Returns once an engine with cfg's settings answers on cfg.endpoint,
    starting one if needed (or replacing an idle one this launcher started
    with other settings). Raises SettingsMismatch, RuntimeDirError,
    UntrustedEngine (what answers is another user's), or RuntimeError when
    no engine can be had."""
    # The runtime directory first: one another user made (to serve a fake
    # engine in it) is refused, saying what to do, before anything there is
    # asked anything.
    rdir = runtime_dir(cfg.storage_backends)
    dir_fd = secure_runtime_dir(rdir)
    try:
        h = health(cfg.endpoint, engine_uid=cfg.engine_uid)
        if h is not None and not check_settings(cfg, h)[0]:
            return
        lock = open_in(dir_fd, rdir, "launch.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _ensure_locked(cfg, rdir, dir_fd, start_timeout_s)
        finally:
            os.close(lock)  # releases the lock
    finally:
        os.close(dir_fd)


def _ensure_locked(cfg: StoreConfig, rdir: str, dir_fd: int, start_timeout_s: float) -> None:
    h = health(cfg.endpoint, engine_uid=cfg.engine_uid)
    if h is not None:
        diff, rec = check_settings(cfg, h)
        if not diff:
            return
        if rec is None:
            raise _mismatch(cfg, h, diff, "this one was not started by this launcher, so it is left alone")
        # Ours: replace it, if nobody uses it. A client that exited without
        # goodbye is noticed by the engine within its clientCheckMs.
        settle = (rec.get("settings") or {}).get("clientCheckMs", engine_settings.DEFAULTS["clientCheckMs"]) / 1000 + 1
        until = time.monotonic() + settle
        while h is not None and h.get("clients", 0) > 0 and time.monotonic() < until:
            time.sleep(0.1)
            h = health(cfg.endpoint, 1000, cfg.engine_uid)
        if h is not None and h.get("clients", 0) > 0:
            raise _mismatch(cfg, h, diff, f"it serves {h['clients']} client(s) now")
        if h is not None:
            grace = (rec.get("settings") or {}).get(
                "shutdownTimeoutS", engine_settings.DEFAULTS["shutdownTimeoutS"]
            ) + 5
            have, want = engine_settings.describe(diff)
            logger.warning(
                "UCM: replacing the idle engine (pid %s) for %s: it runs with %s; this config asks for %s",
                rec["pid"],
                cfg.storage_backends,
                have,
                want,
            )
            if not _stop_engine(rec["pid"], tuple(rec["identity"]), grace):
                raise RuntimeError(f"engine pid {rec['pid']} did not stop within {grace:.0f} s of SIGTERM")
    else:
        rec = read_record(dir_fd, rdir)
        ident = rec.get("identity") if rec else None
        if ident and not process_gone(tuple(ident)):
            # Alive but silent (stopped, or stuck): a second engine would take
            # its socket over while it may still finish tasks. Not that.
            raise EngineUnavailable(
                f"the engine this launcher started (pid {rec['pid']}) is alive but does not answer on "
                f"{cfg.endpoint}; not starting a second one (its log: {rec.get('log')})"
            )
    _start(cfg, rdir, dir_fd, start_timeout_s)


def _config_file(cfg: StoreConfig, rdir: str, dir_fd: int) -> str:
    if cfg.config_file is not None:
        return cfg.config_file
    # Built from a dict: the engine reads a file. Backends made absolute, so
    # the engine resolves them as this process did.
    doc = json.loads(json.dumps(cfg.raw))
    section = doc
    if "ucm_connectors" in doc:
        section = next(
            c for c in doc["ucm_connectors"] if isinstance(c, dict) and c.get("ucm_connector_name") in CONNECTOR_NAMES
        )
    section["ucm_connector_config"]["storage_backends"] = cfg.storage_backends_absolute
    return write_in(dir_fd, rdir, "config.yaml", yaml.safe_dump(doc).encode())


def _start(cfg: StoreConfig, rdir: str, dir_fd: int, start_timeout_s: float) -> None:
    config_file = _config_file(cfg, rdir, dir_fd)
    cmd = engine_command(config_file)
    if "endpoint" not in cfg.connector_config:
        cmd += ["--endpoint", cfg.endpoint]
    idle = int(os.environ.get("UCM_ENGINE_IDLE_EXIT_S", _IDLE_EXIT_S))
    if idle > 0:
        cmd += ["--exit-when-idle", str(idle)]
    log_fd, log_path = open_log(rdir, dir_fd)
    try:
        _spawn_and_wait(cfg, rdir, dir_fd, start_timeout_s, cmd, config_file, log_fd, log_path)
    finally:
        os.close(log_fd)


def _spawn_and_wait(
    cfg: StoreConfig,
    rdir: str,
    dir_fd: int,
    start_timeout_s: float,
    cmd: list[str],
    config_file: str,
    log_fd: int,
    log_path: str,
) -> None:
    log_start = os.fstat(log_fd).st_size  # UCM_ENGINE_LOG is appended to: this engine's lines come after
    # A shell starts the engine in the background and exits at once: the
    # engine is reparented to init (never a zombie of whichever vLLM
    # process started it), and its stdout and stderr are the log file
    # (the shell's stderr), its stdin /dev/null. Only the shell's `echo`
    # goes to our pipe, so the engine holds none of our stdio.
    starter = subprocess.Popen(
        ["sh", "-c", '"$@" </dev/null >&2 & echo $!', "ucm-engine-starter", *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_fd,
        start_new_session=True,
        close_fds=True,
        env=engine_env(),
    )
    out, _ = starter.communicate(timeout=30)
    try:
        pid = int(out.strip() or 0)
    except ValueError:
        pid = 0
    ident = process_identity(pid) if pid else None
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if alive(cfg.endpoint, 500, cfg.engine_uid):
            write_in(
                dir_fd,
                rdir,
                RECORD,
                json.dumps(
                    {
                        "pid": pid,
                        "identity": list(ident) if ident else None,
                        "config_file": config_file,
                        "log": log_path,
                        "settings": wanted_settings(cfg),
                        "started_unix": time.time(),
                    }
                ).encode(),
            )
            _say_where(cfg, pid, log_path)
            return
        if ident is None or process_gone(ident):
            raise EngineStartError(startup_reason(log_fd, log_start), log_path, cmd)
        time.sleep(0.05)
    raise RuntimeError(f"engine did not answer on {cfg.endpoint} within {start_timeout_s:.0f}s; see its log {log_path}")


def _say_where(cfg: StoreConfig, pid: int, log_path: str) -> None:
    """Says once per process where the engine logs. The engine never writes to
    our terminal or pipes; each client prints the seed's Task lines of its own
    tasks (ucm.client.say_task_line)."""
    if log_path not in _said_log:
        _said_log.add(log_path)
        try:
            os.write(
                2, f"[ucm] started the engine for {cfg.storage_backends} (pid {pid}); it logs to {log_path}\n".encode()
            )
        except OSError:
            pass


def _main() -> None:  # pragma: no cover - manual helper
    from .config import load_config

    ensure_engine(load_config(sys.argv[1]))
    print("engine ready")


if __name__ == "__main__":  # pragma: no cover
    _main()
