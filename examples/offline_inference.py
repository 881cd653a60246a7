"""Offline inference with the UCM NFS Store, as the seed describes it:

    cd examples/
    export PYTHONHASHSEED=123456
    python offline_inference.py

Runs the same long-prefix prompts twice with vLLM's prefix caching off, so
the second run can only reuse KV blocks through the store. (Within the first
run, later prompts may already load the shared prefix that earlier ones
stored: the block counts show it.) Prints the time to
first token of both runs, the number of blocks loaded from storage, and
checks that greedy generation gave identical tokens.

On this CPU-only machine it uses a small Qwen2-architecture model with random
weights, built locally on first use (models/tiny-qwen2; nothing is
downloaded). On a GPU machine pass a real model: --model /path/to/model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # make_tiny_model


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default=os.environ.get("MODEL_PATH"),
        help="model directory (default: a tiny local model, built if missing)",
    )
    ap.add_argument(
        "--config", default=os.path.join(HERE, "ucm_config_example.yaml"), help="UCM config file (seed format)"
    )
    ap.add_argument(
        "--prompt-tokens", type=int, default=2048, help="tokens per prompt (the shared prefix is most of it)"
    )
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument(
        "--dtype", default=None, help="model dtype (default: float32 for the tiny CPU model, else the model's own)"
    )
    return ap.parse_args()


def make_prompts(vocab_size: int, n: int, length: int) -> list[list[int]]:
    """Deterministic token ids: a shared prefix and a short distinct tail per prompt."""
    import random

    rng = random.Random(1234)
    low = 16  # keep clear of special tokens
    prefix = [rng.randrange(low, vocab_size) for _ in range(length - 32)]
    return [prefix + [rng.randrange(low, vocab_size) for _ in range(32)] for _ in range(n)]


def engine_stats(config_path: str) -> dict:
    from ucm.client import EngineClient, EngineUnavailable
    from ucm.config import load_config

    c = EngineClient(load_config(config_path).endpoint, 2000)
    try:
        return c.raw("stats")
    except EngineUnavailable:
        return {}
    finally:
        c.close()


def wait_idle(config_path: str, timeout_s: float = 60.0) -> None:
    """Waits until the engine has no task in flight (the first run's saves are on storage)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine_stats(config_path).get("tasksInFlight", 0) == 0:
            return
        time.sleep(0.05)


def main() -> int:
    args = parse_args()
    if not os.environ.get("PYTHONHASHSEED"):
        print(
            "warning: PYTHONHASHSEED is not set; blocks stored now will not be found after a restart", file=sys.stderr
        )
    from ucm.config import load_config

    cfg = load_config(args.config)
    for d in cfg.storage_backends.split(":"):
        os.makedirs(d, exist_ok=True)
    model = args.model
    if not model:
        import make_tiny_model

        model = os.path.join(HERE, "models", "tiny-qwen2")
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"building a tiny local model in {model} ...")
            make_tiny_model.build(model)
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = KVTransferConfig(
        kv_connector="UnifiedCacheConnectorV1",
        kv_connector_module_path="ucm.integration.vllm.uc_connector",
        kv_role="kv_both",
        kv_connector_extra_config={"UCM_CONFIG_FILE": os.path.abspath(args.config)},
    )
    # The tiny model has random weights, so its logits are close to ties; in
    # bf16 a different prefill schedule (whole prompt vs. tail on loaded KV)
    # can flip a greedy choice. float32 keeps the identical-output check about
    # the store, not about rounding.
    dtype = args.dtype or ("float32" if not args.model else "auto")
    llm = LLM(
        model=model,
        dtype=dtype,
        block_size=args.block_size,
        max_model_len=max(4096, args.prompt_tokens + args.max_tokens + 64),
        enable_prefix_caching=False,  # so the second run can only hit the store
        enforce_eager=on_cpu,
        disable_log_stats=False,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_transfer_config=ktc,
    )
    vocab = llm.get_tokenizer().vocab_size
    prompts = [{"prompt_token_ids": p} for p in make_prompts(vocab, args.prompts, args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    # Warm-up on an unrelated prompt of the same length, so the first measured
    # run does not pay for first-request costs (kernel setup, first touch of
    # KV cache pages). Its blocks are stored under other keys.
    import random

    rng = random.Random(99)
    warm = [rng.randrange(16, vocab) for _ in range(args.prompt_tokens)]
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=1), use_tqdm=False)
    results = []
    for run in ("first run", "second run"):
        before = engine_stats(args.config).get("blocksLoaded", 0)
        hits_before = engine_stats(args.config).get("tier", {}).get("hits", 0)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttft = [
            o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) and o.metrics.first_token_latency
        ]
        wait_idle(args.config)
        loaded = engine_stats(args.config).get("blocksLoaded", 0) - before
        from_tier = engine_stats(args.config).get("tier", {}).get("hits", 0) - hits_before
        results.append((run, outs, wall, sum(ttft) / len(ttft) if ttft else None, loaded, from_tier))

    print()
    print(f"model {model}, {args.prompts} prompt(s) of {args.prompt_tokens} tokens, block size {args.block_size}")
    for run, _, wall, ttft, loaded, from_tier in results:
        t = f"{ttft:.4f}s" if ttft is not None else "n/a"
        tier = f" ({from_tier} from the Cache stage)" if cfg.store_pipeline == "Cache|Posix" else ""
        print(
            f"{run:30s} time to first token {t}  (whole generate {wall:.3f}s)  blocks loaded from storage: {loaded}{tier}"
        )
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(results[0][1], results[1][1]))
    shared = (args.prompt_tokens - 32) // args.block_size  # full blocks of the prefix every prompt shares
    if results[0][4] > shared * (args.prompts - 1):
        # More than later prompts can reuse from earlier ones: blocks persist across restarts, an earlier run left them.
        dirs = cfg.storage_backends.replace(":", " ")
        print(
            f"the first run found {results[0][4]} blocks already stored by an earlier run (the store persists across "
            f"restarts); for a cold first run and the speedup, remove {dirs} once this demo's engine has exited "
            "(10 minutes after its last client) and run again"
        )
    elif results[0][3] and results[1][3]:
        reused = (
            f"; in the first run later prompts loaded {results[0][4]} blocks of the shared prefix"
            if results[0][4]
            else ""
        )
        print(f"speedup of time to first token (cold store -> warm): {results[0][3] / results[1][3]:.2f}x{reused}")
    print(f"generated tokens identical: {same}")
    print(f"first output: {list(results[1][1][0].outputs[0].token_ids)}")
    if not same:
        return 1
    if results[1][4] == 0:
        print("error: the second run loaded no block from the store", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
