"""Fixtures: a real engine process per test (started by the store itself, as
in production), in a temporary storage directory, stopped afterwards."""
from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from ucm.client import EngineClient, EngineUnavailable


def write_config(path, storage, **extra):
    cc = {"storage_backends": str(storage), "transferStreamNumber": 4, **extra}
    with open(path, "w") as f:
        yaml.safe_dump({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": cc}, f)
    return str(path)


def engine_pid(endpoint):
    c = EngineClient(endpoint, 500)
    try:
        return c.raw("health")["pid"]
    except EngineUnavailable:
        return None
    finally:
        c.close()


def stop_engine(endpoint, sig=signal.SIGTERM):
    pid = engine_pid(endpoint)
    if pid is None:
        return
    os.kill(pid, sig)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.fixture
def storage(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def config_file(tmp_path, storage):
    # A short socket path of our own: ipc paths must stay under 108 bytes.
    sock = f"/tmp/ucm-pytest-{os.getpid()}-{tmp_path.name[-12:]}.sock"
    path = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=3000, loadTimeoutMs=20000)
    yield path
    stop_engine(f"ipc://{sock}")
