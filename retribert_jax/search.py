"""Exact maximum-inner-product search over an embedding directory written by `retribert-jax embed`.

The shards are opened memory-mapped; a search walks them block by block with one jitted matmul + top-k per block
and a jitted merge into the running top-k, so at most one [queries, block] score matrix exists at a time and the
corpus is never loaded whole. The scores are plain inner products, as faiss' `IndexFlatIP` (the ELI5 retriever's
index) computes them; `backend="faiss"` runs that index itself when faiss is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "retribert_jax.embeddings"
MANIFEST_KEYS = {"format": str, "version": int, "model": str, "config_hash": str, "kind": str, "dtype": str,
                 "max_length": int, "projection_dim": int, "normalized": bool, "shard_size": int, "num_shards": int,
                 "count": int, "has_text": bool}
BACKENDS = ("jax", "faiss")


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: the row's id, its inner-product score, and its text when the index stores texts."""

    id: Any
    score: float
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "score": self.score}
        if self.text is not None:
            d["text"] = self.text
        return d


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of an embedding directory, checked key by key."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such index directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {directory} a finished `retribert-jax embed` output?")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, typ in MANIFEST_KEYS.items():
        if key not in m:
            raise ValueError(f"{path}: key {key!r} is missing")
        ok = isinstance(m[key], typ) and not (typ is int and isinstance(m[key], bool))
        if not ok:
            raise ValueError(f"{path}: key {key!r} should be {typ.__name__}, got {m[key]!r}")
    if m["format"] != FORMAT:
        raise ValueError(f"{path}: format is {m['format']!r}, expected {FORMAT!r}")
    if m["version"] != 1:
        raise ValueError(f"{path}: version {m['version']} is not supported (expected 1)")
    if m["dtype"] not in ("float32", "float16"):
        raise ValueError(f"{path}: dtype {m['dtype']!r} is neither float32 nor float16")
    return m


@functools.partial(jax.jit, static_argnames=("k",))
def _block_topk(queries: jax.Array, block: jax.Array, valid: jax.Array, offset: jax.Array, k: int):
    """Top-k (scores, global rows) of one corpus block; rows at or past `valid` are padding."""
    scores = jnp.einsum("qp,np->qn", queries, block.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)  # Q N
    scores = jnp.where(jnp.arange(block.shape[0])[None, :] < valid, scores, -jnp.inf)
    top, idx = jax.lax.top_k(scores, k)  # Q k
    return top, idx + offset


@functools.partial(jax.jit, static_argnames=("k",))
def _merge(s1: jax.Array, i1: jax.Array, s2: jax.Array, i2: jax.Array, k: int):
    s = jnp.concatenate([s1, s2], axis=1)
    i = jnp.concatenate([i1, i2], axis=1)
    # Stable on ties: the earlier block (lower row) wins, as a single top-k over the whole corpus would.
    top, pos = jax.lax.top_k(s, k)
    return top, jnp.take_along_axis(i, pos, axis=1)


