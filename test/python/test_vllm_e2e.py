"""End to end on the real vLLM package (CPU backend): offline runs in fresh
processes, a corrupted store, a dead engine, and `vllm serve` with the seed's
--kv-transfer-config. Small model, small prompts, so it fits in CI."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import private_sock, stop_engine, write_config
from ucm.client import EngineClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PY = sys.executable
BLOCK = 32
# A vLLM run takes 30 to 50 s here; a test makes up to three.
pytestmark = pytest.mark.timeout(900, method="signal")


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny local model of conftest.py (built once per session)."""
    return tiny_model


def env(engine_log=None):
    e = dict(os.environ)
    e.update(PYTHONHASHSEED="123456", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=HERE)
    if engine_log:
        # The engine outlives the driver; it must not hold the driver's output pipes.
        e["UCM_ENGINE_LOG"] = str(engine_log)
    return e


def drive(model, config, prompts, engine_log, timeout=400, tp=1, opts=None, driver="vllm_driver.py"):
    """One vLLM process; returns its result and what it and the engine logged.
    `opts`: extra LLM arguments, plus max_tokens and ignore_eos for sampling.
    `driver`: vllm_steps_driver.py runs a script of steps (`prompts` is then
    the steps) in one process."""
    start = os.path.getsize(engine_log) if os.path.exists(engine_log) else 0
    e = env(engine_log)
    if opts:
        e["UCM_DRIVER_OPTS"] = json.dumps(opts)
    if tp > 1:
        # one core per rank
        e["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    p = subprocess.run(
        [PY, os.path.join(HERE, driver), model, config, str(BLOCK), json.dumps(prompts), str(tp)],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
    )
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, f"driver failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    engine_out = ""
    if os.path.exists(engine_log):  # (a run without the store starts no engine)
        with open(engine_log) as f:
            f.seek(start)
            engine_out = f.read()
    return json.loads(line[7:]), p.stdout + p.stderr + engine_out


def prompts(n=2, length=7 * BLOCK + 5, seed=7):
    rng = random.Random(seed)
    prefix = [rng.randrange(16, 2500) for _ in range(length - 8)]
    return [prefix + [rng.randrange(16, 2500) for _ in range(8)] for _ in range(n)]


def test_offline_runs_hit_the_store_and_match(model, tmp_path, storage):
    sock = private_sock("e2e")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    try:
        ps = prompts()
        first, log1 = drive(model, cfg, ps, elog)
        assert first["stats"]["blocksDumped"] >= 7
        assert "PYTHONHASHSEED" not in log1 or "is not set" not in log1
        # A new vLLM process (a restart): same tokens, blocks come from the store.
        second, log2 = drive(model, cfg, ps, elog)
        assert second["tokens"] == first["tokens"]
        assert second["stats"]["blocksLoaded"] - first["stats"]["blocksLoaded"] >= 2 * 7
        assert "S2D" in log2
        # The connector's own figures, through vLLM's connector stats.
        m = re.search(r"KV Transfer metrics: (.*)", log2)
        assert m, log2[-3000:]
        kv = dict(kv.split("=") for kv in m.group(1).split(", "))
        assert int(kv["hit_blocks"]) >= 2 * 7 and int(kv["loaded_blocks"]) >= 2 * 7, kv
        assert float(kv["hit_rate"]) > 0.5 and int(kv["load_failed_blocks"]) == 0, kv
        # Damage every stored block: loads fail, vLLM recomputes, same tokens.
        ns_dirs = [d for d in os.listdir(storage) if not d.startswith(".")]
        files = [
            os.path.join(root, f)
            for d in ns_dirs
            for root, _, fs in os.walk(os.path.join(storage, d))
            if os.path.basename(root) != ".tmp"
            for f in fs
            if len(f) == 64
        ]
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.seek(4096 + 7)
                b = fh.read(1)
                fh.seek(4096 + 7)
                fh.write(bytes([b[0] ^ 0x5A]))
        third, log3 = drive(model, cfg, ps, elog)
        assert third["tokens"] == first["tokens"]
        assert third["stats"]["blocksCorrupt"] >= 1
        assert "failed verification" in log3
    finally:
        stop_engine(f"ipc://{sock}")


