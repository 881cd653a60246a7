"""Two-turn conversations through `vllm serve`, measured with vLLM's own
client (`vllm bench serve`): prefix caching off and on, without and with the
connector, at several concurrencies.

    .venv/bin/python bench/serve_bench.py [--conversations 8] [--prompt-words 600]
        [--answer-tokens 128] [--concurrency 1,4] [--model DIR] [--out bench/results]

For each server (4 of them, each a clean start) and each concurrency, with
conversations of its own (nothing carried over between cells):
  turn 1  `vllm bench serve --dataset-name custom` sends each conversation's
          first prompt and keeps the answers (--save-detailed);
  turn 2  sends first prompt + answer + a new question, as a chat client that
          re-sends its transcript does; this is the turn the store can serve
          (the prompt's blocks and, since issue 16.3, the answer's).
Needs pandas (vLLM's custom dataset reader: `.venv/bin/pip install pandas`).
Reports TTFT mean/median/p99, request and output-token throughput and failed
requests of each turn, and, with the connector, the blocks the engine loaded
during turn 2 (and in the JSON the requests it received then, by op). Writes <out>/serve_bench.md and <out>/serve_bench.json.

The model is the repository's tiny local one (random weights, a byte-level
BPE tokenizer trained on the spot): its answers are arbitrary tokens, and
text made of them does not always encode back to the same tokens, so part of
an answer's blocks can miss in turn 2 for reasons outside the store (the
token-exact case is tested in test/python/test_vllm_e2e.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32  # the smallest block size vLLM's CPU attention takes
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(seed: int, n: int) -> str:
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import make_tiny_model

    rng = random.Random(seed)
    lines = list(make_tiny_model.corpus(1234, 3000))
    out: list[str] = []
    while len(out) < n:
        out += rng.choice(lines).split()
    return " ".join(out[:n])


def serve(model: str, port: int, prefix_caching: bool, ucm_config: str | None, log: str) -> subprocess.Popen:
    cmd = [
        os.path.join(BIN, "vllm"),
        "serve",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "8192",
        "--enforce-eager",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    if ucm_config:
        cmd += [
            "--kv-transfer-config",
            json.dumps(
                {
                    "kv_connector": "UnifiedCacheConnectorV1",
                    "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"UCM_CONFIG_FILE": ucm_config},
                }
            ),
        ]
    env = dict(
        os.environ,
        PYTHONHASHSEED="0",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        # both modes on every core: vLLM CPU otherwise keeps one core for a connector
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        PYTHONPATH=os.path.join(ROOT, "python_shim"),
    )
    f = open(log, "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({p.returncode}); its log: {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not answer within 600 s; see {log}")


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench(model: str, port: int, dataset: str, n: int, conc: int, answer: int, result_dir: str, name: str) -> dict:
    cmd = [
        os.path.join(BIN, "vllm"),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--model",
        model,
        "--dataset-name",
        "custom",
        "--dataset-path",
        dataset,
        "--skip-chat-template",
        "--custom-output-len",
        str(answer),
        "--ignore-eos",
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(conc),
        "--percentile-metrics",
        "ttft,tpot,e2el",
        "--metric-percentiles",
        "50,99",
        "--seed",
        "0",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        result_dir,
        "--result-filename",
        name,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    with open(os.path.join(result_dir, name)) as f:
        return json.load(f)


def shuffled(items: list, seed: int = 0) -> list:
    """The order `vllm bench serve` sends a custom dataset in (random.seed(--seed), then random.shuffle)."""
    out = list(items)
    random.seed(seed)
    random.shuffle(out)
    return out


def engine_stats(ucm_config: str | None) -> dict:
    """The engine's blocks loaded and requests by op so far ({} without the connector)."""
    if not ucm_config:
        return {}
    sys.path.insert(0, os.path.join(ROOT, "python_shim"))
    from ucm.client import EngineClient
    from ucm.config import load_config

    c = EngineClient(load_config(ucm_config).endpoint, 3000)
    try:
        st = c.raw("stats")
        return {"loaded": int(st.get("blocksLoaded", 0)), "requests": dict(st.get("requests") or {})}
    finally:
        c.close()


