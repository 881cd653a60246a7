"""Finds the engine for a config, or starts one.

Many processes (the scheduler and every TP rank) may start at once; a file
lock in the runtime directory makes exactly one of them spawn the engine,
the others wait until it answers. The engine runs detached (its own session)
so it outlives any single vLLM process and serves them all.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time

import yaml

from .client import EngineClient, EngineUnavailable
from .config import StoreConfig, runtime_dir


def repo_root() -> str:
    """The checkout holding dist/core/cli.js (UCM_HOME overrides)."""
    if os.environ.get("UCM_HOME"):
        return os.environ["UCM_HOME"]
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_command(config_file: str) -> list[str]:
    override = os.environ.get("UCM_ENGINE_CMD")
    if override:
        return override.split() + ["serve", "--config", config_file]
    cli = os.path.join(repo_root(), "dist", "core", "cli.js")
    if os.path.exists(cli):
        node = shutil.which("node") or "node"
        return [node, cli, "serve", "--config", config_file]
    exe = shutil.which("ucm-engine")
    if exe:
        return [exe, "serve", "--config", config_file]
    raise FileNotFoundError(f"engine not found: build it with `npm install` in {repo_root()} or set UCM_HOME / UCM_ENGINE_CMD")


def engine_env() -> dict[str, str]:
    """The environment the engine starts with: ours, minus the GPU view.

    One engine serves every vLLM process of the node, and whichever process
    starts it first passes on its environment. vLLM gives each worker its own
    CUDA_VISIBLE_DEVICES (rank 3 sees only "3", as its device 0); an engine
    inheriting that would see one GPU and could not open the others' memory.
    So the engine sees every GPU and finds each region's GPU by PCI bus id.
    CUDA_DEVICE_ORDER is kept: it changes only how devices are numbered,
    not which exist, and the bus id makes numbering irrelevant."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def alive(endpoint: str, timeout_ms: int = 300) -> bool:
    c = EngineClient(endpoint, timeout_ms)
    try:
        return c.raw("health", deadline_ms=timeout_ms).get("ok") is True
    except EngineUnavailable:
        return False
    finally:
        c.close()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ensure_engine(cfg: StoreConfig, start_timeout_s: float = 60.0) -> None:
    """Returns once an engine answers on cfg.endpoint, starting one if needed."""
    if alive(cfg.endpoint):
        return
    rdir = runtime_dir(cfg.storage_backends)
    os.makedirs(rdir, mode=0o700, exist_ok=True)
    with open(os.path.join(rdir, "launch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if alive(cfg.endpoint):
            return
        config_file = cfg.config_file
        if config_file is None:  # built from a dict: hand the engine a file
            config_file = os.path.join(rdir, "config.yaml")
            with open(config_file, "w") as f:
                yaml.safe_dump(cfg.raw, f)
        log_path = os.environ.get("UCM_ENGINE_LOG")
        out = open(log_path, "ab") if log_path else None
        cmd = engine_command(config_file)
        if "endpoint" not in str(cfg.raw):
            cmd += ["--endpoint", cfg.endpoint]
        # A shell that starts the engine in the background and exits at once:
        # the engine is reparented to init, so it never lingers as a zombie of
        # whichever vLLM process happened to start it, and outlives it.
        pid_file = os.path.join(rdir, "engine.pid")
        starter = subprocess.Popen(
            ["sh", "-c", '"$@" </dev/null & echo $! > "$UCM_PID_FILE"', "ucm-engine-starter", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out or None,  # by default the engine logs where vLLM logs
            stderr=out or None,
            start_new_session=True,
            close_fds=True,
            env={**engine_env(), "UCM_PID_FILE": pid_file},
        )
        starter.wait()
        try:
            with open(pid_file) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if out is not None:
            out.close()
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if alive(cfg.endpoint, 500):
                return
            if pid and not _pid_alive(pid):
                raise RuntimeError(f"engine exited at startup: {' '.join(cmd)}")
            time.sleep(0.05)
        raise RuntimeError(f"engine did not answer on {cfg.endpoint} within {start_timeout_s:.0f}s")


def _main() -> None:  # pragma: no cover - manual helper
    from .config import load_config

    ensure_engine(load_config(sys.argv[1]))
    print("engine ready")


if __name__ == "__main__":  # pragma: no cover
    _main()
