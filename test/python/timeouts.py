"""A time limit on every test (pytest-timeout, installed by
python_shim/setup_venv.sh), so that one hung test fails on its own and the
run still ends with its report and test/run_all.sh's summary line. A test or
module that needs longer says so with its own @pytest.mark.timeout."""

from __future__ import annotations

import pytest
import pytest_timeout  # noqa: F401  (a missing plugin must fail the run, not disable the limit)


def limit_every_test(items, seconds: float) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds, method="signal"))
