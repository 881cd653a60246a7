"""The shim names the same runtime directory as the engine: the table of
cases is shared with test/config.test.ts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import pytest

from ucm.config import default_endpoint, runtime_dir

TABLE = json.load(open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "runtime_dir_cases.json")))


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["storage_backends"] for c in TABLE["cases"]])
def test_runtime_dir_matches_the_engine(case, monkeypatch):
    monkeypatch.chdir(TABLE["cwd"])
    digest = hashlib.sha256(case["absolute"].encode()).hexdigest()[:12]
    expected = os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}", digest)
    assert runtime_dir(case["storage_backends"]) == expected
    assert default_endpoint(case["storage_backends"]) == f"ipc://{expected}/engine.sock"
