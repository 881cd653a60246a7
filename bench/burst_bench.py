"""A burst of requests through `vllm serve`, without and with the connector,
measured with vLLM's own client (issue 30: lookups must not lengthen a step).

    .venv/bin/python bench/burst_bench.py [--prompts 256] [--prefixes 8] [--prefix-words 400]
        [--suffix-words 40] [--output-tokens 16] [--rounds 2] [--modes on,on+ucm,off,off+ucm]
        [--model DIR] [--out bench/results]

Every request is sent at once (`vllm bench serve`, request rate inf,
`--max-concurrency` = `--prompts`). Each prompt is one of `--prefixes`
shared prefixes followed by words of its own: the prefix is what a store (or
vLLM's prefix cache) can serve, the rest is new, so the connector looks up
every request's blocks and finds the prefix's. Before the burst, a warm-up
pass sends each prefix alone (concurrency 1): the store then holds the
prefixes (with the connector), vLLM's prefix cache too (prefix caching on),
and every server has served requests before the one that counts.

Modes: "on"/"off" is vLLM's prefix caching, "+ucm" the connector. The modes
take turns, `--rounds` times (A, B, A, B, ...), each server started cleanly
with a fresh store, alone on the machine. Reported per mode: the median over
rounds of TTFT median/p99, TPOT median/p99, requests/s, failed requests, and
(with the connector) blocks loaded during the burst. Writes
<out>/burst_bench.md and <out>/burst_bench.json. Needs pandas (vLLM's custom
dataset reader: `.venv/bin/pip install pandas`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))

from serve_bench import bench, engine_loaded, free_port, serve, stop, stop_engine, ucm_config, words  # noqa: E402

METRICS = (
    ("median_ttft_ms", "TTFT median ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT median ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
    ("request_throughput", "req/s"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--prefix-words", type=int, default=400, help="words in a shared prefix (about 2 tokens each)")
    ap.add_argument("--suffix-words", type=int, default=40, help="words of a prompt's own after its prefix")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="on,on+ucm,off,off+ucm", help="prefix caching on/off, +ucm: with the connector")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen2-bench"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    if not os.path.isdir(a.model):
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import make_tiny_model

        make_tiny_model.build(a.model)
    work = tempfile.mkdtemp(prefix="ucm-burst-bench-")
    prefixes = [words(7000 + i, a.prefix_words) + "." for i in range(a.prefixes)]
    warm = os.path.join(work, "warm.jsonl")
    with open(warm, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prefixes)
    burst = os.path.join(work, "burst.jsonl")
    with open(burst, "w") as f:
        for i in range(a.prompts):
            f.write(json.dumps({"prompt": prefixes[i % a.prefixes] + " " + words(9000 + i, a.suffix_words)}) + "\n")
    cells: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    ok = False
    try:
        for rnd in range(a.rounds):
            for mode in cells:
                pc, use = mode.startswith("on"), mode.endswith("+ucm")
                tag = f"{mode.replace('+', '-')}-{rnd}"
                cfg = ucm_config(work, tag) if use else None
                port = free_port()
                srv = serve(a.model, port, pc, cfg, os.path.join(work, f"serve-{tag}.log"))
                try:
                    bench(a.model, port, warm, a.prefixes, 1, a.output_tokens, work, f"warm-{tag}.json")
                    before = engine_loaded(cfg)
                    r = bench(a.model, port, burst, a.prompts, a.prompts, a.output_tokens, work, f"burst-{tag}.json")
                    cell = {k: r[k] for k, _ in METRICS}
                    cell.update(
                        completed=r["completed"],
                        failed=r.get("failed", 0),
                        blocks_loaded=engine_loaded(cfg) - before if cfg else None,
                    )
                    cells[mode].append(cell)
                    print(json.dumps({"mode": mode, "round": rnd, **cell}), flush=True)
                finally:
                    stop(srv)
                    if cfg:
                        stop_engine(cfg)
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"burst_bench: logs kept in {work}", file=sys.stderr)
    names = {
        "off": "prefix caching off",
        "off+ucm": "prefix caching off + UCM",
        "on": "prefix caching on",
        "on+ucm": "prefix caching on + UCM",
    }
    lines = [
        "| server | " + " | ".join(h for _, h in METRICS) + " | failed | blocks loaded in the burst |",
        "| --- |" + " ---: |" * (len(METRICS) + 2),
    ]
    for mode, rs in cells.items():
        if not rs:
            continue
        med = [statistics.median(r[k] for r in rs) for k, _ in METRICS]
        loaded = "" if rs[0]["blocks_loaded"] is None else str(int(statistics.median(r["blocks_loaded"] for r in rs)))
        lines.append(
            f"| {names.get(mode, mode)} | "
            + " | ".join(f"{v:.2f}" if k == "request_throughput" else f"{v:.1f}" for (k, _), v in zip(METRICS, med))
            + f" | {sum(r['failed'] for r in rs)} | {loaded} |"
        )
    table = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "burst_bench.json"), "w") as f:
        json.dump({"args": vars(a), "cells": cells}, f, indent=1)
    with open(os.path.join(a.out, "burst_bench.md"), "w") as f:
        f.write(
            f"{a.prompts} prompts sent at once (request rate inf, concurrency {a.prompts}), each one of "
            f"{a.prefixes} prefixes of {a.prefix_words} words plus {a.suffix_words} words of its own, "
            f"{a.output_tokens} output tokens (ignore_eos); medians over {a.rounds} rounds, modes alternating, "
            f"each server started cleanly.\n\n{table}\n"
        )
    print(table)
    return 0 if all(r["failed"] == 0 for rs in cells.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