class _Lines:
    """Random access to the lines of a JSONL file by number, through byte offsets found on first use."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        self._offsets: np.ndarray | None = None

    def _index(self) -> np.ndarray:
        if self._offsets is None:
            offsets = [0]
            with open(self.path, "rb") as f:
                for line in f:
                    offsets.append(offsets[-1] + len(line))
            if len(offsets) - 1 != self.count:
                raise ValueError(f"{self.path}: {len(offsets) - 1} lines, expected {self.count}")
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    def get(self, rows: Sequence[int]) -> list[Any]:
        offsets = self._index()
        out = []
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(int(offsets[r]))
                line = f.read(int(offsets[r + 1] - offsets[r]))
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{r + 1}: not valid JSON ({e})") from None
        return out


class Index:
    """An embedding directory opened for exact inner-product search; the shards stay memory-mapped.

    Args:
      directory: the output of `retribert-jax embed`.
      backend: "jax" (blocked jitted matmul + top-k) or "faiss" (an `IndexFlatIP` built from the shards; needs
        `pip install faiss-cpu`, and holds the corpus in memory).
      block_size: corpus rows scored per block by the jax backend.
    """

    def __init__(self, directory: str, *, backend: str = "jax", block_size: int = 65536):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.backend, self.block_size = backend, block_size
        m = self.manifest
        self.shards: list[np.ndarray] = []
        self._ids: list[_Lines] = []
        self._texts: list[_Lines] = []
        total = 0
        for i in range(m["num_shards"]):
            path = os.path.join(directory, f"embeddings-{i:05d}.npy")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard {i} of {m['num_shards']} is missing")
            try:
                emb = np.load(path, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"{path}: not a readable .npy file ({e})") from None
            if emb.ndim != 2 or emb.shape[1] != m["projection_dim"]:
                raise ValueError(f"{path}: shape {emb.shape}, expected [n, {m['projection_dim']}]")
            if emb.dtype != np.dtype(m["dtype"]):
                raise ValueError(f"{path}: dtype {emb.dtype}, but the manifest says {m['dtype']}")
            expected = min(m["shard_size"], m["count"] - i * m["shard_size"])
            if emb.shape[0] != expected:
                raise ValueError(f"{path}: {emb.shape[0]} rows, expected {expected}")
            self.shards.append(emb)
            self._ids.append(_Lines(os.path.join(directory, f"ids-{i:05d}.jsonl"), emb.shape[0]))
            if m["has_text"]:
                self._texts.append(_Lines(os.path.join(directory, f"texts-{i:05d}.jsonl"), emb.shape[0]))
            total += emb.shape[0]
        if total != m["count"]:
            raise ValueError(f"{os.path.join(directory, MANIFEST)}: count {m['count']}, but the shards hold {total}")
        self._faiss = None

    def __len__(self) -> int:
        return self.manifest["count"]

    @property
    def dim(self) -> int:
        return self.manifest["projection_dim"]

    def check_model(self, config) -> None:
        """Refuses a model whose architecture differs from the one that embedded the index, or a question index."""
        m = self.manifest
        if m["kind"] != "passages":
            raise ValueError(f"{self.directory}: holds {m['kind']} embeddings; searching needs passages")
        if m["config_hash"] != config.architecture_hash():
            raise ValueError(f"{self.directory}: embedded by a model with config hash {m['config_hash']} "
                             f"({m['model']}), but this model's is {config.architecture_hash()}")

    def _search_jax(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = jnp.asarray(q, dtype=jnp.float32)
        best_s = jnp.full((q.shape[0], k), -jnp.inf, dtype=jnp.float32)
        best_i = jnp.full((q.shape[0], k), -1, dtype=jnp.int32)
        start = 0
        for shard in self.shards:
            for s in range(0, shard.shape[0], self.block_size):
                rows = shard[s:s + self.block_size]
                n = rows.shape[0]
                # One block shape for the whole corpus, hence one compilation: pad the short last block.
                width = self.block_size if len(self) > self.block_size else len(self)
                block = np.zeros((width, self.dim), dtype=rows.dtype)
                block[:n] = rows
                top, idx = _block_topk(queries, block, n, start + s, k=min(k, width))
                best_s, best_i = _merge(best_s, best_i, top, idx.astype(jnp.int32), k=k)
            start += shard.shape[0]
        return np.asarray(best_s), np.asarray(best_i)

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            import faiss
        except ImportError:
            raise ImportError("the faiss backend needs faiss: pip install 'retribert_jax[faiss]'") from None
        if self._faiss is None:
            index = faiss.IndexFlatIP(self.dim)
            for shard in self.shards:
                for s in range(0, shard.shape[0], self.block_size):
                    index.add(np.ascontiguousarray(shard[s:s + self.block_size], dtype=np.float32))
            self._faiss = index
        scores, rows = self._faiss.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return scores, rows

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The top-k rows for each query embedding.

        Args:
          queries: float [Q, projection_dim] (or [projection_dim] for one query).
          k: hits per query (capped at the corpus size).

        Returns:
          One list of `Hit`s per query, best first.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries have shape {np.shape(queries)}, expected [n, {self.dim}]")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self))
        if q.shape[0] == 0 or k == 0:
            return [[] for _ in range(q.shape[0])]
        scores, rows = self._search_faiss(q, k) if self.backend == "faiss" else self._search_jax(q, k)
        return [[self._hit(int(r), float(s)) for s, r in zip(srow, rrow, strict=True)]
                for srow, rrow in zip(scores, rows, strict=True)]

    def _locate(self, row: int) -> tuple[int, int]:
        return divmod(row, self.manifest["shard_size"])

    def _hit(self, row: int, score: float) -> Hit:
        shard, local = self._locate(row)
        (id_,) = self._ids[shard].get([local])
        text = self._texts[shard].get([local])[0] if self._texts else None
        return Hit(id=id_, score=score, text=text)

    def search(self, encoder, questions: str | Sequence[str], k: int = 10, *, batch_size: int = 32,
               max_length: int = 128) -> list[Hit] | list[list[Hit]]:
        """Encodes questions with `encoder.encode_questions` (in batches) and searches.

        Args:
          encoder: an `retribert_jax.encode.Encoder` (anything with `encode_questions`).
          questions: one question or a list.
          k: hits per question.
          batch_size, max_length: passed to the encoder; questions are normalised when the index is.

        Returns:
          A list of `Hit`s for one question, a list of such lists for a list.
        """
        single = isinstance(questions, str)
        texts = [questions] if single else list(questions)
        q = encoder.encode_questions(texts, batch_size=batch_size, max_length=max_length,
                                     normalize=self.manifest["normalized"])
        hits = self.search_embeddings(np.atleast_2d(q), k)
        return hits[0] if single else hits
