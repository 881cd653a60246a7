"""The shim names the same runtime directory as the engine (the table of
cases is shared with test/config.test.ts) and takes its client options'
defaults from the engine's config module."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile

import pytest
import yaml

from ucm.config import default_endpoint, runtime_dir

TABLE = json.load(open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "runtime_dir_cases.json")))


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["storage_backends"] for c in TABLE["cases"]])
def test_runtime_dir_matches_the_engine(case, monkeypatch):
    monkeypatch.chdir(TABLE["cwd"])
    digest = hashlib.sha256(case["absolute"].encode()).hexdigest()[:12]
    expected = os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}", digest)
    assert runtime_dir(case["storage_backends"]) == expected
    assert default_endpoint(case["storage_backends"]) == f"ipc://{expected}/engine.sock"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode,private", [(0o700, True), (0o755, False)])
def test_xdg_runtime_dir_is_preferred_when_private_and_the_engine_agrees(tmp_path, monkeypatch, mode, private):
    """$XDG_RUNTIME_DIR/ucm when XDG_RUNTIME_DIR is a directory of this user nobody else may enter (nobody can
    make the runtime directory there first), else /tmp/ucm-<uid>; the engine (core/config.ts) names the same."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    os.chmod(xdg, mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    digest = hashlib.sha256(b"/srv/kv").hexdigest()[:12]
    base = str(xdg / "ucm") if private else os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}")
    assert runtime_dir("/srv/kv") == os.path.join(base, digest)
    engine = subprocess.run(
        [
            "node",
            "-e",
            "console.log(require(process.argv[1]).defaultRuntimeDir('/srv/kv'))",
            os.path.join(ROOT, "dist", "core", "config.js"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert engine.stdout.strip() == runtime_dir("/srv/kv")


def test_client_option_defaults_are_the_engines():
    """ENGINE_DEFAULTS (used until the engine answers) repeats core/config.ts's table, nothing else."""
    from ucm.config import ENGINE_DEFAULTS

    out = subprocess.run(
        [
            "node",
            "-e",
            "const {OPTIONS}=require(process.argv[1]); const o={};"
            "for (const k of JSON.parse(process.argv[2])) o[k]=OPTIONS[k].dflt; console.log(JSON.stringify(o))",
            os.path.join(ROOT, "dist", "core", "config.js"),
            json.dumps(sorted(ENGINE_DEFAULTS)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == ENGINE_DEFAULTS


def test_timeouts_a_config_leaves_out_come_from_the_running_engine(tmp_path):
    """An engine started by the operator with its own timeouts: a store whose config names none uses the engine's;
    one that names them keeps its own."""
    from ucm.store import NfsStore

    storage = tmp_path / "store"
    storage.mkdir()
    engine_cfg = tmp_path / "engine.yaml"
    with open(engine_cfg, "w") as f:
        yaml.safe_dump(
            {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_connector_config": {
                    "storage_backends": str(storage),
                    "clientTimeoutMs": 7000,
                    "loadTimeoutMs": 45000,
                },
            },
            f,
        )
    proc = subprocess.Popen(
        ["node", os.path.join(ROOT, "dist", "core", "cli.js"), "serve", "--config", str(engine_cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
        plain = NfsStore(
            {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(storage)}}
        )
        own = NfsStore(
            {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_connector_config": {"storage_backends": str(storage), "loadTimeoutMs": 20000},
            }
        )
        try:
            assert (plain.config.timeout_ms, plain.config.load_timeout_ms) == (5000, 30000)  # before the engine answers
            assert plain.lookup([b"k" * 16]) == [False]
            assert (plain.config.timeout_ms, plain.config.load_timeout_ms, plain.client.timeout_ms) == (
                7000,
                45000,
                7000,
            )
            assert own.lookup([b"k" * 16]) == [False]
            assert (own.config.timeout_ms, own.config.load_timeout_ms) == (7000, 20000)
        finally:
            plain.close()
            own.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_block_status_names_are_the_engines():
    """ucm.status.ALL is the addon's own list (the names docs/PROTOCOL.md gives, in the addon's order)."""
    from ucm import status

    out = subprocess.run(
        [
            "node",
            "-e",
            "console.log(JSON.stringify(require(process.argv[1]).constants.blockStatus))",
            os.path.join(ROOT, "dist", "core", "native.js"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert tuple(json.loads(out.stdout)) == status.ALL
