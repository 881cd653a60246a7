"""The wheel test runs apart from test/python (its own pytest run, a fresh
environment for the wheel) but shares that folder's helper modules: put it on
sys.path before test_wheel.py imports them."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from timeouts import limit_every_test  # noqa: E402


def pytest_collection_modifyitems(items):
    # The first test also builds the wheel and installs it with vLLM's stack (a few minutes).
    limit_every_test(items, 900)
