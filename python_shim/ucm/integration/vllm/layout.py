"""Where one KV block's bytes live in vLLM's KV cache tensors.

Computed from each tensor's shape and strides, not from a hard-coded layout:
the block axis is the one whose size is the number of blocks; the bytes of
block b are every element with that index, which the strides split into a
few contiguous runs (one per layer on vLLM's CPU backend, two for layouts
with K and V on a leading axis). A block's payload in the store is all those
runs, layer after layer, in a fixed order.
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
    runs: list[tuple[int, int]]  # (byte offset from the block's first byte, length)


def block_runs(name: str, t: torch.Tensor, num_blocks: int) -> TensorRuns:
    shape, stride, es = list(t.shape), list(t.stride()), t.element_size()
    dims = [d for d, n in enumerate(shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"KV cache {name}: no axis of size num_blocks={num_blocks} in shape {tuple(shape)}")
    d = dims[0]
    rest = [(shape[i], stride[i]) for i in range(len(shape)) if i != d]
    # Longest suffix of the remaining axes that is contiguous in memory.
    k = len(rest)
    expect = 1
    while k > 0 and (rest[k - 1][0] == 1 or rest[k - 1][1] == expect):
        expect *= rest[k - 1][0]
        k -= 1
    run_len = math.prod(n for n, _ in rest[k:]) * es
    outer = rest[:k]
    runs = []
    for idx in itertools.product(*(range(n) for n, _ in outer)):
        runs.append((sum(i * s for i, (_, s) in zip(idx, outer)) * es, run_len))
    runs.sort()
    return TensorRuns(name, t, stride[d] * es, runs)


def layout_signature(tensors: list[TensorRuns]) -> str:
    """What makes block bytes (in)compatible, for the namespace digest."""
    parts = []
    for tr in tensors:
        parts.append(f"{tuple(tr.tensor.shape[1:]) if tr.tensor.dim() > 1 else ()}:{tr.tensor.dtype}:{len(tr.runs)}x{tr.runs[0][1]}")
    return "|".join(parts)
