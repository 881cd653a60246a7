"""The storage directory hangs under `vllm serve`, and comes back (issue 26, item 3).

    .venv/bin/python bench/hang_bench.py [--prompts 6] [--prompt-words 600]
        [--before-s 20] [--hang-s 30] [--after-s 40] [--out bench/results]

Needs root (a loop device, the cgroup v1 blkio controller, dropping the page
cache): the storage directory is an ext4 file system on a loop device
(test/python/slow_disk.py), and "hung" means the engine's reads and writes
of that device throttled to 1 byte/s through its blkio cgroup, the page
cache dropped first, so every block read or write waits in the kernel, as
on an NFS mount whose server stopped answering (`stat` of cached entries
still answers, as an NFS client's attribute cache does).

One `vllm serve` (the repository's tiny model, prefix caching off, so every
hit is the store's) with the connector; a client of its own sends one
streamed request at a time, each a prompt from a small pool (each prompt's
first send computes it and stores its blocks; later ones are hits), and
times each request's first token. Phases: `before` (store serving),
`hang` (the throttle on), `after` (lifted). The engine's settings make a
sick directory cost little: loadTimeoutMs 2000, the store-health breaker
(healthFailureThreshold 2 of healthWindowSize 8, a probe every 2 s).

Reports per phase TTFT median / p99 / max and failed requests; the full
compute level (the pool's first sends) and the store level (`before`); how
long after the hang began five requests in a row were within 1.5x of full
compute, and after the lift within 1.5x of the store level; when
the engine said the breaker opened and closed. Writes <out>/hang_bench.md
and <out>/hang_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python_shim"))
sys.path.insert(0, os.path.join(ROOT, "test", "python"))

from page_cache import drop_caches  # noqa: E402
from serve_bench import free_port, serve, stop, words  # noqa: E402

HUNG_BPS = 1  # bytes per second: a 4 KiB read takes over an hour


def first_token_s(port: int, model: str, prompt: str, timeout_s: float = 120.0) -> float:
    """Seconds from sending a streamed completion to its first token; raises when it fails."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "stream": True, "ignore_eos": True})
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        first = None
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None and first is None:
                    first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError("no token came")
        return first