def test_next_turn_finds_the_answer_in_the_store(model, tmp_path, storage):
    """Multi-turn: the blocks of generated tokens are saved (in batches while
    the request decodes, the rest when it finishes), so the next turn, which
    sends the answer back as part of its prompt, loads them; its tokens are
    those of a run without the store."""
    sock = private_sock("turns")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    sock0 = private_sock("turns0")
    (tmp_path / "empty-store").mkdir(mode=0o700)
    cfg0 = write_config(tmp_path / "empty.yaml", str(tmp_path / "empty-store"), endpoint=f"ipc://{sock0}")
    try:
        # 7 full blocks and 5 tokens each, nothing in common (so the run without a store loads nothing either)
        ps = prompts(n=1, seed=7) + prompts(n=1, seed=9)
        answer = 100
        first, log1 = drive(
            model,
            cfg,
            ps,
            elog,
            opts={"max_tokens": answer, "ignore_eos": True, "extra": {"ucm_decode_save_blocks": 2}},
        )
        # The answer fills blocks 7, 8 and 9 (the last token sampled has no KV): 7 and 8 are saved together
        # while decoding (two waiting), 9 when the request finishes.
        assert re.search(r"Task\(\d+,D2S,2,", log1), log1[-3000:]
        turn2 = [p + toks + [17 + i for i in range(8)] for p, toks in zip(ps, first["tokens"])]
        full = (len(turn2[0]) - 1) // BLOCK
        assert full == 10
        second, log2 = drive(model, cfg, turn2, elog)
        assert second["stats"]["blocksLoaded"] - first["stats"]["blocksLoaded"] >= 2 * full, log2[-3000:]
        alone, _ = drive(model, cfg0, turn2, tmp_path / "engine0.log")
        assert alone["stats"]["blocksLoaded"] == 0
        assert second["tokens"] == alone["tokens"]
    finally:
        stop_engine(f"ipc://{sock}")
        stop_engine(f"ipc://{sock0}")


def test_dead_engine_means_misses_not_stalls(model, tmp_path, storage):
    """An endpoint nobody serves and an engine that cannot start: vLLM still answers, within the timeouts."""
    sock = private_sock("dead")
    cfg = write_config(tmp_path / "dead.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=500)
    e = env(tmp_path / "engine.log")
    e["UCM_ENGINE_CMD"] = "false"  # the engine cannot start
    ps = prompts(1)
    t0 = time.monotonic()
    p = subprocess.run(
        [PY, os.path.join(HERE, "vllm_driver.py"), model, cfg, str(BLOCK), json.dumps(ps)],
        capture_output=True,
        text=True,
        env=e,
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert "serving without the store: engine exited at startup" in p.stdout + p.stderr
    out = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert len(out["tokens"][0]) == 12
    print(f"dead engine: generate {out['generate_s']:.1f} s, whole run {time.monotonic() - t0:.1f} s")
    # The requests (0.1 s here) never wait for a deadline of the store (loads 30 s, saves 10 s).
    assert out["generate_s"] < 10
    # The whole run (vLLM's start included) takes 30 to 50 s here; room for a loaded CI machine.
    assert time.monotonic() - t0 < 180


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_vllm_serve_with_the_seed_kv_transfer_config(model, tmp_path, storage):
    sock = private_sock("serve")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    port = free_port()
    ktc = json.dumps(
        {
            "kv_connector": "UnifiedCacheConnectorV1",
            "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"UCM_CONFIG_FILE": cfg},
        }
    )
    log = open(tmp_path / "serve.log", "w+")
    vllm_bin = os.path.join(os.path.dirname(PY), "vllm")
    proc = subprocess.Popen(
        [
            vllm_bin,
            "serve",
            model,
            "--block-size",
            "128",
            "--no-enable-prefix-caching",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "4096",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--kv-transfer-config",
            ktc,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, open(tmp_path / "serve.log").read()[-4000:]
                time.sleep(1)
        rng = random.Random(3)
        prompt = " ".join(rng.choice(["the", "kalo", "mishi", "and", "taru", "of", "shi", "po"]) for _ in range(400))
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 7, "temperature": 0}).encode()

        def complete():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]

        a = complete()
        # The first request's blocks are stored (dumped and committed) before the second asks for them.
        probe = EngineClient(f"ipc://{sock}", 5000)
        try:
            deadline = time.monotonic() + 60
            while True:
                st = probe.raw("stats")
                if st.get("blocksDumped", 0) > 0 and st.get("tasksInFlight", 0) == 0:
                    break
                assert time.monotonic() < deadline, f"the first request's blocks were not stored: {st}"
                time.sleep(0.1)
        finally:
            probe.close()
        b = complete()
        assert a == b
        # The vLLM processes print their Task lines on their own time.
        deadline = time.monotonic() + 30
        while "S2D" not in open(tmp_path / "serve.log").read() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = open(tmp_path / "serve.log").read()
        assert "Application startup complete" in text
        # The seed's Task lines, printed by the vLLM processes for their own
        # tasks; the engine logs to a file of its own (it holds none of
        # vLLM's stdio), and the process that started it says where, once.
        assert re.search(r"^\[UCMNFSSTORE\] \[I\] Task\(\d+,D2S,\d+,\d+\) finished, elapsed \d+\.\d+s$", text, re.M), (
            text[-3000:]
        )
        assert re.search(r"^\[UCMNFSSTORE\] \[I\] Task\(\d+,S2D,\d+,\d+\) finished, elapsed \d+\.\d+s$", text, re.M), (
            text[-3000:]
        )
        said = re.findall(r"\[ucm\] started the engine for \S+ \(pid \d+\); it logs to (\S+)", text)
        assert len(said) == 1, text[-3000:]
        engine_text = open(said[0]).read()
        assert "D2S" in engine_text and "S2D" in engine_text, engine_text[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_engine(f"ipc://{sock}")


def test_engine_killed_while_serving(model, tmp_path, storage):
    """Kill -9 the engine between requests: requests still complete (misses),
    within the timeouts; the engine is restarted and hits resume."""
    sock = private_sock("kill")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=1000)
    try:
        p = subprocess.run(
            [PY, os.path.join(HERE, "vllm_kill_driver.py"), model, cfg, str(BLOCK), json.dumps(prompts(1))],
            capture_output=True,
            text=True,
            env=env(tmp_path / "engine.log"),
            timeout=400,
        )
        rounds = {r["round"]: r for r in (json.loads(l[6:]) for l in p.stdout.splitlines() if l.startswith("ROUND "))}
        assert p.returncode == 0 and len(rounds) == 3, p.stderr[-4000:]
        assert rounds["killed"]["tokens"] == rounds["before"]["tokens"] == rounds["back"]["tokens"]
        assert rounds["killed"]["seconds"] < 30  # bounded by clientTimeoutMs per operation, not stuck
        assert rounds["back"]["loaded"] and rounds["back"]["loaded"] >= 7  # hits resume after the restart
    finally:
        stop_engine(f"ipc://{sock}")


def test_async_loading(model, tmp_path, storage):
    """loadAsync: the request waits outside the batch while its blocks load; same tokens, blocks loaded."""
    sock = private_sock("async")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}", loadAsync=True)
    elog = tmp_path / "engine.log"
    try:
        ps = prompts(2, seed=11)
        first, _ = drive(model, cfg, ps, elog)
        second, log2 = drive(model, cfg, ps, elog)
        assert second["tokens"] == first["tokens"]
        assert second["stats"]["blocksLoaded"] - first["stats"]["blocksLoaded"] >= 14
    finally:
        stop_engine(f"ipc://{sock}")


