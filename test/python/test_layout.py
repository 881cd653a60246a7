"""Where a block's bytes are (ucm.integration.vllm.layout), on real torch
tensors laid out the way vLLM 0.32 lays out its KV cache: the 5-D layouts
of vllm.v1.kv_cache_layout built with vLLM's own functions, and the older
NHD / HND shapes. For every block, the runs must cover exactly the bytes
that indexing the tensor at that block touches, no byte twice, in as few
shards as the memory allows."""

from __future__ import annotations

import pytest
import torch

from ucm.integration.vllm.layout import block_pieces, block_runs, merge_runs

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def block_mask(raw: torch.Tensor, view: torch.Tensor, axis: int, b: int) -> torch.Tensor:
    """Bytes of `raw` that view.select(axis, b) touches, found by writing them."""
    raw.zero_()
    view.select(axis, b).view(INT_OF_SIZE[view.element_size()]).fill_(-1)  # every byte 0xff
    mask = raw.view(torch.uint8) != 0
    return mask


def runs_mask(raw: torch.Tensor, pieces: list[tuple[int, int]]) -> torch.Tensor:
    """Bytes covered by (offset in raw, length) runs; a byte covered twice fails."""
    count = torch.zeros(raw.numel() * raw.element_size(), dtype=torch.int32)
    for off, n in pieces:
        count[off : off + n] += 1
    assert int(count.max()) <= 1, "a byte is in two runs"
    return count == 1


def check_tensor(raw: torch.Tensor, view: torch.Tensor, num_blocks: int, shards_per_block: int) -> None:
    tr = block_runs("layer", view, num_blocks)
    assert len(tr.runs) == shards_per_block, tr.runs[:8]
    base = view.data_ptr() - raw.data_ptr()
    axis = [i for i, n in enumerate(view.shape) if n == num_blocks][0]
    for b in {0, 1, num_blocks // 2, num_blocks - 1}:
        pieces = [(base + b * tr.block_stride + off, n) for off, n in tr.runs]
        assert torch.equal(runs_mask(raw, pieces), block_mask(raw, view, axis, b)), f"block {b}"


# ---- the shapes vLLM used before 0.32: (2, num_blocks, block_size, heads, head_size) ----


@pytest.mark.parametrize(
    "dtype,heads,head_size", [(torch.bfloat16, 8, 128), (torch.bfloat16, 3, 72), (torch.float32, 2, 80)]
)
def test_nhd_is_two_runs_per_block(dtype, heads, head_size):
    nb, bs = 12, 16
    raw = torch.zeros(2 * nb * bs * heads * head_size, dtype=dtype)
    view = raw.view(2, nb, bs, heads, head_size)
    check_tensor(raw, view, nb, 2)  # K and V of the block, each contiguous


@pytest.mark.parametrize("dtype,heads,head_size", [(torch.bfloat16, 8, 128), (torch.bfloat16, 3, 72)])
def test_hnd_merges_into_two_runs_per_block(dtype, heads, head_size):
    """HND as vLLM built it: the allocation in (2, blocks, heads, tokens,
    head_size) order, seen through a permuted view with tokens before heads.
    Per token and head a run of head_size elements (2 * 16 * heads of them),
    which all touch: one run each for K and V."""
    nb, bs = 12, 16
    raw = torch.zeros(2 * nb * heads * bs * head_size, dtype=dtype)
    view = raw.view(2, nb, heads, bs, head_size).permute(0, 1, 3, 2, 4)
    assert view.shape == (2, nb, bs, heads, head_size) and not view.is_contiguous()
    check_tensor(raw, view, nb, 2)


# ---- vLLM 0.32: logical [L, B, H, N, C], K and V fused in C, several physical orders ----


def vllm_views(layout_name: str, num_blocks: int, layers: int, heads: int, head_size: int, dtype=torch.bfloat16):
    """Per-layer views exactly as vLLM 0.32 makes them (kv_cache_utils +
    create_kv_cache_views), over one int8 allocation."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = KVCacheLayout[layout_name]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=heads, head_size=head_size, dtype=dtype)
    page = spec.page_size_bytes
    block_stride = page * layers if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, num_blocks, layers, layout, fixed_strides=(None, block_stride, None, None, None)
    )
    kt = KVCacheTensor(
        size=page * num_blocks * layers,
        layers=[f"model.layers.{i}.attn" for i in range(layers)],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    raw = torch.zeros(kt.size, dtype=torch.int8)
    return raw, create_kv_cache_views(raw, spec, num_blocks, layout, kt), layout


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC", "BLHNC", "LHBNC"])
@pytest.mark.parametrize("heads,head_size", [(8, 128), (3, 72)])
def test_vllm_032_layouts(layout, heads, head_size):
    nb, layers = 10, 3
    raw, views, lay = vllm_views(layout, nb, layers, heads, head_size)
    assert views[0].shape == (nb, heads, 16, 2 * head_size)
    # A block of one layer is contiguous unless heads are outside blocks (LHBNC).
    per_layer = heads if layout == "LHBNC" else 1
    for v in views:
        check_tensor(raw, v, nb, per_layer)
    # Whole blocks across layers: one piece per block where all layers of a
    # block sit together (block outermost, the "cross-layer" layouts).
    trs = [block_runs(f"l{i}", v, nb) for i, v in enumerate(views)]
    located = [(7, v.data_ptr() - raw.data_ptr()) for v in views]
    pieces = block_pieces(trs, located)
    want = 1 if lay.is_block_outermost else layers * per_layer
    assert len(pieces) == want
    for b in (0, nb - 1):
        union = torch.zeros(raw.numel(), dtype=torch.bool)
        for axis_view in views:
            union |= block_mask(raw, axis_view, 0, b)
        got = runs_mask(raw, [(p.base + b * p.stride, p.length) for p in pieces])
        assert torch.equal(got, union)


def test_pieces_never_merge_across_regions_or_strides():
    nb = 4
    a = torch.zeros(nb, 64, dtype=torch.uint8)
    trs = [block_runs("a", a, nb), block_runs("b", a, nb)]
    # Same offsets, different regions: two pieces.
    assert len(block_pieces(trs, [(1, 0), (2, 64)])) == 2
    # Same region, touching only for block 0 (different block strides): two pieces.
    c = torch.zeros(nb, 128, dtype=torch.uint8)
    trs = [block_runs("a", a, nb), block_runs("c", c, nb)]
    assert len(block_pieces(trs, [(1, 0), (1, 64)])) == 2


def test_overlapping_elements_are_refused():
    nb = 4
    t = torch.zeros(nb, 8).expand(2, nb, 8).permute(1, 0, 2)  # an axis with stride 0
    with pytest.raises(ValueError, match="overlap"):
        block_runs("weird", t, nb)
    assert merge_runs([(0, 4), (4, 4), (16, 2)]) == [(0, 8), (16, 2)]
