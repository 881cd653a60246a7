"""Engine settings: which ones one engine holds for every client, and how two
configs are compared.

One engine serves a storage directory for every process of the node. Its
settings (transfer threads, O_DIRECT, capacity, ...) are fixed when it
starts, so a second config naming the same directory with other values
would silently get the first one's. The launcher compares the two
(`differences`) before it hands out an engine: the same values, or an error
naming each setting and both values (or, for an idle engine it started, a
restart with the new ones).

The engine validates every value itself; this module only normalizes what
it must compare (sizes written as "4GiB" or as a number of bytes).
"""

from __future__ import annotations

import re
from typing import Any

#: Options only the shim reads (each client may use its own) and the
#: endpoint (the same by construction when two configs reach one engine).
CLIENT_ONLY = frozenset({"clientTimeoutMs", "loadTimeoutMs", "loadAsync", "endpoint", "engineUid"})

#: The engine's defaults (core/config.ts OPTIONS) for the settings whose
#: silent difference changes what the store does or how fast. A config that
#: leaves one of these out asks for its default. Other engine options (limits
#: and quotas) are compared only where both configs state them.
#: test/python/test_launcher.py checks these against the built engine.
DEFAULTS: dict[str, Any] = {
    "transferStreamNumber": 32,
    "odirect": True,
    "fsync": False,
    "maxBlockBytes": 1 << 30,
    "logLevel": "info",
    "uncommittedTimeoutS": 600,
    "lookupCacheTtlS": 60,
    "shutdownTimeoutS": 30,
    "clientCheckMs": 2000,
    "capacity": 0,
    "evictionGraceS": 10,
    "capacitySyncMs": 500,
    "capacityRescanS": 3600,
    "maxInflightBytes": 4 << 30,
    "maxQueueMs": 5000,
    "admitOnSecondSight": False,
    "metricsPort": 0,
    "metricsHost": "127.0.0.1",
    "hostCacheBytes": 0,
    "writeBehind": False,
    "pinnedStagingBytes": 2 << 30,
    "cudaCopy": "batch",
    "cudaEventTimeoutMs": 30000,
}

_SIZE_KEYS = frozenset({"maxInflightBytes", "hostCacheBytes", "pinnedStagingBytes", "maxRegionBytesPerClient"})
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_size(v: Any) -> Any:
    """Bytes from an integer or "500GiB" / "1.5TB" / "64M", as the engine reads
    sizes (core/config.ts parseSize); anything else is returned unchanged,
    for the engine to refuse."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", v)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return v


def explicit(cc: dict[str, Any]) -> dict[str, Any]:
    """The engine settings a connector config states, normalized."""
    out: dict[str, Any] = {}
    backends = [d for d in str(cc.get("storage_backends", "")).split(":")]
    for k, v in cc.items():
        if k == "storage_backends" or k in CLIENT_ONLY or v is None:
            continue
        if k in _SIZE_KEYS:
            v = parse_size(v)
        elif k == "capacity":
            sizes = [parse_size(x) for x in (v if isinstance(v, list) else [v])]
            v = sizes * len(backends) if len(sizes) == 1 else sizes
        out[k] = v
    return out


def _default(k: str, backends: int) -> Any:
    v = DEFAULTS.get(k)
    return [v] * backends if k == "capacity" and v is not None else v


def differences(
    running: dict[str, Any], wanted: dict[str, Any], backends: int, running_is_effective: bool = False
) -> dict[str, tuple[Any, Any]]:
    """{setting: (running value, wanted value)} for every setting the two
    disagree on. `running` is what the engine was started with (its explicit
    settings, or every effective value when the engine reports them)."""
    diff: dict[str, tuple[Any, Any]] = {}
    # The most telling first: in the order of DEFAULTS, then the others by name.
    for k in list(DEFAULTS) + sorted((set(running) | set(wanted)) - set(DEFAULTS)):
        if k in CLIENT_ONLY:
            continue
        have = running.get(k, None if running_is_effective else _default(k, backends))
        want = wanted.get(k, _default(k, backends))
        if have is None or want is None:
            continue  # a setting one side does not state and whose default is not known here
        if have != want:
            diff[k] = (have, want)
    return diff


def describe(diff: dict[str, tuple[Any, Any]]) -> tuple[str, str]:
    """("transferStreamNumber 32, odirect true", "transferStreamNumber 64, odirect false")."""

    def show(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list) and len(set(map(str, v))) == 1:
            return show(v[0])
        return str(v)

    return (
        ", ".join(f"{k} {show(a)}" for k, (a, _) in diff.items()),
        ", ".join(f"{k} {show(b)}" for k, (_, b) in diff.items()),
    )
