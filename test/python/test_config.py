"""The shim names the same runtime directory as the engine (the table of
cases is shared with test/config.test.ts), takes its client options'
defaults from the engine's config module, and reads UCM's config forms and
key names as the engine does (the cases shared with test/ucm_config.test.ts,
the tables of core/ucm_keys.ts)."""

from __future__ import annotations

import hashlib
import json
import logging
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


# ---- UCM's current configuration and key names (issue 27) -------------------------------

UCM_CASES = json.load(open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "ucm_config_cases.json")))


def _with_dir(v, d):
    if isinstance(v, str):
        return v.replace("$DIR", d)
    if isinstance(v, list):
        return [_with_dir(x, d) for x in v]
    if isinstance(v, dict):
        return {k: _with_dir(x, d) for k, x in v.items()}
    return v


@pytest.fixture
def ucm_dir(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    return str(tmp_path)


@pytest.mark.parametrize("case", UCM_CASES["cases"], ids=[c["name"] for c in UCM_CASES["cases"]])
def test_ucm_config_reads_as_the_engine_reads_it(case, ucm_dir, monkeypatch):
    """The cases test/ucm_config.test.ts runs through the engine's parser: the
    same options from UCM's keys, the same "no effect" lines, the same errors
    word for word."""
    from ucm import ucm_keys
    from ucm.config import ConfigError, load_config

    monkeypatch.setattr(ucm_keys, "_said", set())
    doc = _with_dir(case["doc"], ucm_dir)
    if "error" in case:
        with pytest.raises(ConfigError) as e:
            load_config(doc)
        assert str(e.value) == "config: " + case["error"]
        return
    cfg = load_config(doc)
    assert cfg.connector_config == _with_dir(case["ours"], ucm_dir)
    assert [n[: n.index(": ")] for n in cfg.notes] == case["notes"]
    assert cfg.store_pipeline == case.get("storePipeline")
    assert cfg.cache_buffer_bytes == case.get("cacheBufferBytes")
    assert cfg.storage_backends == case["ours"]["storage_backends"].replace("$DIR", ucm_dir)


def _engine_module(expr, *args):
    out = subprocess.run(
        ["node", "-e", f"const m=require(process.argv[1]); console.log(JSON.stringify({expr}))", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_ucm_key_tables_are_the_engines():
    """ucm/ucm_keys.py holds the engine's tables (core/ucm_keys.ts), key for key and word for word."""
    from ucm import ucm_keys

    engine = _engine_module(
        "{top: m.UCM_TOP_KEYS, connector: m.UCM_CONNECTOR_KEYS, v010: m.UCM_V010_KEYS, "
        "names: m.CONNECTOR_NAMES, pipelines: m.STORE_PIPELINES, cache: m.CACHE_STAGE}",
        os.path.join(ROOT, "dist", "core", "ucm_keys.js"),
    )
    assert engine["top"] == ucm_keys.UCM_TOP_KEYS
    assert engine["connector"] == ucm_keys.UCM_CONNECTOR_KEYS
    assert engine["v010"] == ucm_keys.UCM_V010_KEYS
    assert tuple(engine["names"]) == ucm_keys.CONNECTOR_NAMES
    assert tuple(engine["pipelines"]) == ucm_keys.STORE_PIPELINES
    assert engine["cache"] == ucm_keys.CACHE_STAGE


def test_option_keys_are_the_engines():
    """ucm.config.OPTION_KEYS, the keys that are ours (passed as they are), is the engine's table."""
    from ucm.config import OPTION_KEYS

    engine = _engine_module("Object.keys(m.OPTIONS)", os.path.join(ROOT, "dist", "core", "options.js"))
    assert OPTION_KEYS == frozenset(engine) | {"storage_backends"}


UCM_YAML = """\
ucm_connectors:
  - ucm_connector_name: "UcmPipelineStore"
    ucm_connector_config:
      store_pipeline: "Cache|Posix"
      storage_backends: "{a}:{b}"   # several mount points, separated by ':'
      io_direct: true
      cache_buffer_capacity_gb: 32
      posix_capacity_gb: 1024
      timeout_ms: 30000
enable_event_sync: true
use_layerwise: true
"""


def test_ucm_current_yaml_loads_and_says_each_key_without_effect_once(ucm_dir, tmp_path, caplog, monkeypatch):
    """UCM's YAML as its docs write it today loads from a file; the lines
    about keys with no effect here are said once per process, however many
    store objects and connector halves read the config."""
    from ucm import ucm_keys
    from ucm.config import config_from_extra, load_config

    monkeypatch.setattr(ucm_keys, "_said", set())
    caplog.set_level(logging.INFO, logger="ucm")
    path = tmp_path / "ucm_config.yaml"
    path.write_text(UCM_YAML.format(a=f"{ucm_dir}/a", b=f"{ucm_dir}/b"))
    for _ in range(3):
        cfg = load_config(str(path))
    extra = config_from_extra({"UCM_CONFIG_FILE": str(path), "use_layerwise": True, "ucm_load_async": True})
    assert extra.connector_config == cfg.connector_config
    assert cfg.connector_config == {
        "storage_backends": f"{ucm_dir}/a:{ucm_dir}/b",
        "odirect": True,
        "capacity": 1024 << 30,
        "loadTimeoutMs": 30000,
    }
    assert (cfg.load_timeout_ms, cfg.store_pipeline, cfg.cache_buffer_bytes) == (30000, "Cache|Posix", 32 << 30)
    said = [r.getMessage() for r in caplog.records if "UCM: config: " in r.getMessage()]
    assert said == [
        "UCM: config: " + n
        for n in cfg.notes
        + [
            "kv_connector_extra_config.use_layerwise: true accepted, no effect here: "
            + ucm_keys.UCM_TOP_KEYS["use_layerwise"]["why"]
        ]
    ]
    # enable_event_sync, use_layerwise (in the file and inline), the Cache stage
    assert len(said) == 4 and len(set(said)) == 4


def test_ucm_keys_in_kv_connector_extra_config(ucm_dir, monkeypatch):
    """Inline, UCM's top-level keys sit beside the config in
    kv_connector_extra_config: checked and said as in a file; a misspelt one
    stops vLLM with its name."""
    from ucm import ucm_keys
    from ucm.config import ConfigError, config_from_extra

    monkeypatch.setattr(ucm_keys, "_said", set())
    inline = {
        "ucm_connectors": [
            {
                "ucm_connector_name": "UcmPipelineStore",
                "ucm_connector_config": {
                    "store_pipeline": "Posix",
                    "storage_backends": f"{ucm_dir}/a",
                    "io_direct": False,
                },
            }
        ],
        "use_layerwise": True,
        "enable_event_sync": False,
        "ucm_weights_version": "2",  # the connector's own key: not the config's
    }
    cfg = config_from_extra(inline)
    assert cfg.connector_config == {"storage_backends": f"{ucm_dir}/a", "odirect": False}
    assert [n.split(":")[0] for n in cfg.notes] == ["use_layerwise", "enable_event_sync"]
    assert cfg.raw["use_layerwise"] is True  # the engine reads it too, from the file the launcher writes
    with pytest.raises(ConfigError, match=r"kv_connector_extra_config.use_layerwise must be true or false, got \"on\""):
        config_from_extra({"UCM_CONFIG_FILE": "/nonexistent.yaml", "use_layerwise": "on"})
