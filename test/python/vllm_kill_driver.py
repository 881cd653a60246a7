"""vLLM (CPU) with the UCM connector; the engine is SIGKILLed between two
rounds of the same prompts. Prints one JSON line per round: tokens, seconds,
and blocks the engine loaded (None while it is down)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> None:
    model, config, block_size, prompts_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    from vllm import SamplingParams
    from vllm_llm import connector_llm

    from ucm.client import EngineClient, EngineUnavailable
    from ucm.config import load_config

    endpoint = load_config(config).endpoint

    def stats():
        c = EngineClient(endpoint, 1000)
        try:
            return c.raw("stats")
        except EngineUnavailable:
            return None
        finally:
            c.close()

    llm = connector_llm(model, block_size, {"UCM_CONFIG_FILE": config})
    prompts = [{"prompt_token_ids": p} for p in json.loads(prompts_json)]
    params = SamplingParams(temperature=0, max_tokens=8)
    for rnd in ("before", "killed", "back"):
        if rnd == "killed":
            os.kill(stats()["pid"], signal.SIGKILL)
            time.sleep(0.2)
        if rnd == "back":
            for _ in range(100):  # the connector restarts the engine in the background
                if stats() is not None:
                    break
                time.sleep(0.1)
            time.sleep(3)  # the connector's back-off after a failure is 2 s
        s0 = stats()
        t0 = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.monotonic() - t0
        time.sleep(0.5)
        s1 = stats()
        loaded = (s1["blocksLoaded"] - (s0 or {}).get("blocksLoaded", 0)) if s1 and s0 else None
        print(
            "ROUND "
            + json.dumps(
                {"round": rnd, "tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": dt, "loaded": loaded}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
