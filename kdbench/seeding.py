"""Seed streams: one integer seed per cell, split into independent streams.

Initialisation, data order and augmentation each draw from their own stream, so every method of a
cell sees the same data in the same order for the same seed, and differences can be paired by seed.
"""

import hashlib

# A cell seed is a non-negative integer of at most 32 bits: the range numpy, torch and Python's generators all
# accept, so a seed can be carried to any other tool. The streams hash it (with the stream's name) to 62 bits.
MAX_SEED = 2**32 - 1


def stream_seed(seed: int, stream: str, *parts: object) -> int:
    """A 62-bit seed for `stream` (e.g. "init", "order", "aug") of cell seed `seed`, with extra parts (epoch, role)."""
    text = repr((int(seed), stream) + tuple(parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2
