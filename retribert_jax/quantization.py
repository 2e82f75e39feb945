"""Compressed copies of an index for a fast first pass: int8 scalar quantization and binary sign bits.

Both follow sentence-transformers' `quantize_embeddings` (`sentence_transformers/quantization.py`):
- **int8**: each dimension's range [min, max], calibrated on the corpus itself, is cut into 256 steps:
  `code = round((x - min) / step) - 128`, `step = (max - min) / 255`. (sentence-transformers truncates where we round
  to nearest, which halves the worst error, and leaves the codes' meaning the same.) 4x smaller than float32.
- **binary**: one bit per dimension, set where the value is > 0, packed most significant bit first
  (`numpy.packbits`, sentence-transformers' "ubinary"). 32x smaller than float32.

A compressed copy only shortlists: the shortlist is rescored exactly from the float vectors
(`search.Index(..., scan="int8")`), as sentence-transformers' `semantic_search_faiss(rescore=True)` does with its
`rescore_multiplier`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FORMS = ("int8", "binary")
BYTES_PER_VALUE = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "binary": 1 / 8}


def int8_ranges(shards: Iterable[np.ndarray]) -> np.ndarray:
    """Per-dimension [min, max] over every row of every shard: float32 [2, D]."""
    lo = hi = None
    for shard in shards:
        x = np.asarray(shard, dtype=np.float32)
        if x.shape[0] == 0:
            continue
        a, b = x.min(axis=0), x.max(axis=0)
        lo, hi = (a, b) if lo is None else (np.minimum(lo, a), np.maximum(hi, b))
    if lo is None:
        raise ValueError("no rows to calibrate the int8 ranges on")
    return np.stack([lo, hi]).astype(np.float32)


def int8_steps(ranges: np.ndarray) -> np.ndarray:
    """The step per dimension, float32 [D]; a constant dimension gets step 1 (all its codes are -128)."""
    steps = (ranges[1] - ranges[0]) / 255
    return np.where(steps > 0, steps, 1).astype(np.float32)


def encode(x: np.ndarray, form: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """The codes of float rows [n, D]: int8 [n, D] (needs `ranges`, [2, D]) or uint8 [n, D / 8] for binary.

    Raises:
      ValueError: an unknown form, a binary width that is not a multiple of 8, or missing ranges.
    """
    x = np.asarray(x, dtype=np.float32)
    if form == "int8":
        if ranges is None:
            raise ValueError("int8 codes need the calibrated ranges")
        codes = np.rint((x - ranges[0]) / int8_steps(ranges)) - 128
        return np.clip(codes, -128, 127).astype(np.int8)
    if form == "binary":
        if x.shape[1] % 8:
            raise ValueError(f"binary codes need a width that is a multiple of 8, got {x.shape[1]}")
        return np.packbits(x > 0, axis=1)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def decode(codes: np.ndarray, form: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """The float32 rows a code stands for: `min + step * (code + 128)`, or +-1 per bit."""
    if form == "int8":
        return ranges[0] + int8_steps(ranges) * (codes.astype(np.float32) + 128)
    return np.unpackbits(codes, axis=1).astype(np.float32) * 2 - 1