def test_tensor_parallel_two_ranks(model, tmp_path, storage):
    """TP=2 on the CPU backend: one engine, one namespace per rank, identical outputs, hits in both ranks."""
    sock = private_sock("tp2")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    try:
        ps = prompts(1, seed=21)
        first, _ = drive(model, cfg, ps, elog, tp=2)
        second, _ = drive(model, cfg, ps, elog, tp=2)
        assert second["tokens"] == first["tokens"]
        namespaces = sorted(d for d in os.listdir(storage) if not d.startswith("."))
        assert [n.split("-")[1] for n in namespaces] == ["tp2r0", "tp2r1"]
        assert second["stats"]["blocksLoaded"] - first["stats"]["blocksLoaded"] == 2 * 7  # 7 blocks in each rank
    finally:
        stop_engine(f"ipc://{sock}")


def test_preempted_requests_resume_with_store_hits(model, tmp_path, storage):
    """A KV cache of 16 blocks for 6 requests that each grow to 9: vLLM
    preempts and recomputes them, and each one resumed finds its own prompt
    blocks in the store. Before every step the workers settle the dumps of
    requests preempted since the last (handle_preemptions), and a resumed
    request gets a fresh load plan: the same tokens as with room for all."""
    sock = private_sock("preempt")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    rng = random.Random(5)
    ps = [[rng.randrange(16, 2500) for _ in range(4 * BLOCK + 5)] for _ in range(6)]
    sampling = {"max_model_len": 320, "max_tokens": 150, "ignore_eos": True}
    try:
        tight, _ = drive(model, cfg, ps, elog, opts={"num_gpu_blocks_override": 16, **sampling})
        assert tight["preemptions"] > 0
        assert tight["stats"]["blocksLoaded"] > 0  # resumed requests loaded their prefix
        assert tight["stats"]["blocksFailed"] == 0
    finally:
        stop_engine(f"ipc://{sock}")
    roomy_storage = tmp_path / "roomy"
    roomy_storage.mkdir()
    cfg2 = write_config(tmp_path / "roomy.yaml", roomy_storage, endpoint=f"ipc://{sock}")
    try:
        roomy, _ = drive(model, cfg2, ps, elog, opts=sampling)
        assert roomy["preemptions"] == 0
    finally:
        stop_engine(f"ipc://{sock}")
    assert tight["tokens"] == roomy["tokens"]
