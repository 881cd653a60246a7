"""Where one KV block's bytes live in vLLM's KV cache tensors.

Computed from each tensor's shape and strides, not from a hard-coded layout:
the block axis is the one whose size is the number of blocks; the bytes of
block b are every element with that index. The strides split them into
contiguous runs, and runs that touch are merged, so a block of one layer is
one run whenever its bytes are contiguous in memory, whatever the order of
heads and tokens inside it (vLLM 0.32's default LBNHC, LBHNC, the old NHD
and HND shapes). A block's payload in the store is all those runs, layer
after layer, each layer's in memory order.

`block_pieces` then merges across layers: where the layers are views of one
allocation with the block axis outermost (BLHNC, BLNHC: a block of all
layers is one contiguous page), a whole block is one shard.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass
class TensorRuns:
    name: str
    tensor: torch.Tensor
    block_stride: int  # bytes between consecutive blocks
    runs: list[tuple[int, int]]  # (byte offset from the block's first byte, length), ascending, disjoint
    block_axis: int = 0  # the tensor's axis of blocks


def block_runs(name: str, t: torch.Tensor, num_blocks: int) -> TensorRuns:
    shape, stride, es = list(t.shape), list(t.stride()), t.element_size()
    dims = [d for d, n in enumerate(shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"KV cache {name}: no axis of size num_blocks={num_blocks} in shape {tuple(shape)}")
    d = dims[0]
    # The other axes, outermost in memory first. Size-1 axes hold no bytes
    # of their own (their stride is arbitrary), so they are left out.
    rest = sorted(
        ((shape[i], stride[i]) for i in range(len(shape)) if i != d and shape[i] != 1), key=lambda a: a[1], reverse=True
    )
    # Longest suffix of those axes that is contiguous in memory: one run.
    k = len(rest)
    expect = 1
    while k > 0 and rest[k - 1][1] == expect:
        expect *= rest[k - 1][0]
        k -= 1
    run_len = math.prod(n for n, _ in rest[k:]) * es
    outer = rest[:k]
    starts = sorted(
        sum(i * s for i, (_, s) in zip(idx, outer)) * es for idx in itertools.product(*(range(n) for n, _ in outer))
    )
    runs = merge_runs([(off, run_len) for off in starts], name)
    return TensorRuns(name, t, stride[d] * es, runs, d)


def merge_runs(runs: list[tuple[int, int]], name: str = "KV cache") -> list[tuple[int, int]]:
    """Sorted runs with touching ones joined (offset + length == next offset).
    Overlapping runs (an axis with stride 0) would store bytes twice: refused."""
    out: list[tuple[int, int]] = []
    for off, n in runs:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif out and out[-1][0] + out[-1][1] > off:
            raise ValueError(f"{name}: elements of one block overlap in memory at byte {off}; cannot be stored")
        else:
            out.append((off, n))
    return out


@dataclass
class Piece:
    """One shard of every block: block b's bytes of it are at
    `base + b * stride` in `region`, `length` bytes."""

    region: int
    base: int
    stride: int
    length: int


def block_pieces(layers: list[TensorRuns], located: list[tuple[int, int]]) -> list[Piece]:
    """The shards of one block, in payload order, given each layer's (region
    id, byte offset of its first element in the region). A run joins the
    previous one when both are in the same region, move by the same stride
    from block to block, and touch: then they touch for every block, so
    every block has the same number of shards."""
    pieces: list[Piece] = []
    for tr, (rid, base) in zip(layers, located):
        for off, n in tr.runs:
            last = pieces[-1] if pieces else None
            if (
                last is not None
                and last.region == rid
                and last.stride == tr.block_stride
                and last.base + last.length == base + off
            ):
                last.length += n
            else:
                pieces.append(Piece(rid, base + off, tr.block_stride, n))
    return pieces


def layout_signature(tensors: list[TensorRuns]) -> str:
    """What makes block bytes (in)compatible, for the namespace description:
    per tensor its dtype, its shape with the block axis as B, the order of
    its axes in memory (outermost first; size-1 axes hold no bytes of their
    own and are left out) and its runs. Two layouts with the same shapes
    and other strides (NHD and HND, LBNHC and LBHNC) differ here, so their
    blocks never share a namespace description."""
    parts = []
    for tr in tensors:
        t = tr.tensor
        shape = ["B" if i == tr.block_axis else str(n) for i, n in enumerate(t.shape)]
        axes = [i for i in range(t.dim()) if t.shape[i] != 1]
        order = sorted(axes, key=lambda i: (-t.stride(i), i))
        parts.append(
            f"{'x'.join(shape)}:{t.dtype}:order{''.join(str(i) for i in order)}:{len(tr.runs)}x{tr.runs[0][1]}"
        )
    return "|".join(parts)
