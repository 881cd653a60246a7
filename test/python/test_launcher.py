"""The launcher (issue 17 items 2-4, issue 19 item 3): one set of settings
per engine, a dead engine started again by the store's next call, an engine
that holds none of its starter's stdio, and a runtime directory nobody else
can plant files in. Real engines throughout."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import yaml

from conftest import engine_pid, private_sock, stop_engine, write_config
from procs import wait_gone
from ucm import settings as engine_settings
from ucm.client import EngineClient
from ucm.config import default_cache_bytes, load_config, runtime_dir
from ucm.launcher import RuntimeDirError, SettingsMismatch, ensure_engine, repo_root
from ucm.store import NfsStore

ROOT = repo_root()
CLI = os.path.join(ROOT, "dist", "core", "cli.js")


def stats(endpoint):
    c = EngineClient(endpoint, 3000)
    try:
        return c.raw("stats")
    finally:
        c.close()


@pytest.fixture
def endpoint():
    ep = f"ipc://{private_sock(f'l-{secrets.token_hex(4)}')}"
    yield ep
    stop_engine(ep)


def two_configs(tmp_path, storage, endpoint, a=None, b=None):
    a = {"transferStreamNumber": 2, **(a or {})}
    b = {"transferStreamNumber": 3, "odirect": False, **(b or {})}
    return (
        write_config(tmp_path / "a.yaml", storage, endpoint=endpoint, clientTimeoutMs=3000, **a),
        write_config(tmp_path / "b.yaml", storage, endpoint=endpoint, clientTimeoutMs=3000, **b),
    )


# ---- settings (issue 17, item 2) --------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(CLI), reason=f"the engine is not built ({CLI}; npm install)")
def test_settings_defaults_are_the_engines():
    """ucm.settings.DEFAULTS mirrors core/config.ts OPTIONS (the built engine's)."""
    out = subprocess.run(
        [
            "node",
            "-e",
            "const o=require(process.argv[1]).OPTIONS;"
            "console.log(JSON.stringify(Object.fromEntries(Object.entries(o).map(([k,s])=>[k,s.dflt]))))",
            os.path.join(ROOT, "dist", "core", "config.js"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    engine = json.loads(out.stdout)
    for k, v in engine_settings.DEFAULTS.items():
        assert k in engine, f"{k} is no engine option any more: update ucm/settings.py"
        assert engine_settings.parse_size(engine[k]) == v, f"{k}: engine default {engine[k]!r}, ucm/settings.py {v!r}"


def test_other_settings_replace_an_idle_engine_this_launcher_started(tmp_path, storage, endpoint, caplog):
    """UCM's benchmark runs each stream count in a new process: a config with
    other settings gets its own engine, the idle one is replaced."""
    cfg_a, cfg_b = two_configs(tmp_path, storage, endpoint)
    with NfsStore(cfg_a) as store:
        assert store.lookup([b"x"]) == [False]
        pid_a = engine_pid(endpoint)
    assert stats(endpoint)["transferThreads"] == 2
    with NfsStore(cfg_b) as store:
        assert store.lookup([b"x"]) == [False]
        pid_b = engine_pid(endpoint)
    assert pid_b != pid_a and wait_gone(pid_a)
    assert stats(endpoint)["transferThreads"] == 3
    assert any(
        "replacing the idle engine" in r.getMessage() and "transferStreamNumber 2" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.skipif(not os.path.exists(CLI), reason=f"the engine is not built ({CLI}; npm install)")
@pytest.mark.parametrize("form", ["file", "flat"])
@pytest.mark.parametrize("capacity_gb", [None, 1])
def test_a_cache_posix_engine_is_kept_for_the_same_config(tmp_path, storage, endpoint, caplog, capacity_gb, form):
    """UCM's store_pipeline "Cache|Posix" sizes the engine's Cache stage
    (cache_buffer_capacity_gb, or the default the engine derives) and turns
    write-behind on: the shim derives the same, so a second store of the same
    config keeps the engine (the demo's second vLLM process used to replace
    it, taking the size for 0). In a config file and in UCM's flat dict
    (which used to lose store_pipeline on the way: no Cache stage at all)."""
    cc = {
        "store_pipeline": "Cache|Posix",
        "storage_backends": str(storage),
        "endpoint": endpoint,
        "clientTimeoutMs": 3000,
        **({"cache_buffer_capacity_gb": capacity_gb} if capacity_gb else {}),
    }
    path = tmp_path / "pipeline.yaml"
    doc = {"ucm_connectors": [{"ucm_connector_name": "UcmPipelineStore", "ucm_connector_config": cc}]}
    path.write_text(yaml.safe_dump(doc))
    pids = []
    for _ in range(2):
        with NfsStore(str(path) if form == "file" else dict(cc)) as store:
            assert store.lookup([b"x"]) == [False]
            pids.append(engine_pid(endpoint))
    assert pids[0] == pids[1]
    want = capacity_gb << 30 if capacity_gb else default_cache_bytes()
    assert stats(endpoint)["tier"]["capacityBytes"] == want
    assert EngineClient(endpoint, 3000).raw("health")["settings"]["writeBehind"] is True
    assert not any("replacing the idle engine" in r.getMessage() for r in caplog.records)


def test_an_engine_of_another_build_is_replaced_when_idle(tmp_path, storage, endpoint, caplog, monkeypatch):
    """An engine left running from another build (health's `build`) counts as
    other settings: replaced when idle, as an upgrade would need."""
    import ucm.launcher as launcher

    cfg_a, _ = two_configs(tmp_path, storage, endpoint)
    with NfsStore(cfg_a) as store:
        store.lookup([b"x"])
        pid, build = engine_pid(endpoint), store.client.raw("health").get("build")
    assert build == launcher.build_id()
    monkeypatch.setattr(launcher, "build_id", lambda root=None: "feedfacefeedface")
    with NfsStore(cfg_a) as store:
        store.lookup([b"x"])
    assert engine_pid(endpoint) != pid
    assert any(
        f"it runs with build {build}; this config asks for build feedfacefeedface" in r.getMessage()
        for r in caplog.records
    )


def test_other_settings_are_refused_while_the_engine_serves(tmp_path, storage, endpoint):
    cfg_a, cfg_b = two_configs(tmp_path, storage, endpoint)
    with NfsStore(cfg_a) as store:
        assert store.lookup([b"x"]) == [False]  # a client of the engine from now on
        pid = engine_pid(endpoint)
        with pytest.raises(SettingsMismatch) as e:
            NfsStore(cfg_b)
        msg = str(e.value)
        for part in (
            "transferStreamNumber 2, odirect true",
            "transferStreamNumber 3, odirect false",
            cfg_b,
            f"pid {pid}",
            f"kill {pid}",
            "serves 1 client(s)",
        ):
            assert part in msg, (part, msg)
        assert store.lookup([b"x"]) == [False]  # the first one keeps working
    assert engine_pid(endpoint) == pid


def test_the_connector_serves_misses_rather_than_other_settings(tiny_model, tmp_path, storage, endpoint, caplog):
    """vLLM with a config whose settings differ from a busy engine's: one
    error naming them, then every lookup a miss (the engine is not used)."""
    from connector_kit import connector

    cfg_a, cfg_b = two_configs(tmp_path, storage, endpoint)
    with NfsStore(cfg_a) as store:
        store.lookup([b"x"])
        conn = connector(tiny_model, cfg_b, role="SCHEDULER")
        errors = [r.getMessage() for r in caplog.records if "serving without the store" in r.getMessage()]
        assert len(errors) == 1 and "transferStreamNumber 2, odirect true" in errors[0]
        assert conn._call("lookup", ns=conn.namespaces, keys=[b"k"]) is None
        conn.shutdown()


@pytest.mark.skipif(not os.path.exists(CLI), reason=f"the engine is not built ({CLI}; npm install)")
def test_an_engine_started_by_hand_is_never_replaced(tmp_path, storage, endpoint):
    cfg_a, cfg_b = two_configs(tmp_path, storage, endpoint)
    log = open(tmp_path / "hand.log", "wb")
    proc = subprocess.Popen(["node", CLI, "serve", "--config", cfg_a], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if engine_pid(endpoint) == proc.pid:
                break
            time.sleep(0.05)
        with pytest.raises(SettingsMismatch, match="not started by this launcher, so it is left alone"):
            NfsStore(cfg_b)
        with NfsStore(cfg_a) as store:
            assert store.lookup([b"x"]) == [False]
        assert engine_pid(endpoint) == proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# ---- restart (issue 17, item 3) ---------------------------------------------------------


def test_a_dead_engine_is_started_again_by_the_next_call(config_file):
    src = torch.randint(0, 1 << 30, (4, 4096), dtype=torch.int32)
    with NfsStore(config_file) as store:
        ks = [f"again-{i}".encode() for i in range(4)]
        assert store.wait(store.dump(ks, [0] * 4, list(src))) == 0
        assert store.commit(ks) == [True] * 4
        pid = engine_pid(store.config.endpoint)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        assert store.lookup(ks) == [True] * 4  # this very call starts the engine again
        assert engine_pid(store.config.endpoint) not in (None, pid)
        dst = torch.zeros_like(src)
        assert store.wait(store.load(ks, [0] * 4, list(dst))) == 0
        assert torch.equal(dst, src)


def cpus_allowed(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no binding to widen")
def test_an_engine_started_by_a_process_bound_to_one_core_runs_on_all(tmp_path, storage, endpoint):
    """vLLM binds each CPU worker to its cores; the worker that starts the engine must not pass that on (its
    threads would share one core with the worker's spinning ones: dumps then waited seconds in the queue). Every
    thread: Node's own (V8's garbage collection helpers, libuv's pool) exist before the engine's code runs, and
    while they stayed on the worker's core the engine's event loop stopped for 5.2-5.3 s, twice a minute, through
    `vllm serve` (a lookup unanswered, a request 5 s late: bench/hang_bench.py)."""
    every = os.sched_getaffinity(0)
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=endpoint)
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from ucm.config import load_config; from ucm.launcher import ensure_engine; ensure_engine(load_config(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, cfg], check=True, timeout=120)
    try:
        pid = engine_pid(endpoint)
        assert pid
        threads = os.listdir(f"/proc/{pid}/task")
        # Every thread runs anywhere: the engine's own (transfer, lookup, libzmq, the connection guard) and Node's.
        narrow = [t for t in threads if os.path.exists(f"/proc/{pid}/task/{t}") and cpus_allowed(int(t)) != every]
        assert narrow == [], f"{len(narrow)} of {len(threads)} engine threads still bound to the starter's core"
        assert cpus_allowed(pid) == every
    finally:
        stop_engine(endpoint)


# ---- stdio (issue 17, item 4) -------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys
    from ucm.store import NfsStore
    import torch
    store = NfsStore(sys.argv[1])
    assert store.wait(store.dump([b"stdio"], [0], [torch.ones(1024)])) == 0
    print(store.client.raw("health")["pid"], flush=True)
    for i in range(2000):
        print("line", i, flush=True)
""")


def test_an_auto_started_engine_holds_none_of_its_starters_stdio(tmp_path, storage, endpoint):
    """`python script.py | head -1` neither kills nor blocks the engine, and
    `| tee` ends when the script does: the engine's stdin is /dev/null, its
    stdout and stderr the log file in the runtime directory (said once on
    the starter's stderr)."""
    cfg = write_config(tmp_path / "stdio.yaml", storage, endpoint=endpoint, clientTimeoutMs=3000)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    py = sys.executable
    r = subprocess.run(
        ["sh", "-c", f'"{py}" "{script}" "{cfg}" | head -1'], capture_output=True, text=True, timeout=120
    )
    pid = int(r.stdout.strip())
    log = os.path.join(runtime_dir(str(storage)), "engine.log")
    assert f"it logs to {log}" in r.stderr
    assert re.search(r"^\[UCMNFSSTORE\] \[I\] Task\(\d+,D2S,1,4096\) finished, elapsed \d+\.\d+s$", r.stderr, re.M), (
        r.stderr
    )
    time.sleep(1.0)  # the engine logs on (the script's client goes away)
    assert engine_pid(endpoint) == pid, "the engine died with its starter's pipe"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == log and os.readlink(f"/proc/{pid}/fd/2") == log
    with open(log) as f:
        assert "listening on" in f.read()
    stop_engine(endpoint)
    # With tee: the pipeline ends with the script, the engine lives on.
    out = tmp_path / "tee.out"
    t0 = time.monotonic()
    r = subprocess.run(
        ["sh", "-c", f'"{py}" "{script}" "{cfg}" | tee "{out}" >/dev/null'], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and time.monotonic() - t0 < 60
    assert engine_pid(endpoint) == int(out.read_text().split()[0])


# ---- the runtime directory (issue 19, item 3) ------------------------------------------------


@pytest.fixture
def private_tmp(monkeypatch):
    """TMPDIR of this test alone (the runtime directory lives under it)."""
    d = f"/tmp/ucmt-{secrets.token_hex(3)}"
    os.mkdir(d, 0o755)
    monkeypatch.setenv("TMPDIR", d)
    monkeypatch.setattr(tempfile, "tempdir", None)
    yield d
    try:
        cfg_eps = [p for p in os.listdir(d)]
        for parent in cfg_eps:
            for digest in os.listdir(os.path.join(d, parent)):
                stop_engine(f"ipc://{os.path.join(d, parent, digest, 'engine.sock')}")
    except OSError:
        pass
    subprocess.run(["rm", "-rf", d], check=False)


def default_config(tmp_path, storage):
    return load_config(write_config(tmp_path / "rt.yaml", storage, clientTimeoutMs=3000))


def decoy(tmp_path, name):
    p = tmp_path / name
    p.write_text("decoy\n")
    return p


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_runtime_dirs_are_created_0700(private_tmp, tmp_path, storage):
    cfg = default_config(tmp_path, storage)
    ensure_engine(cfg)
    rdir = runtime_dir(str(storage))
    assert rdir.startswith(private_tmp)
    assert mode(os.path.dirname(rdir)) == 0o700 and mode(rdir) == 0o700


def test_an_existing_parent_keeps_its_mode(private_tmp, tmp_path, storage):
    parent = os.path.dirname(runtime_dir(str(storage)))
    os.mkdir(parent, 0o750)
    os.chmod(parent, 0o750)
    ensure_engine(default_config(tmp_path, storage))
    assert mode(parent) == 0o750


def test_a_planted_lock_link_is_refused_and_never_followed(private_tmp, tmp_path, storage):
    rdir = runtime_dir(str(storage))
    os.makedirs(rdir, 0o700)
    target = decoy(tmp_path, "victim")
    os.symlink(target, os.path.join(rdir, "launch.lock"))
    with pytest.raises(RuntimeDirError, match=r"launch\.lock is a symbolic link"):
        ensure_engine(default_config(tmp_path, storage))
    assert target.read_text() == "decoy\n"


def test_planted_record_and_log_links_are_replaced_not_followed(private_tmp, tmp_path, storage):
    rdir = runtime_dir(str(storage))
    os.makedirs(rdir, 0o700)
    victims = {
        name: decoy(tmp_path, f"victim-{name}") for name in ("engine.json", "engine.log", "config.yaml", "engine.pid")
    }
    for name, target in victims.items():
        os.symlink(target, os.path.join(rdir, name))
    ensure_engine(default_config(tmp_path, storage))
    assert all(t.read_text() == "decoy\n" for t in victims.values())
    for name in ("engine.json", "engine.log"):
        assert stat.S_ISREG(os.lstat(os.path.join(rdir, name)).st_mode)
        assert mode(os.path.join(rdir, name)) == 0o600


def test_a_runtime_dir_that_is_a_link_is_refused(private_tmp, tmp_path, storage):
    rdir = runtime_dir(str(storage))
    os.makedirs(os.path.dirname(rdir), 0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, rdir)
    with pytest.raises(
        RuntimeDirError,
        match=rf"runtime directory {rdir} is a symbolic link \(owner uid {os.getuid()}, mode 0777\); this process runs as uid {os.getuid()}",
    ):
        ensure_engine(default_config(tmp_path, storage))
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the directory to another user (uid 65534)")
def test_a_runtime_dir_of_another_user_is_refused(private_tmp, tmp_path, storage):
    rdir = runtime_dir(str(storage))
    os.makedirs(rdir, 0o700)
    os.chown(rdir, 65534, 65534)
    with pytest.raises(
        RuntimeDirError,
        match=r"owned by uid 65534, not by this user: another user made it .*\(owner uid 65534, mode 0700\).*"
        r"remove it \(as root or its owner.*set XDG_RUNTIME_DIR",
    ):
        ensure_engine(default_config(tmp_path, storage))
    assert os.listdir(rdir) == []


def test_a_parent_writable_by_others_is_refused_and_left_alone(private_tmp, tmp_path, storage):
    parent = os.path.dirname(runtime_dir(str(storage)))
    os.mkdir(parent)
    os.chmod(parent, 0o777)
    with pytest.raises(RuntimeDirError, match=r"writable by other users \(owner uid \d+, mode 0777\)"):
        ensure_engine(default_config(tmp_path, storage))
    assert mode(parent) == 0o777 and os.listdir(parent) == []
