"""Tiny backbone settings shared by extraction tests: the real code paths at a size that runs in seconds."""

TINY_DEIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_SIZE = 32
