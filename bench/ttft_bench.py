"""Time to first token on vLLM (CPU here): full compute against 80 % of each
prompt loaded from the store, the seed's table, plus our store hit against
vLLM's own disk connector (ExampleConnector) for the longest prompt.

    .venv/bin/python bench/ttft_bench.py [--lengths 2000,4000,8000] [--concurrency 1,2,4]
        [--model DIR] [--storage DIR] [--out bench/results]

Three vLLM processes, one per mode, so each is a clean start:
  full     plain vLLM, no connector, prefix caching off
  ucm      vLLM + UnifiedCacheConnectorV1: for every (length, concurrency), first
           store the 80 % prefixes (a priming pass), then send the full prompts
           (new 20 % tails): the measured pass loads 80 % from storage
  example  vLLM + ExampleConnector (its disk store), same prompt twice, and the
           same with ours, for the longest length at concurrency 1
TTFT is vLLM's own per-request first_token_latency, averaged over the
concurrent requests. Stored blocks are evicted from the page cache before each measured pass
(posix_fadvise DONTNEED on every stored file); ours are read with O_DIRECT anyway.
Writes <out>/ttft.md, <out>/ttft.json and docs/ttft.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def prompts(vocab: int, n: int, length: int, seed: int, prefix_frac: float = 0.0, prefix_seed: int | None = None):
    """n prompts of `length` tokens; the first prefix_frac of each comes from prefix_seed (shared with a priming pass)."""
    out = []
    for i in range(n):
        p_len = int(length * prefix_frac)
        rp = random.Random((prefix_seed if prefix_seed is not None else seed) * 1000 + i)
        rt = random.Random(seed * 1000 + i + 7919)
        out.append(
            [rp.randrange(16, vocab) for _ in range(p_len)] + [rt.randrange(16, vocab) for _ in range(length - p_len)]
        )
    return out


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = None
    if args.mode == "ucm":
        ktc = KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"UCM_CONFIG_FILE": args.config},
        )
    elif args.mode == "example":
        ktc = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": args.example_dir},
        )
    lengths = [int(x) for x in args.lengths.split(",")]
    conc = [int(x) for x in args.concurrency.split(",")]
    # One prefill step per prompt (no chunking) in every mode: ExampleConnector
    # cannot store a prompt whose prefill is chunked.
    llm = LLM(
        model=args.model,
        block_size=128,
        max_model_len=max(lengths) + 256,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(lengths) + 256,
        enforce_eager=True,
        disable_log_stats=False,
        kv_transfer_config=ktc,
    )
    vocab = llm.get_tokenizer().vocab_size
    sp = SamplingParams(temperature=0, max_tokens=1)

    def ttft(ps) -> float:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return sum(o.metrics.first_token_latency for o in outs) / len(outs)

    def settle():
        if args.mode == "ucm":
            from ucm.client import EngineClient
            from ucm.config import load_config

            c = EngineClient(load_config(args.config).endpoint, 2000)
            for _ in range(600):
                if c.raw("stats").get("tasksInFlight", 0) == 0:
                    break
                time.sleep(0.05)
            c.close()
        # Evict the stored blocks (both connectors' files) from the page cache,
        # and nothing else: dropping all caches would also evict vLLM's and
        # torch's code pages and charge their reload to the next measurement.
        os.sync()
        roots = [os.path.dirname(args.config), args.example_dir]
        for root in roots:
            for d, _, files in os.walk(root):
                for f in files:
                    try:
                        fd = os.open(os.path.join(d, f), os.O_RDONLY)
                    except OSError:
                        continue
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)

    ttft(prompts(vocab, 1, 300, seed=999))  # warm-up
    results = []
    if args.mode in ("full", "ucm"):
        for L in lengths:
            for C in conc:
                seed = L * 10 + C
                if args.mode == "full":
                    t = ttft(prompts(vocab, C, L, seed=seed))
                else:
                    # prime 80 %
                    ttft(prompts(vocab, C, int(L * 0.8) + 1, seed=seed + 500000, prefix_frac=1.0, prefix_seed=seed))
                    settle()
                    t = ttft(prompts(vocab, C, L, seed=seed + 1, prefix_frac=0.8, prefix_seed=seed))
                results.append({"mode": args.mode, "length": L, "concurrency": C, "ttft": t})
                print(json.dumps(results[-1]), flush=True)
    if args.mode in ("example", "ucm"):
        L = max(lengths)
        misses, hits = [], []
        for rep in range(3):  # median of three different prompts: single runs are noisy here
            p = prompts(vocab, 1, L, seed=4242 + rep)
            misses.append(ttft(p))
            settle()
            hits.append(ttft(p))
        miss, hit = sorted(misses)[1], sorted(hits)[1]
        results.append(
            {
                "mode": args.mode,
                "length": L,
                "concurrency": 1,
                "same_prompt_miss": miss,
                "same_prompt_hit": hit,
                "all_misses": misses,
                "all_hits": hits,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    with open(args.result, "w") as f:
        json.dump(results, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2000,4000,8000")
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--model", default=os.path.join(ROOT, "examples", "models", "tiny-qwen2"))
    ap.add_argument("--storage", default=os.path.join(ROOT, ".test-tmp", "bench-store"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--mode")
    ap.add_argument("--config")
    ap.add_argument("--example-dir")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.mode:
        worker(args)
        return
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    if not os.path.exists(os.path.join(args.model, "config.json")):
        import make_tiny_model

        make_tiny_model.build(args.model)
    import shutil

    shutil.rmtree(args.storage, ignore_errors=True)
    os.makedirs(os.path.join(args.storage, "ucm"))
    os.makedirs(os.path.join(args.storage, "example"))
    os.makedirs(args.out, exist_ok=True)
    cfg = os.path.join(args.storage, "ucm.yaml")
    with open(cfg, "w") as f:
        f.write(
            f'ucm_connector_name: "UcmNfsStore"\nucm_connector_config:\n  storage_backends: "{args.storage}/ucm"\n  transferStreamNumber: 32\n'
        )
    env = {**os.environ, "PYTHONHASHSEED": "123456", "UCM_ENGINE_LOG": os.path.join(args.storage, "engine.log")}
    allres = []
    for mode in ("full", "ucm", "example"):
        res = os.path.join(args.storage, f"{mode}.json")
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--model",
            args.model,
            "--config",
            cfg,
            "--example-dir",
            os.path.join(args.storage, "example"),
            "--result",
            res,
            "--lengths",
            args.lengths,
            "--concurrency",
            args.concurrency,
        ]
        print("running", mode, flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL)
        allres += json.load(open(res))
    # Stop the engine this run started.
    from ucm.client import EngineClient
    from ucm.config import load_config

    c = EngineClient(load_config(cfg).endpoint, 2000)
    try:
        os.kill(c.raw("health")["pid"], 15)
    except Exception:  # noqa: BLE001
        pass
    c.close()
    report(allres, args)


def report(res: list[dict], args: argparse.Namespace) -> None:
    import platform

    full = {(r["length"], r["concurrency"]): r["ttft"] for r in res if r["mode"] == "full" and "ttft" in r}
    ucm = {(r["length"], r["concurrency"]): r["ttft"] for r in res if r["mode"] == "ucm" and "ttft" in r}
    lines = [
        f"TTFT, vLLM {__import__('vllm').__version__} CPU backend, {os.cpu_count()} CPUs, model {os.path.basename(args.model)}, block size 128, prefix caching off; "
        f"store on {args.storage} (stored files evicted from the page cache before each measured pass; our loads use O_DIRECT). Command: `.venv/bin/python bench/ttft_bench.py --lengths {args.lengths} --concurrency {args.concurrency}`",
        "",
        "| **Input length** | **Concurrent** | **Full Compute(s)** | **Disk80%(s)** | **Speedup** |",
        "| ---------------: | -------------: | ------------------: | -------------: | :---------- |",
    ]
    for (L, C), f in sorted(full.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        d = ucm.get((L, C))
        if d:
            lines.append(f"| {L:,} | {C} | {f:.4f} | {d:.4f} | **{(f / d - 1) * 100:+.1f} %** |".replace(",", " "))
    ex = next((r for r in res if r["mode"] == "example" and "same_prompt_hit" in r), None)
    us = next((r for r in res if r["mode"] == "ucm" and "same_prompt_hit" in r), None)
    if ex and us:
        lines += [
            "",
            f"Same {ex['length']}-token prompt twice, concurrency 1 (second = hit), median of 3 prompts "
            f"(ours: hits {', '.join(f'{x:.3f}' for x in us['all_hits'])}; ExampleConnector: hits {', '.join(f'{x:.3f}' for x in ex['all_hits'])}):",
            "",
            "| connector | miss TTFT (s) | hit TTFT (s) |",
            "| --- | ---: | ---: |",
            f"| UnifiedCacheConnectorV1 (this project) | {us['same_prompt_miss']:.4f} | {us['same_prompt_hit']:.4f} |",
            f"| vLLM ExampleConnector (its disk store) | {ex['same_prompt_miss']:.4f} | {ex['same_prompt_hit']:.4f} |",
            "",
            f"ExampleConnector's hit TTFT / ours: {ex['same_prompt_hit'] / us['same_prompt_hit']:.2f}",
        ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    with open(os.path.join(args.out, "ttft.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "ttft.json"), "w") as f:
        json.dump({"platform": platform.platform(), "results": res}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        keys = sorted(full, key=lambda k: (k[1], k[0]))
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [full[k] for k in keys], 0.4, label="Full compute")
        ax.bar([x + 0.2 for x in xs], [ucm.get(k, 0) for k in keys], 0.4, label="Disk80% (UCM NFS Store)")
        ax.set_xticks(list(xs), [f"{L}\nx{C}" for L, C in keys])
        ax.set_xlabel("input length x concurrency")
        ax.set_ylabel("time to first token (s)")
        ax.set_title("TTFT on vLLM CPU: full compute vs 80 % of the prompt from storage")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        fig.savefig(os.path.join(ROOT, "docs", "ttft.png"), dpi=110)
        print("chart: docs/ttft.png")
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")


if __name__ == "__main__":
    main()
