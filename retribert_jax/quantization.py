"""Compressed copies of an index for a fast first pass: int8 scalar quantization and binary sign bits.

Both follow sentence-transformers' `quantize_embeddings` (`sentence_transformers/quantization.py`):
- **int8**: each dimension's range [min, max], calibrated on the corpus itself, is cut into 256 steps:
  `code = round((x - min) / step) - 128`, `step = (max - min) / 255`. (sentence-transformers truncates where we round
  to nearest, which halves the worst error, and leaves the codes' meaning the same.) 4x smaller than float32.
- **binary**: one bit per dimension, packed most significant bit first (`numpy.packbits`, sentence-transformers'
  "ubinary"): the signs of the centred row turned by an orthogonal rotation, `(x - mean) @ rotation > 0`.
  sentence-transformers thresholds the raw values at 0, which suits embeddings centred at 0; a projected pooler
  output is not (MiniLM's 128-d RetriBERT embeddings sit about one standard deviation from 0 in the mean, so a bit at
  0 is nearly constant and carries little), hence the corpus mean. The rotation is iterative quantization (ITQ: Gong,
  Lazebnik, Gordo and Perronnin, "Iterative Quantization: A Procrustean Approach to Learning Binary Codes for
  Large-Scale Image Retrieval", TPAMI 2013), fitted on the corpus from the identity (`binary_rotation`): it turns the
  rows so that their signs lose less, which lifts recall after rescoring on real text (README). A code b (read as
  +-1) stands for `mean + b @ decoder`: `decoder` [D, D] is the least-squares linear map from the codes to the
  centred rows, fitted on the corpus (`binary_decoder`); it undoes the rotation too. Its diagonal form,
  `mean + mad * b` per dimension (mad: the mean absolute deviation from the mean), is what a copy written before
  decoders (and rotations) means: it ignores that the dimensions are correlated, where the full map recovers part of
  what one bit per dimension loses.
  Scoring a float query against decoded codes is the asymmetric distance of Gordo et al., "Asymmetric Distances
  for Binary Embeddings" (TPAMI 2014). 32x smaller than float32.

A compressed copy only shortlists: the shortlist is rescored exactly from the float vectors
(`search.Index(..., scan="int8")`), as sentence-transformers' `semantic_search_faiss(rescore=True)` does with its
`rescore_multiplier`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def binary_centers(shards: Sequence[np.ndarray]) -> np.ndarray:
    """Per-dimension [mean, mean absolute deviation from the mean] over every row of every shard: float32 [2, D]
    (two passes over the shards, accumulated in float64)."""
    total, count = None, 0
    for shard in shards:
        x = np.asarray(shard, dtype=np.float32)
        total = x.sum(axis=0, dtype=np.float64) + (0 if total is None else total)
        count += x.shape[0]
    if not count:
        raise ValueError("no rows to calibrate the binary thresholds on")
    mean = total / count
    spread = sum(np.abs(np.asarray(shard, dtype=np.float32) - mean).sum(axis=0, dtype=np.float64) for shard in shards)
    return np.stack([mean, spread / count]).astype(np.float32)


ROTATION_ITERATIONS = 50  # ITQ's alternations, as Gong and Lazebnik run it
ROTATION_SAMPLE = 200_000  # rows the rotation is fitted on at most: evenly spaced over the corpus


def binary_rotation(
    shards: Sequence[np.ndarray],
    centers: np.ndarray,
    *,
    iterations: int = ROTATION_ITERATIONS,
    sample: int = ROTATION_SAMPLE,
) -> np.ndarray:
    """The orthogonal rotation R, float32 [D, D], after which the centred rows' signs lose least: iterative
    quantization (Gong et al., TPAMI 2013), which alternates B = sign(V R) and the orthogonal Procrustes solution
    R = argmin |B - V R|_F (from the SVD of B^T V), V the centred rows. Started from the identity (the plain
    thresholds at the mean) rather than ITQ's random rotation: on MiniLM embeddings of real text the identity start
    ends with the better recall after rescoring. Fitted on at most `sample` rows, evenly spaced over the corpus (in
    float64; deterministic).

    Args:
      shards: float rows [n_i, D].
      centers: `binary_centers` of the same shards (row 0: the mean).
    """
    sizes = [int(np.asarray(s).shape[0]) for s in shards]
    total = sum(sizes)
    if not total:
        raise ValueError("no rows to fit the binary rotation on")
    take = np.unique(np.linspace(0, total - 1, min(total, sample)).astype(np.int64))
    starts = np.cumsum([0, *sizes])
    parts = []
    for shard, start, stop in zip(shards, starts[:-1], starts[1:], strict=True):
        mine = take[(take >= start) & (take < stop)] - start
        if mine.size:
            parts.append(np.asarray(shard[mine], dtype=np.float64))
    v = np.concatenate(parts) - np.asarray(centers[0], np.float64)
    rotation = np.eye(v.shape[1])
    for _ in range(iterations):
        b = np.where(v @ rotation > 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(b.T @ v)
        rotation = (u @ wt).T
    return rotation.astype(np.float32)


def binary_decoder(shards: Sequence[np.ndarray], centers: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    """The least-squares linear decoder of binary codes: float32 [D, D] W minimising the sum over the corpus of
    |x - mean - b W|^2, b the row's code read as +-1 (`encode` with `rotation`). One pass over the shards,
    accumulating b^T b and b^T (x - mean) in float64; solved by `numpy.linalg.lstsq`, so that constant or repeated
    bits (a singular b^T b) get the minimum-norm map.

    Args:
      shards: float rows [n_i, D].
      centers: `binary_centers` of the same shards (the codes' thresholds).
      rotation: the codes' rotation (`binary_rotation`), None for none.
    """
    mean = np.asarray(centers[0], np.float64)
    dim = mean.shape[0]
    gram, cross = np.zeros((dim, dim)), np.zeros((dim, dim))
    for shard in shards:
        x = np.asarray(shard, dtype=np.float32)
        b = np.where(_bits(x, centers, rotation), 1.0, -1.0)
        gram += b.T @ b
        cross += b.T @ (x - mean)
    return np.linalg.lstsq(gram, cross, rcond=None)[0].astype(np.float32)


def _bits(x: np.ndarray, centers: np.ndarray, rotation: np.ndarray | None) -> np.ndarray:
    """bool [n, D]: `x > mean` (no rotation: compared in float32, so exactly where each value exceeds the mean), or
    `(x - mean) @ rotation > 0`."""
    if rotation is None:
        return x > centers[0]
    return (x - centers[0]) @ np.asarray(rotation, np.float32) > 0


def encode(
    x: np.ndarray, form: str, calibration: np.ndarray | None = None, rotation: np.ndarray | None = None
) -> np.ndarray:
    """The codes of float rows [n, D]: int8 [n, D] or uint8 [n, D / 8] for binary.

    Args:
      calibration: float32 [2, D]: the int8 ranges (`int8_ranges`) or the binary centers (`binary_centers`).
      rotation: binary only: float32 [D, D] (`binary_rotation`), None for the plain thresholds at the mean.

    Raises:
      ValueError: an unknown form, a binary width that is not a multiple of 8, or no calibration.
    """
    x = np.asarray(x, dtype=np.float32)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if calibration is None:
        raise ValueError(f"{form} codes need the corpus' calibration")
    if form == "int8":
        codes = np.rint((x - calibration[0]) / int8_steps(calibration)) - 128
        return np.clip(codes, -128, 127).astype(np.int8)
    if x.shape[1] % 8:
        raise ValueError(f"binary codes need a width that is a multiple of 8, got {x.shape[1]}")
    return np.packbits(_bits(x, calibration, rotation), axis=1)


def decode(codes: np.ndarray, form: str, calibration: np.ndarray, decoder: np.ndarray | None = None) -> np.ndarray:
    """The float32 rows [n, D] a code stands for: `min + step * (code + 128)` (int8); `mean + b @ decoder` (binary,
    b the bits as +-1; `decoder` None: the diagonal decoder `diag(mad)`, what a copy written without one means)."""
    if form == "int8":
        return calibration[0] + int8_steps(calibration) * (codes.astype(np.float32) + 128)
    signs = np.unpackbits(codes, axis=1).astype(np.float32) * 2 - 1
    return calibration[0] + signs @ query_weights(form, calibration, decoder)


def query_weights(form: str, calibration: np.ndarray, decoder: np.ndarray | None = None) -> np.ndarray:
    """float32 [D, D] W with `decode(code) = offset + code @ W` (codes read as integers, or as +-1 for binary), so
    that for a query q, `(q @ W.T) . code` ranks rows as `q . decode(code)` does (the rest is constant per query):
    `diag(step)` (int8), the decoder (binary), or `diag(mad)` for a binary copy written without a decoder."""
    if form == "int8":
        return np.diag(int8_steps(calibration)).astype(np.float32)
    if decoder is None:
        return np.diag(np.asarray(calibration[1], np.float32))
    return np.asarray(decoder, np.float32)
