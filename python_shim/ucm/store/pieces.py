"""How NfsStore's entries become engine requests: keys, pieces, memory, commits.

Entry i of a dump or load says: the bytes of block keys[i] starting at byte
offsets[i] are in tensor i (or at a raw address). The entries of one block in
one call are its piece; sorted by offset they must not overlap. A piece that
covers the block from byte 0 without gaps (and, when the block size is
known, at least that size) is the block itself, stored under its key; any
other piece is a block of its own, keyed by the key and the piece's byte
ranges (docs/ucm_store.md). Everything here is checked before anything is
sent, so a caller's mistake raises with the entry's index and value, and
never becomes a half-submitted task.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..memory import RegionRegistry, UnsupportedMemory, host_range_ok, raw_tensor
from ..shards import ShardList

#: piece layouts remembered for lookups (each costs one key per looked-up block)
MAX_LAYOUTS = 64
#: dumped and not yet committed blocks whose pieces commit() must name
MAX_UNCOMMITTED = 1 << 20

Ranges = tuple[tuple[int, int], ...]  # (offset, length) of each entry of a piece, by offset


def block_key(block_id: Any, where: str) -> bytes:
    """The engine key of a block id: bytes as they are, str as its UTF-8 bytes."""
    if isinstance(block_id, str):
        k = block_id.encode()
    elif isinstance(block_id, (bytes, bytearray, memoryview)):
        k = bytes(block_id)
    else:
        raise TypeError(f"{where} must be bytes or str, got {type(block_id).__name__}")
    if not 1 <= len(k) <= 64:
        raise ValueError(f"{where} must be 1 to 64 bytes, got {len(k)}")
    return k


def piece_key(key: bytes, ranges: Ranges) -> bytes:
    """The engine key of a piece of block `key` made of the byte `ranges`."""
    h = hashlib.sha256(b"ucm-piece\0" + key + b"\0")
    h.update(struct.pack(f"<{2 * len(ranges)}Q", *(x for r in ranges for x in r)))
    return h.digest()


class Raw:
    """An entry given as a raw address and size (dump_data / fetch_data)."""

    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size


def raws(addrs: Sequence[int], sizes: Sequence[int]) -> list[Raw]:
    if len(addrs) != len(sizes):
        raise ValueError(f"addresses and sizes must have the same length, got {len(addrs)} and {len(sizes)}")
    return [Raw(a, s) for a, s in zip(addrs, sizes)]


def raw_memory(regions: RegionRegistry, src: Raw, write: bool, where: str) -> torch.Tensor:
    """A byte tensor over a raw entry: inside a storage `regions` has seen, or
    host memory of this process that the transfer may read (or write)."""
    if isinstance(src.addr, bool) or not isinstance(src.addr, int) or not isinstance(src.size, int) or src.size <= 0:
        raise ValueError(f"{where}: address {src.addr!r} and size {src.size!r} must be positive ints")
    hit = regions.find(src.addr, src.size)
    if hit is not None:
        storage, off = hit
        if isinstance(storage, torch.UntypedStorage):
            t = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            return t[off : off + src.size]
    if host_range_ok(src.addr, src.size, write):
        return raw_tensor(src.addr, src.size)
    raise ValueError(
        f"{where}: address {src.addr:#x} (+{src.size} bytes) is neither inside memory this store has "
        f"seen (pass the tensor to dump/load or register_memory first) nor {'writable' if write else 'readable'} "
        "host memory of this process"
    )


def entry_memory(
    regions: RegionRegistry, sources: list[Any], write: bool, what: str
) -> tuple[list[torch.Tensor], list[int]]:
    """Where each entry's bytes are (a tensor per entry), and which entries are
    private CPU memory, copied through staging. Memory the engine can never
    open is the caller's error, said before anything is sent."""
    mems = [
        raw_memory(regions, src, write, f"{what}[{i}]") if isinstance(src, Raw) else src
        for i, src in enumerate(sources)
    ]
    staged: list[int] = []
    for i, t in enumerate(mems):
        if t.device.type == "cpu" and not t.untyped_storage().is_shared():
            staged.append(i)
        elif t.device.type != "cpu":
            try:
                regions.export(t)
            except UnsupportedMemory as e:
                raise UnsupportedMemory(f"{what}[{i}]: {e}") from None
    return mems, staged


