"""The error a bad config raises, and how a value is written in its message
(core/config_error.ts writes values the same way, so that the shim and the
engine name a bad key and its value in the same words)."""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A config problem, naming the key and the value."""


def show(v: Any) -> str:
    """A config value as a message shows it: JSON, as the engine's JSON.stringify writes it."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # JavaScript writes 2.0 as 2
    try:
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(v)
