"""Runs vLLM (CPU) with the UCM connector on given prompts and prints one JSON
line: the generated tokens and the engine's counters. Used by the end-to-end
tests, each run in a fresh process like a real restart."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, config, block_size, prompts_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm_llm import connector_llm

    from ucm.client import EngineClient
    from ucm.config import load_config

    # Extra LLM arguments and sampling length for one test (e.g. a KV cache
    # small enough that vLLM must preempt requests).
    opts = json.loads(os.environ.get("UCM_DRIVER_OPTS", "{}"))
    max_tokens = opts.pop("max_tokens", 12)
    ignore_eos = opts.pop("ignore_eos", False)
    extra = {"UCM_CONFIG_FILE": config, **opts.pop("extra", {})}  # kv_connector_extra_config
    llm = connector_llm(model, block_size, extra, **{"tensor_parallel_size": tp, "disable_log_stats": False, **opts})
    prompts = [{"prompt_token_ids": p} for p in json.loads(prompts_json)]
    t0 = time.monotonic()
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos), use_tqdm=False
    )
    generate_s = time.monotonic() - t0  # the requests alone, without vLLM's start
    preemptions = sum(int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    llm.llm_engine.do_log_stats()  # logs the connector's "KV Transfer metrics"
    stats = {}
    c = EngineClient(load_config(config).endpoint, 5000)
    tries = 3  # a busy 2-core machine may keep the engine from answering for a while
    for _ in range(100):  # let the saves of this run land
        try:
            stats = c.raw("stats")
        except Exception:  # noqa: BLE001 - engine down is a valid scenario here
            stats = {}
            tries -= 1
            if tries == 0:
                break
            continue
        if stats.get("tasksInFlight", 0) == 0:
            break
        time.sleep(0.05)
    c.close()
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "stats": stats,
                "preemptions": preemptions,
                "generate_s": generate_s,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
