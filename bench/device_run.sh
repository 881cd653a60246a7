#!/usr/bin/env bash
# On the GPU machine (from the repository root, with .device/ carried there):
# unpacks the bundle made by bench/device_pack.sh and runs the GPU validation.
#   bash bench/device_run.sh [gpu_validate.py options]
#   bash bench/device_run.sh store [store_bench.py options]   (the public API with CPU tensors vs fio;
#                                  a static fio is carried in .device/fio when the machine has none)
#   bash bench/device_run.sh store-ab [store_bench.py options]   (the same, twice each, alternating the
#                                  engine with one worker a stream and the current one; AB_OUT=<dir> keeps JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UCM_DEVICE_DIR:-/tmp/ucm-device}
rm -rf "$U" && mkdir -p "$U"
tar -C "$U" -xJf .device/bundle.tar.xz
PY=${PYTHON:-python3}
$PY -m pip install --quiet --no-index --find-links "$U/wheels" --target "$U/py" pyzmq msgpack pyyaml
export PATH="$U/node/bin:$PATH" PYTHONPATH="$U/py${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
if [ "${1:-}" = store-ab ]; then
  shift
  FIO=$(command -v fio || echo "$PWD/.device/fio")
  export UCM_HOME="$U/app" UCM_NODE="$U/node/bin/node"
  for r in 1 2; do
    for v in one_worker two_workers; do
      if [ $v = one_worker ]; then export UCM_NATIVE_ADDON="$U/app/native/build/Release/ucm_native_one_worker.node"; else unset UCM_NATIVE_ADDON; fi
      echo "== $v a stream, round $r"
      $PY bench/store_bench.py --fio "$FIO" --repeat 1 ${AB_OUT:+--json "$AB_OUT/store_${v}_$r.json"} "$@"
    done
  done
  exit 0
fi
if [ "${1:-}" = store ]; then
  shift
  FIO=$(command -v fio || echo "$PWD/.device/fio")
  export UCM_HOME="$U/app" UCM_NODE="$U/node/bin/node"
  exec $PY bench/store_bench.py --fio "$FIO" "$@"
fi
exec $PY bench/gpu_validate.py --node "$U/node/bin/node" --engine "$U/app/dist/core/cli.js" "$@"
