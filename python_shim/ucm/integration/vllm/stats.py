"""What the connector reports through vLLM's connector stats.

vLLM collects `get_kv_connector_stats()` from the scheduler-side connector
(lookups) and from every worker (loads, saves), sums them with `aggregate`
and logs `reduce()` as "KV Transfer metrics: ..." at its stats interval.
Everything here is a count, so aggregation is a sum and the payload stays a
plain dict that crosses process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:  # vLLM >= 0.11 has connector stats
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError:  # pragma: no cover
    KVConnectorStats = None  # type: ignore[assignment,misc]

#: counters, all additive
FIELDS = (
    "lookup_blocks",  # blocks the scheduler asked the store about
    "hit_blocks",  # of those, the stored prefix found
    "lookup_errors",  # lookups answered as misses because the engine did not answer
    "loaded_blocks",
    "load_failed_blocks",  # recomputed instead
    "saved_blocks",  # written by this save
    "save_skipped_blocks",  # already stored, or being written by another dump: not written again
    "save_dropped_blocks",  # shed by the engine's write admission
    "save_failed_blocks",
)


def empty() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)


if KVConnectorStats is not None:

    @dataclass
    class UCMConnectorStats(KVConnectorStats):  # type: ignore[misc,valid-type]
        def __post_init__(self) -> None:
            for k in FIELDS:
                self.data.setdefault(k, 0)

        def reset(self) -> None:
            self.data = empty()

        def aggregate(self, other: "KVConnectorStats") -> "UCMConnectorStats":
            for k in FIELDS:
                self.data[k] = self.data.get(k, 0) + int(other.data.get(k, 0))
            return self

        def reduce(self) -> dict[str, int | float]:
            d = self.data
            out: dict[str, int | float] = {k: d[k] for k in FIELDS}
            out["hit_rate"] = round(d["hit_blocks"] / d["lookup_blocks"], 4) if d["lookup_blocks"] else 0.0
            return out

        def is_empty(self) -> bool:
            return not any(self.data.get(k, 0) for k in FIELDS)
else:  # pragma: no cover
    UCMConnectorStats = None  # type: ignore[assignment,misc]


def build(data: dict[str, Any] | None) -> Any:
    """vLLM's build_kv_connector_stats: the stats object for a payload (None: not supported)."""
    if UCMConnectorStats is None:
        return None
    return UCMConnectorStats(data=dict(data or {}))
