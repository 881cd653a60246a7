"""Fixtures: a real engine process per test (started by the store itself, as
in production), in a temporary storage directory, stopped afterwards."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import yaml

from procs import wait_gone
from timeouts import limit_every_test
from ucm.client import EngineClient, EngineError


def pytest_collection_modifyitems(items):
    # Ordinary tests take seconds; vLLM end to end sets its own, longer limit.
    limit_every_test(items, 300)


def write_config(path, storage, **extra):
    cc = {"storage_backends": str(storage), "transferStreamNumber": 4, **extra}
    with open(path, "w") as f:
        yaml.safe_dump({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": cc}, f)
    return str(path)


_sock_dir: list[str] = []


def private_sock(name: str) -> str:
    """A short socket path in a directory of this test run only (0700): a
    socket directly in /tmp could be anybody's, and engine and shim refuse
    one there (ucm.engine_trust)."""
    if not _sock_dir:
        _sock_dir.append(tempfile.mkdtemp(prefix="ucm-py-", dir="/tmp"))
        atexit.register(shutil.rmtree, _sock_dir[0], True)
    return os.path.join(_sock_dir[0], f"{name}.sock")


def engine_pid(endpoint):
    c = EngineClient(endpoint, 500)
    try:
        return c.raw("health")["pid"]
    except EngineError:  # none there, or not ours to stop
        return None
    finally:
        c.close()


def stop_engine(endpoint, sig=signal.SIGTERM):
    pid = engine_pid(endpoint)
    if pid is None:
        return
    os.kill(pid, sig)
    wait_gone(pid, 10.0)


@pytest.fixture
def storage(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def config_file(tmp_path, storage):
    # A short socket path of our own: ipc paths must stay under 103 bytes.
    sock = private_sock(tmp_path.name[-12:])
    path = write_config(
        tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=3000, loadTimeoutMs=20000
    )
    yield path
    stop_engine(f"ipc://{sock}")


@pytest.fixture
def cuda_emu(monkeypatch):
    """torch.cuda replaced by the emulated runtime (test/python/cuda_emu.py)
    for one test: returns the EmuRuntime. The node's emulated GPUs come from
    UCM_CUDA_EMU_DEVICES (two by default), set in the environment so that an
    engine started by the test sees the same node."""
    import cuda_emu as ce

    monkeypatch.setenv(ce.DEVICES_ENV, os.environ.get(ce.DEVICES_ENV, ce.DEFAULT_DEVICES))
    rt = ce.EmuRuntime()
    ce.install(rt, monkeypatch.setattr)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer Qwen2-architecture model with random weights, built locally
    (examples/make_tiny_model.py): enough for a real VllmConfig."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "make_tiny_model.py"),
            str(d),
            "--layers",
            "2",
            "--hidden",
            "128",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--intermediate",
            "256",
        ],
        check=True,
        capture_output=True,
    )
    return str(d)
