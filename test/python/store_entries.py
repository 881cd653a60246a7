"""UCM's store API takes blocks as flat lists of (key, offset, tensor) entries:
per block, one shard per layer at consecutive offsets of its block file. One
builder here, so every test lays blocks out the same way."""

from __future__ import annotations


def entries(ks, caches, block_ids):
    """The entries of blocks `block_ids` of the per-layer `caches`, stored under keys `ks`."""
    K, O, T = [], [], []
    for k, b in zip(ks, block_ids):
        off = 0
        for c in caches:
            K.append(k)
            O.append(off)
            T.append(c[b])
            off += c[b].numel() * c[b].element_size()
    return K, O, T
