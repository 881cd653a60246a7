"""Runs one vLLM (CPU) process through a script of steps and prints one JSON
line with the tokens each `generate` step produced. Steps, in order:

  {"generate": [[token ids], ...]}       greedy decoding of those prompts
  {"flip": {"dir": d, "match": "tp2r1"}} one payload byte of every stored
                                         block file under namespaces of `d`
                                         whose name contains `match` inverted
  {"reset": true}                        llm.reset_prefix_cache(reset_connector=True)
  {"stats": true}                        the engine's counters, once the dumps before have landed

Argument 2 is the store config, or "none" for vLLM without the connector
(the reference the tests compare with). The end-to-end tests use it for
sequences that must run in one vLLM process (a failed load, then the
requests that would meet what it left behind)."""

from __future__ import annotations

import json
import os
import sys

# Block files: a 4096-byte header, then the payload (native/src/block_file.h).
HEADER_BYTES = 4096


def block_files(root: str, match: str) -> list[str]:
    out = []
    for ns in sorted(os.listdir(root)):
        if ns.startswith(".") or match not in ns:
            continue
        for sub, _, files in os.walk(os.path.join(root, ns)):
            if os.path.basename(sub) == ".tmp":
                continue
            out.extend(os.path.join(sub, f) for f in files if len(f) == 64)
    return sorted(out)


def flip(root: str, match: str) -> int:
    files = block_files(root, match)
    for f in files:
        with open(f, "r+b") as fh:
            fh.seek(HEADER_BYTES + 11)
            b = fh.read(1)
            fh.seek(HEADER_BYTES + 11)
            fh.write(bytes([b[0] ^ 0xA5]))
    return len(files)


def settle(config: str) -> dict:
    """Waits (bounded) until the engine has no task in flight (the dumps of
    the steps before have landed); returns its counters."""
    import time

    from ucm.client import EngineClient
    from ucm.config import load_config

    c = EngineClient(load_config(config).endpoint, 5000)
    try:
        for _ in range(200):
            stats = c.raw("stats")
            if stats.get("tasksInFlight", 0) == 0:
                break
            time.sleep(0.05)
        return stats
    finally:
        c.close()


def main() -> None:
    model, config, block_size, steps_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    opts = json.loads(os.environ.get("UCM_DRIVER_OPTS", "{}"))
    max_tokens = opts.pop("max_tokens", 12)
    args = {"tensor_parallel_size": tp, **opts.pop("llm", {})}
    if config == "none":
        from vllm import LLM

        llm = LLM(
            model=model,
            dtype="float32",
            block_size=block_size,
            max_model_len=4096,
            enable_prefix_caching=False,
            enforce_eager=True,
            **args,
        )
    else:
        from vllm_llm import connector_llm

        llm = connector_llm(model, block_size, {"UCM_CONFIG_FILE": config, **opts.pop("extra", {})}, **args)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    results = []
    for step in json.loads(steps_json):
        if "generate" in step:
            outs = llm.generate([{"prompt_token_ids": p} for p in step["generate"]], params, use_tqdm=False)
            results.append([list(o.outputs[0].token_ids) for o in outs])
        elif "flip" in step:
            settle(config)
            results.append(flip(step["flip"]["dir"], step["flip"].get("match", "")))
        elif "stats" in step:
            results.append(settle(config))
        elif "reset" in step:
            results.append(bool(llm.reset_prefix_cache(reset_connector=True)))
        else:
            raise ValueError(f"unknown step {step}")
    if config != "none":
        settle(config)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
