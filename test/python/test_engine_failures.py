"""An engine that cannot start, and one that dies under a transfer (issue 29,
items 2 and 3; issue 26).

The engine's own reason for refusing to start (a storage directory that does
not exist, or that every user may write) reaches the caller in one line: in
NfsStore's exception, and in the vLLM connector's log, said once however
often it retries. A connector whose engine cannot start costs vLLM's steps
nothing: they never wait for an engine that is not there, and a directory
that appears later (an NFS mount coming up) is used without a restart. A
wait on a task whose engine was killed returns, failed, within a second of
the kill, not at the task's deadline. Real engines, sockets and files."""

from __future__ import annotations

import os
import secrets

import pytest

from conftest import private_sock, stop_engine, write_config
from ucm.launcher import EngineStartError
from ucm.store import NfsStore

BLOCK = 32


@pytest.fixture
def endpoint():
    ep = f"ipc://{private_sock(f'ef-{secrets.token_hex(4)}')}"
    yield ep
    stop_engine(ep)


def config(tmp_path, storage, endpoint, **extra):
    return write_config(tmp_path / "ucm.yaml", storage, endpoint=endpoint, clientTimeoutMs=2000, **extra)


# ---- the reason in the exception (item 2) ---------------------------------------------------


def test_a_storage_directory_that_does_not_exist_is_named_in_the_exception(tmp_path, endpoint):
    absent = tmp_path / "not-mounted" / "kv"
    cfg = config(tmp_path, absent, endpoint)
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "\n" not in msg
    assert f'directory "{absent}" does not exist' in msg, msg
    assert raised.value.config_error
    assert "engine.log" in msg  # where to read more


def test_a_storage_directory_every_user_may_write_is_named_in_the_exception(tmp_path, endpoint):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    cfg = config(tmp_path, shared, endpoint)
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "\n" not in msg
    assert f'directory "{shared}" is writable by every user (mode 1777); chmod o-w it' in msg, msg


def test_the_reason_comes_from_this_start_not_from_an_earlier_one_in_the_same_log(tmp_path, endpoint, monkeypatch):
    """UCM_ENGINE_LOG is appended to: what an earlier engine wrote there is
    never taken for this one's reason."""
    log = tmp_path / "engine.log"
    log.write_text("[UCMNFSSTORE] [E] config error: an earlier engine's reason\n")
    monkeypatch.setenv("UCM_ENGINE_LOG", str(log))
    absent = tmp_path / "absent"
    cfg = config(tmp_path, absent, endpoint)
    monkeypatch.setenv("UCM_ENGINE_CMD", "false")  # exits at once and says nothing
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "wrote no reason" in msg and "earlier" not in msg, msg
    assert not raised.value.config_error
    monkeypatch.delenv("UCM_ENGINE_CMD")
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert f'directory "{absent}" does not exist' in msg and "earlier" not in msg, msg
    assert str(log) in msg


def test_an_engine_that_crashes_at_startup_gives_its_exception(tmp_path, storage, endpoint, monkeypatch):
    """Not a refusal of the engine's own but a crash (Node.js prints the
    stack): the exception's line is the reason."""
    crash = tmp_path / "crash.js"
    crash.write_text('console.log("starting");\nthrow new TypeError("the addon is missing a symbol");\n')
    monkeypatch.setenv("UCM_ENGINE_CMD", f"node {crash}")
    with pytest.raises(EngineStartError) as raised:
        NfsStore(config(tmp_path, storage, endpoint))
    assert "engine exited at startup: TypeError: the addon is missing a symbol (" in str(raised.value)