def since(after: dict, before: dict) -> tuple[int | None, dict | None]:
    """Blocks loaded and requests by op (nonzero) between two engine_stats."""
    if not after:
        return None, None
    ops = {op: n - before["requests"].get(op, 0) for op, n in after["requests"].items()}
    return after["loaded"] - before["loaded"], {op: n for op, n in ops.items() if n}


def row(
    mode: str, conc: int, turn: int, r: dict, loaded: int | None, r1: dict | None = None, requests: dict | None = None
) -> dict:
    extra = {}
    if r1 is not None:  # what turn 2 could load at most: turn 1's prompt blocks, and with its answer
        extra = {
            "turn1_prompt_blocks": sum(n // BLOCK for n in r1["input_lens"]),
            "turn1_prompt_answer_blocks": sum(
                (n + o - 1) // BLOCK for n, o in zip(r1["input_lens"], r1["output_lens"])
            ),
        }
    return {
        **extra,
        "mode": mode,
        "concurrency": conc,
        "turn": turn,
        "completed": r["completed"],
        "failed": r.get("failed", 0),
        "ttft_mean_ms": r["mean_ttft_ms"],
        "ttft_median_ms": r["median_ttft_ms"],
        "ttft_p99_ms": r["p99_ttft_ms"],
        "req_per_s": r["request_throughput"],
        "out_tok_per_s": r["output_throughput"],
        "input_tokens": r["total_input_tokens"],
        "blocks_loaded": loaded,
        # what the connector asked of the engine in the turn (vLLM's processes together)
        "engine_requests": requests,
    }


def ucm_config(work: str, tag: str, cache: bool = False, base: str | None = None) -> str:
    """The connector's config: the seed's UcmNfsStore (no Cache stage), or with `cache` UCM's
    UcmPipelineStore "Cache|Posix" (a 2 GiB Cache stage, write-behind); its store under `base` (else `work`)."""
    store = os.path.join(base or work, f"store-{tag}")
    os.makedirs(store, mode=0o700)
    cfg = os.path.join(work, f"ucm-{tag}.yaml")
    cc = {"storage_backends": store, "transferStreamNumber": 8, "endpoint": f"ipc://{work}/e-{tag}.sock"}
    if cache:
        cc.update(store_pipeline="Cache|Posix", cache_buffer_capacity_gb=2)
    with open(cfg, "w") as f:
        json.dump(
            {
                "ucm_connectors": [
                    {"ucm_connector_name": "UcmPipelineStore" if cache else "UcmNfsStore", "ucm_connector_config": cc}
                ]
            },
            f,
        )
    return cfg


def engine_pid(cfg: str) -> int:
    from ucm.client import EngineClient
    from ucm.config import load_config

    c = EngineClient(load_config(cfg).endpoint, 3000)
    try:
        return int(c.raw("health")["pid"])
    finally:
        c.close()


def stop_engine(cfg: str) -> None:
    from ucm.client import EngineClient
    from ucm.config import load_config

    try:
        os.kill(int(EngineClient(load_config(cfg).endpoint, 3000).raw("health")["pid"]), signal.SIGTERM)
    except Exception:  # noqa: BLE001 - it exits by itself once idle anyway
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=600, help="words in a first prompt (about 2 tokens each)")
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument(
        "--modes",
        default="off,off+ucm,on,on+ucm",
        help="prefix caching off/on; +ucm: with the connector (no Cache stage); +cache: with the connector, "
        'UCM\'s "Cache|Posix" (a Cache stage, write-behind)',
    )
    ap.add_argument(
        "--slow-mbps",
        type=float,
        default=0,
        help="put each store on a slow directory: an ext4 on a loop device whose reads and writes by the engine "
        "are throttled to this many MB/s (needs root; test/python/slow_disk.py); 0: the work directory",
    )
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen2-bench"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    if not os.path.isdir(a.model):
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import make_tiny_model

        make_tiny_model.build(a.model)
    work = tempfile.mkdtemp(prefix="ucm-serve-bench-")
    rows = []
    ok = False
    try:
        for mode in a.modes.split(","):
            pc, use, cache = mode.startswith("on"), "+" in mode, mode.endswith("+cache")
            disk = None
            if use and a.slow_mbps > 0:
                sys.path.insert(0, os.path.join(ROOT, "test", "python"))
                sys.path.insert(0, os.path.join(ROOT, "python_shim"))
                from slow_disk import MISSING, SlowDisk

                if MISSING is not None:
                    print(f"serve_bench: --slow-mbps needs a throttled disk: {MISSING}", file=sys.stderr)
                    return 2
                disk = SlowDisk(mib=2048)
            cfg = ucm_config(work, mode.replace("+", "-"), cache, disk.mnt if disk else None) if use else None
            port = free_port()
            srv = serve(a.model, port, pc, cfg, os.path.join(work, f"serve-{mode}.log"))
            if disk and cfg:
                disk.admit(engine_pid(cfg))
                rate = int(a.slow_mbps * 1e6)
                disk.throttle(read_bps=rate, write_bps=rate)
            try:
                for conc in [int(x) for x in a.concurrency.split(",")]:
                    seed = 1000 * conc
                    firsts = [words(seed + i, a.prompt_words) + "." for i in range(a.conversations)]
                    d1 = os.path.join(work, f"t1-{mode}-{conc}.jsonl")
                    with open(d1, "w") as f:
                        f.writelines(json.dumps({"prompt": p}) + "\n" for p in firsts)
                    r1 = bench(
                        a.model, port, d1, a.conversations, conc, a.answer_tokens, work, f"r1-{mode}-{conc}.json"
                    )
                    rows.append(row(mode, conc, 1, r1, None))
                    answers = dict(zip(shuffled(list(range(a.conversations))), r1["generated_texts"]))
                    d2 = os.path.join(work, f"t2-{mode}-{conc}.jsonl")
                    with open(d2, "w") as f:
                        for i, p in enumerate(firsts):
                            f.write(
                                json.dumps({"prompt": p + answers.get(i, "") + " " + words(seed + 500 + i, 40) + "?"})
                                + "\n"
                            )
                    before = engine_stats(cfg)
                    r2 = bench(
                        a.model, port, d2, a.conversations, conc, a.answer_tokens, work, f"r2-{mode}-{conc}.json"
                    )
                    loaded, requests = since(engine_stats(cfg), before)
                    rows.append(row(mode, conc, 2, r2, loaded, r1, requests))
                    print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
            finally:
                stop(srv)
                if cfg:
                    stop_engine(cfg)
                if disk:
                    time.sleep(1)  # the engine's exit
                    disk.close()
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"serve_bench: logs kept in {work}", file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "serve_bench.json"), "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    names = {
        "off": "prefix caching off",
        "off+ucm": "prefix caching off + UCM",
        "on": "prefix caching on",
        "on+ucm": "prefix caching on + UCM",
        "off+cache": "prefix caching off + UCM Cache|Posix",
        "on+cache": "prefix caching on + UCM Cache|Posix",
    }
    lines = [
        "| server | concurrency | turn | TTFT mean ms | TTFT median ms | TTFT p99 ms | req/s | output tok/s | failed | "
        "blocks loaded (turn 1's prompt / with its answer) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {names.get(r['mode'], r['mode'])} | {r['concurrency']} | {r['turn']} | {r['ttft_mean_ms']:.0f} | "
            f"{r['ttft_median_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
            f"{r['failed']} | {'' if r['blocks_loaded'] is None else r['blocks_loaded']}"
            f"{'' if r['blocks_loaded'] is None or 'turn1_prompt_blocks' not in r else ' (' + str(r['turn1_prompt_blocks']) + ' / ' + str(r['turn1_prompt_answer_blocks']) + ')'} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(a.out, "serve_bench.md"), "w") as f:
        f.write(
            f"{a.conversations} conversations per cell, first prompt {a.prompt_words} words, answers "
            f"{a.answer_tokens} tokens (ignore_eos), block size {BLOCK}"
            f"{f'; stores on a directory throttled to {a.slow_mbps:g} MB/s' if a.slow_mbps else ''}.\n\n{table}\n"
        )
    print(table)
    return 0 if all(r["failed"] == 0 and r["completed"] == a.conversations for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