def engine_stats(cfg: str) -> dict:
    from ucm.client import EngineClient
    from ucm.config import load_config

    c = EngineClient(load_config(cfg).endpoint, 2000)
    try:
        return c.raw("stats")
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-words", type=int, default=600)
    ap.add_argument("--before-s", type=float, default=20)
    ap.add_argument("--hang-s", type=float, default=30)
    ap.add_argument("--after-s", type=float, default=40)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen2-bench"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()

    from slow_disk import MISSING, SlowDisk

    if MISSING is not None:
        print(f"hang_bench: needs a throttled disk: {MISSING}", file=sys.stderr)
        return 2
    if not os.path.isdir(a.model):
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import make_tiny_model

        make_tiny_model.build(a.model)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ucm-hang-")
    os.chmod(work, 0o700)
    disk = SlowDisk(mib=1024)
    server = None
    engine = 0
    rows: list[dict] = []
    try:
        store = os.path.join(disk.mnt, "kv")
        os.makedirs(store, mode=0o700)
        cfg = os.path.join(work, "ucm.yaml")
        with open(cfg, "w") as f:
            json.dump(
                {
                    "ucm_connectors": [
                        {
                            "ucm_connector_name": "UcmNfsStore",
                            "ucm_connector_config": {
                                "storage_backends": store,
                                "transferStreamNumber": 8,
                                "endpoint": f"ipc://{work}/e.sock",
                                "loadTimeoutMs": 2000,
                                "healthCheckIntervalS": 2,
                                "healthCheckTimeoutS": 1,
                            },
                        }
                    ]
                },
                f,
            )
        port = free_port()
        server = serve(a.model, port, False, cfg, os.path.join(work, "vllm.log"))
        from ucm.client import EngineClient
        from ucm.config import load_config

        engine = int(EngineClient(load_config(cfg).endpoint, 2000).raw("health")["pid"])  # the connector's
        disk.admit(engine)
        prompts = [words(100 + i, a.prompt_words) for i in range(a.prompts)]
        t_start = time.monotonic()

        def send(phase: str, i: int) -> None:
            t = time.monotonic() - t_start
            try:
                ttft, ok = first_token_s(port, a.model, prompts[i % len(prompts)]), True
            except Exception as e:  # noqa: BLE001 - a failed request is what this counts
                ttft, ok = float("nan"), False
                print(f"request failed: {e}", file=sys.stderr)
            h = engine_stats(cfg).get("health", {})
            rows.append({"phase": phase, "t": round(t, 3), "ttft_ms": ttft * 1000, "ok": ok, "open": h.get("open", 0)})

        for i in range(len(prompts)):  # each prompt computed once, its blocks stored
            send("first", i)
        time.sleep(2)  # the last dumps land
        i = 0
        phases = (("before", a.before_s), ("hang", a.hang_s), ("after", a.after_s))
        marks = {}
        for phase, secs in phases:
            if phase == "hang":
                drop_caches()
                disk.throttle(HUNG_BPS, HUNG_BPS)
            elif phase == "after":
                disk.throttle(0, 0)
            marks[phase] = time.monotonic() - t_start
            end = time.monotonic() + secs
            while time.monotonic() < end:
                send(phase, i)
                i += 1
        loaded = int(engine_stats(cfg).get("blocksLoaded", 0))
    finally:
        if server is not None:
            stop(server)
        disk.throttle(0, 0)
        if engine:
            try:
                os.kill(engine, 15)  # it would wait 600 s for clients otherwise, its directory gone
            except ProcessLookupError:
                pass
        time.sleep(1)
        disk.close()
        # vLLM's log (the connector's lines among them) stays beside the results.
        subprocess.run(["cp", os.path.join(work, "vllm.log"), os.path.join(a.out, "hang_bench_vllm.log")], check=False)
        subprocess.run(["rm", "-rf", work], check=False)

    def ttfts(phase: str) -> list[float]:
        return [r["ttft_ms"] for r in rows if r["phase"] == phase and r["ok"]]

    full = statistics.median(ttfts("first"))
    stored = statistics.median(ttfts("before"))

    def settled(phase: str, level: float, run: int = 5) -> float | None:
        """Seconds from the phase's start to the first of `run` requests in a row within 1.5x of `level`."""
        rs = [r for r in rows if r["phase"] == phase]
        for k in range(len(rs) - run + 1):
            if all(r["ok"] and r["ttft_ms"] <= 1.5 * level for r in rs[k : k + run]):
                return rs[k]["t"] - marks[phase]
        return None

    opened = next((r["t"] - marks["hang"] for r in rows if r["phase"] == "hang" and r["open"]), None)
    closed = next((r["t"] - marks["after"] for r in rows if r["phase"] == "after" and not r["open"]), None)
    summary = {
        "full_compute_median_ms": full,
        "store_median_ms": stored,
        "hang_to_full_compute_level_s": settled("hang", full),
        "lift_to_store_level_s": settled("after", stored),
        "breaker_open_seen_after_s": opened,
        "breaker_closed_seen_after_lift_s": closed,
        "blocks_loaded": loaded,
        "failed": sum(not r["ok"] for r in rows),
    }
    lines = [
        f"{a.prompts} prompts of {a.prompt_words} words, one request at a time, 4 tokens each; prefix caching off;"
        " loadTimeoutMs 2000, breaker 2 of 8, probe every 2 s.",
        "",
        "| phase | requests | failed | TTFT median ms | TTFT p99 ms | TTFT max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("first", "before", "hang", "after"):
        t = sorted(ttfts(phase))
        n = sum(r["phase"] == phase for r in rows)
        p99 = t[min(len(t) - 1, int(0.99 * len(t)))] if t else float("nan")
        lines.append(
            f"| {phase} | {n} | {n - len(t)} | {statistics.median(t):.0f} | {p99:.0f} | {max(t):.0f} |"
            if t
            else f"| {phase} | {n} | {n} | - | - | - |"
        )
    lines += ["", "```", json.dumps(summary, indent=1), "```", ""]
    lines += ["Every request (seconds since the first, phase, TTFT ms, breaker open when it ended):", ""]
    lines += [
        "    " + " ".join(f"{r['t']:.1f}/{r['phase'][0]}/{r['ttft_ms']:.0f}{'*' if r['open'] else ''}" for r in rows)
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(a.out, "hang_bench.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "hang_bench.json"), "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
