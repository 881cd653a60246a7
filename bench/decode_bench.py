"""Decoding with and without the connector, nothing to load (issue 26).

    python bench/decode_bench.py [--processes 2] [--rounds 3] [--prompts 4] [--tokens 384] [--model DIR]

vLLM's offline `LLM` on vLLM CPU with the repository's tiny local model,
prefix caching on, each prompt new (random words), `--tokens` output tokens
each (ignore_eos, greedy): the connector has nothing to load and saves the
prompts' and answers' blocks. One process per mode, the modes alternating
(`--processes` of each), `--rounds` timed generate calls per process after a
warm-up. Reports output tokens/s per round and the medians per mode, the
engine process's CPU seconds per round (with the connector), and any
`UCM: ... failed` line the connector logged (a save that failed is a block
not stored: never wrong bytes, but a miss later). Run it alone on the
machine: on 2 cores another job moves the figures more than the connector.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCK = 32  # the smallest block size vLLM's CPU attention takes


def engine_cpu_s(pids: list[str]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def child(a: argparse.Namespace) -> None:
    """One process: one mode, a warm-up, then the timed rounds (a JSON line each)."""
    from vllm import LLM, SamplingParams

    kw = {}
    sock = None
    if a.mode == "ucm":
        from vllm.config import KVTransferConfig

        d = tempfile.mkdtemp(prefix="ucm-decode-")
        os.chmod(d, 0o700)
        store = os.path.join(d, "store")
        os.makedirs(store, mode=0o700)
        cfg = os.path.join(d, "ucm.yaml")
        sock = os.path.join(d, "e.sock")
        with open(cfg, "w") as f:
            f.write(
                "ucm_connector_name: UcmNfsStore\nucm_connector_config:\n"
                f"  storage_backends: {store}\n  endpoint: ipc://{sock}\n"
            )
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"UCM_CONFIG_FILE": cfg},
        )
    llm = LLM(
        model=a.model,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=4096,
        enforce_eager=True,
        enable_prefix_caching=True,
        **kw,
    )
    sp = SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=0)
    rng = random.Random(time.time_ns())

    def prompts(n: int) -> list[str]:
        return [" ".join(f"w{rng.randint(0, 10**6)}" for _ in range(60)) for _ in range(n)]

    llm.generate(prompts(2), sp, use_tqdm=False)  # warm-up
    sys.path.insert(0, HERE)
    from engine_proc import engine_pid, stop_engine

    pids = [str(engine_pid(sock))] if sock else []
    for r in range(a.rounds):
        ps = prompts(a.prompts)
        c0 = engine_cpu_s(pids)
        t0 = time.perf_counter()
        out = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in out)
        row = {"mode": a.mode, "round": r, "s": dt, "tok_per_s": n / dt}
        if a.mode == "ucm":
            row["engine_cpu_s"] = engine_cpu_s(pids) - c0
        print("ROW " + json.dumps(row), flush=True)
    print("ROUNDS-END", flush=True)  # what the connector logs after this (the engine stopped below) is not counted
    if pids:
        stop_engine(int(pids[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="processes per mode, alternating")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen2-bench"))
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--mode", choices=["off", "ucm"], help=argparse.SUPPRESS)  # a child process
    a = ap.parse_args()
    if a.mode:
        child(a)
        return 0
    if not os.path.isdir(a.model):
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import make_tiny_model

        make_tiny_model.build(a.model)
    env = dict(
        os.environ,
        PYTHONHASHSEED="0",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",  # both modes on every core
        PYTHONPATH=os.path.join(ROOT, "python_shim"),
    )
    rows, failures = [], []
    for _ in range(a.processes):
        for mode in ("off", "ucm"):
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode]
            cmd += [
                "--rounds",
                str(a.rounds),
                "--prompts",
                str(a.prompts),
                "--tokens",
                str(a.tokens),
                "--model",
                a.model,
            ]
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
            lines = p.stdout.splitlines()
            got = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
            timed = lines[: lines.index("ROUNDS-END")] if "ROUNDS-END" in lines else lines
            failures += [line for line in timed if line.startswith("UCM:") and "failed" in line]
            if p.returncode != 0 or len(got) != a.rounds:
                print(p.stdout[-6000:], file=sys.stderr)
                print(f"decode_bench: the {mode} process failed (exit {p.returncode})", file=sys.stderr)
                return 1
            for r in got:
                print(json.dumps(r), flush=True)
            rows += got
    med = {m: statistics.median(r["tok_per_s"] for r in rows if r["mode"] == m) for m in ("off", "ucm")}
    cpu = [r["engine_cpu_s"] for r in rows if "engine_cpu_s" in r]
    print()
    print(
        f"output tokens/s, median of {a.processes * a.rounds} rounds: without the connector {med['off']:.1f}, "
        f"with it {med['ucm']:.1f} ({100 * (med['ucm'] / med['off'] - 1):+.1f} %); "
        f"engine CPU per round {min(cpu):.2f}-{max(cpu):.2f} s; connector failures logged: {len(failures)}"
    )
    for line in failures[:5]:
        print("  " + line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "median_tok_per_s": med, "failures": failures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