def shards_of(count: int, mem: list[torch.Tensor]):
    """The shards of a request: one per entry, `count` per block, where the
    engine found each tensor ((region id, offset) per tensor)."""

    def shards(located: list[tuple[int, int]]) -> ShardList:
        out = ShardList(count)
        for (rid, base), t in zip(located, mem):
            out.add(rid, base, t.numel() * t.element_size())
        return out

    return shards


@dataclass
class Plan:
    """The blocks of one call, in the order of their first entry."""

    ids: list[Any]  # block ids as given
    keys: list[bytes]  # block keys
    ekeys: list[bytes]  # what the engine stores: the block key, or the piece's key
    ranges: list[Ranges]
    entries: list[list[int]]  # entry indices of each block, by offset

    def block_bytes(self) -> list[int]:
        return [sum(n for _, n in r) for r in self.ranges]


class Layouts:
    """The piece layouts used lately (most recent last), which a lookup of a
    block also asks for."""

    def __init__(self, limit: int = MAX_LAYOUTS):
        self.limit = limit
        self._seen: OrderedDict[Ranges, None] = OrderedDict()

    def used(self, ranges: Ranges) -> None:
        self._seen[ranges] = None
        self._seen.move_to_end(ranges)
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def __iter__(self):
        return iter(list(self._seen))


class Uncommitted:
    """Block key -> the piece keys dumped for it and not yet committed, so
    that commit() of the block commits every piece (oldest forgotten first)."""

    def __init__(self, limit: int = MAX_UNCOMMITTED):
        self.limit = limit
        self._pieces: OrderedDict[bytes, list[bytes]] = OrderedDict()

    def dumped(self, blocks: Any) -> None:
        """(block key, engine key) pairs just submitted for dumping."""
        for key, ekey in blocks:
            if ekey != key:
                lst = self._pieces.setdefault(key, [])
                if ekey not in lst:
                    lst.append(ekey)
                self._pieces.move_to_end(key)
        while len(self._pieces) > self.limit:
            self._pieces.popitem(last=False)

    def take(self, key: bytes) -> list[bytes]:
        """The engine keys to commit for block `key` (the key itself when no piece is pending)."""
        return self._pieces.pop(key, [key])


def plan(
    keys: Sequence[Any], offsets: Sequence[int], sources: list[Any], what: str, block_size: int | None, layouts: Layouts
) -> Plan:
    """Checks the entries and groups them by block; pieces' layouts are noted in `layouts`."""
    if not (len(keys) == len(offsets) == len(sources)):
        raise ValueError(
            f"keys, offsets and {what} must have the same length, got {len(keys)}, {len(offsets)}, {len(sources)}"
        )
    blocks: OrderedDict[bytes, list[tuple[int, int, int]]] = OrderedDict()  # key -> [(offset, length, entry)]
    ids: dict[bytes, Any] = {}
    for i, (k, off, src) in enumerate(zip(keys, offsets, sources)):
        key = block_key(k, f"keys[{i}]")
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise ValueError(f"offsets[{i}] must be a non-negative int, got {off!r}")
        if isinstance(src, Raw):
            n = src.size
        else:
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(src).__name__}")
            if not src.is_contiguous():
                raise ValueError(f"{what}[{i}] must be contiguous (shape {tuple(src.shape)}, stride {src.stride()})")
            n = src.numel() * src.element_size()
        if n <= 0:
            raise ValueError(f"{what}[{i}] is empty")
        blocks.setdefault(key, []).append((off, n, i))
        ids.setdefault(key, k)
    out = Plan([ids[k] for k in blocks], list(blocks), [], [], [])
    for key in out.keys:
        ents = sorted(blocks[key])
        pos = 0
        for j, (off, n, i) in enumerate(ents):
            if j and off < pos:
                prev = ents[j - 1]
                raise ValueError(
                    f"block {ids[key]!r}: entries {prev[2]} ([{prev[0]}, {prev[0] + prev[1]})) and {i} "
                    f"([{off}, {off + n})) overlap"
                )
            pos = off + n
        ranges = tuple((off, n) for off, n, _ in ents)
        tiles = all(r[0] == sum(x[1] for x in ranges[:j]) for j, r in enumerate(ranges))
        whole = tiles and (block_size is None or pos >= block_size)
        out.ekeys.append(key if whole else piece_key(key, ranges))
        if not whole:
            layouts.used(ranges)
        out.ranges.append(ranges)
        out.entries.append([i for _, _, i in ents])
    return out
