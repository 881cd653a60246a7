"""The shard columns of a dump or load request: where each block's bytes
live (region id, offset, length), built as typed arrays and sent as their
little-endian bytes (docs/PROTOCOL.md, `shards`)."""

from __future__ import annotations

import array
import sys
from typing import Any


class ShardList:
    """Columns of a dump/load request: typed arrays from the first shard
    (uint32 region, uint64 offset and length), sent as their little-endian
    bytes; the engine takes them as they are (docs/PROTOCOL.md)."""

    def __init__(self, per_block: int):
        self.per_block = per_block
        self.region = array.array("I")
        self.offset = array.array("Q")
        self.length = array.array("Q")

    def add(self, region: int, offset: int, length: int) -> None:
        self.region.append(region)
        self.offset.append(offset)
        self.length.append(length)

    def wire(self) -> dict[str, Any]:
        return {
            "count": self.per_block,
            "region": _le(self.region),
            "offset": _le(self.offset),
            "length": _le(self.length),
        }


assert array.array("I").itemsize == 4 and array.array("Q").itemsize == 8


def _le(column: array.array) -> bytes:
    """A column's bytes, little-endian whatever the host."""
    if sys.byteorder == "little":
        return column.tobytes()
    swapped = array.array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()
