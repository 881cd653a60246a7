#!/usr/bin/env bash
# Format check and lint for the three languages of the project, one pair of
# tools each: Prettier + ESLint (TypeScript, JavaScript), Ruff format + Ruff
# check (Python), clang-format + clang-tidy (C++ in native/). Exits 0 only when
# every check is clean, so `npm run lint`, test/run_all.sh and CI can rely on
# the exit code; prints one line per check and the findings under it.
#
#   scripts/lint.sh            check (npm run lint)
#   scripts/lint.sh --format   apply the three formatters (npm run format)
#   add --all                  include the paths of scripts/lint-pending.txt
#
# The files are those git tracks or would track (new, not ignored), less the
# paths of scripts/lint-pending.txt: code whose owners fix their findings
# after a restructuring; the list is meant to shrink to nothing.
#
# Everything installs from the package registries: the Node tools are
# devDependencies; ruff, clang-format and clang-tidy come from
# requirements-lint.txt (pinned) into .venv, the project's Python environment
# (created here with Python 3.11 when it does not exist yet, as
# python_shim/setup_venv.sh would).
#
# clang-tidy reads the compile_commands.json of two configure-only cmake-js
# builds under .test-tmp/lint (nothing is compiled), so it parses each file
# with the flags and headers of the real addon: node-api-headers and
# node-addon-api from node_modules, the emulated CUDA runtime for
# cuda_backend.cc, and a build without CUDA for cuda_stub.cc. The .cu kernel
# needs nvcc and is only formatted.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mode=check
all=false
for a in "$@"; do
  case "$a" in
    --format) mode=format ;;
    --all) all=true ;;
    *) echo "usage: scripts/lint.sh [--format] [--all]" >&2; exit 2 ;;
  esac
done

# --- the Python-side tools, into .venv (once per requirements-lint.txt) -----
venv="$root/.venv"
stamp="$venv/.ucm-lint-$(sha256sum requirements-lint.txt | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    py="${PYTHON:-}"
    for c in python3.11 python3; do
      [ -n "$py" ] && break
      if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py="$c"; fi
    done
    [ -n "$py" ] || { echo "lint: Python 3.11 not found (set PYTHON=...)" >&2; exit 2; }
    "$py" -m venv "$venv" || exit 2
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-lint.txt || {
    echo "lint: could not install requirements-lint.txt into $venv" >&2
    exit 2
  }
  rm -f "$venv"/.ucm-lint-*
  touch "$stamp"
fi
bin="$venv/bin"

# --- which files ---------------------------------------------------------------
pending=()
$all || mapfile -t pending < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' scripts/lint-pending.txt)
skipped=0
is_pending() {
  local f=$1 p hit=1
  for p in "${pending[@]}"; do
    if [[ $p == '!'* ]]; then
      [[ $f == "${p#!}" ]] && return 1
    elif [[ $f == "$p"* ]]; then
      hit=0
    fi
  done
  return $hit
}
# Files matching the git pathspecs given, that exist now and are not pending.
files() {
  local f
  git ls-files --cached --others --exclude-standard -- "$@" | while read -r f; do
    [ -f "$f" ] || continue
    if is_pending "$f"; then echo "pending $f"; else echo "$f"; fi
  done
}
ts=() py=() cxx=()
while read -r f; do if [[ $f == "pending "* ]]; then skipped=$((skipped + 1)); else ts+=("$f"); fi; done < <(files '*.ts' '*.js')
while read -r f; do if [[ $f == "pending "* ]]; then skipped=$((skipped + 1)); else py+=("$f"); fi; done < <(files '*.py')
while read -r f; do if [[ $f == "pending "* ]]; then skipped=$((skipped + 1)); else cxx+=("$f"); fi; done < <(files 'native/src/*.cc' 'native/src/*.h' 'native/src/*.cu' 'native/cuda_emu/*.cc' 'native/cuda_emu/*.h')

if [ "$mode" = format ]; then
  rc=0
  [ ${#ts[@]} -eq 0 ] || npx prettier --log-level warn --write "${ts[@]}" || rc=1
  [ ${#py[@]} -eq 0 ] || "$bin/ruff" format --quiet "${py[@]}" || rc=1
  [ ${#cxx[@]} -eq 0 ] || "$bin/clang-format" -i "${cxx[@]}" || rc=1
  [ "$skipped" -eq 0 ] || echo "format: left $skipped pending files as they are (scripts/lint-pending.txt; --all formats them too)"
  exit $rc
fi

failed=()
# Runs one check, its output indented under a header; remembers failures.
check() {
  local name=$1
  shift
  echo "== lint: $name"
  if "$@" 2>&1 | sed 's/^/  /'; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    echo "  ok"
  else
    failed+=("$name")
  fi
}

# clang-tidy over the files of both configure-only builds, one job per core.
tidy() {
  local b out rc=0 h re=""
  for b in emu nocuda; do
    out="$root/.test-tmp/lint/$b"
    mkdir -p "$out"
    if ! env UCM_CUDA_EMU=$([ $b = emu ] && echo 1 || echo 0) UCM_WITH_CUDA=0 \
      npx cmake-js configure --directory native --out "$out" --CDCMAKE_EXPORT_COMPILE_COMMANDS=ON >"$out/configure.log" 2>&1; then
      tail -20 "$out/configure.log"
      return 1
    fi
  done
  # Findings in headers count only for headers that are checked themselves.
  for h in "${cxx[@]}"; do [[ $h == *.h ]] && re+="${re:+|}${h//./\\.}"; done
  # The emulated build compiles every file but cuda_stub.cc, which the build without CUDA compiles.
  {
    node -e 'for (const e of require(process.argv[1])) if (!e.file.endsWith("cuda_stub.cc")) console.log("emu", e.file)' \
      "$root/.test-tmp/lint/emu/compile_commands.json"
    node -e 'for (const e of require(process.argv[1])) if (e.file.endsWith("cuda_stub.cc")) console.log("nocuda", e.file)' \
      "$root/.test-tmp/lint/nocuda/compile_commands.json"
  } | while read -r b f; do
    f=${f#"$root/"}
    if printf '%s\n' "${cxx[@]}" | grep -qxF "$f"; then echo "$root/.test-tmp/lint/$b $f"; fi
  done | xargs -r -n2 -P "$(nproc)" sh -c '"$0" --quiet --header-filter="$1" -p "$2" "$3" 2>/dev/null' \
    "$bin/clang-tidy" "(^|/)(${re:-no header})\$" || rc=1
  return $rc
}

# Runs a tool over a file list, or says there is nothing to check.
over() {
  local n=$1
  shift
  if [ "$n" -eq 0 ]; then echo "no files"; else "$@"; fi
}
check "prettier" over ${#ts[@]} npx prettier --log-level warn --check "${ts[@]}"
check "eslint" over ${#ts[@]} npx eslint --max-warnings 0 --no-warn-ignored "${ts[@]}"
check "ruff format" over ${#py[@]} "$bin/ruff" format --check "${py[@]}"
check "ruff check" over ${#py[@]} "$bin/ruff" check --output-format concise "${py[@]}"
check "clang-format" over ${#cxx[@]} "$bin/clang-format" --dry-run --Werror "${cxx[@]}"
check "clang-tidy" tidy

[ "$skipped" -eq 0 ] || echo "lint: $skipped pending files not checked (scripts/lint-pending.txt; --all checks them)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: ${#failed[@]} of 6 checks failed: ${failed[*]}"
  exit 1
fi
echo "lint: all 6 checks clean"
