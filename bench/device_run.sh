#!/usr/bin/env bash
# On the GPU machine (from the repository root, with .device/ carried there):
# unpacks the bundle made by bench/device_pack.sh and runs the GPU validation.
#   bash bench/device_run.sh [gpu_validate.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UCM_DEVICE_DIR:-/tmp/ucm-device}
rm -rf "$U" && mkdir -p "$U"
tar -C "$U" -xJf .device/bundle.tar.xz
PY=${PYTHON:-python3}
$PY -m pip install --quiet --no-index --find-links "$U/wheels" --target "$U/py" pyzmq msgpack pyyaml
export PATH="$U/node/bin:$PATH" PYTHONPATH="$U/py${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec $PY bench/gpu_validate.py --node "$U/node/bin/node" --engine "$U/app/dist/core/cli.js" "$@"
