"""The per-test time limit of conftest.py (timeouts.py): a test that hangs
fails on its own, the next test still runs, and the run ends with its JUnit
report, which test/run_all.sh needs for its summary line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_hung_test_fails_and_the_run_goes_on(tmp_path):
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            from timeouts import limit_every_test


            def pytest_collection_modifyitems(items):
                limit_every_test(items, 2)
            """
        )
    )
    (tmp_path / "test_hang.py").write_text(
        textwrap.dedent(
            """
            import threading


            def test_hangs():
                threading.Event().wait()


            def test_after():
                pass
            """
        )
    )
    xml = tmp_path / "report.xml"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": HERE},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    suite = ET.parse(xml).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1"), r.stdout
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert "Timeout" in cases["test_hangs"].find("failure").get("message")
    assert cases["test_after"].find("failure") is None
