"""Exact maximum-inner-product search over an embedding directory (`embedding_dir`), on the default device.

The shards stay memory-mapped; a search walks them block by block with one jitted matmul + top-k per block and a
jitted merge into the running top-k, so at most one [queries, block] score matrix exists at a time and the corpus is
never loaded whole. Scores are plain inner products, as faiss' `IndexFlatIP` (the ELI5 retriever's index) computes
them; `backend="faiss"` runs that index itself when faiss is installed.

Ranking is a total order: score descending, then corpus row ascending. Both backends return it, so equal scores come
out in the same order from either, and the top k of a search is always a prefix of its top K. A NaN score is no
score: a row with a NaN embedding is never a hit (faiss' rule), so a search may return fewer than k hits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retribert_jax import embedding_dir
from retribert_jax.corpus import RepeatedIds, id_string
from retribert_jax.errors import MissingDependency

BACKENDS = embedding_dir.BACKENDS
QUERY_CHUNK = 256  # queries scored at once: bounds the [queries, block] score matrix


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


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _block_topk(queries: jax.Array, block: jax.Array, valid: jax.Array, offset: jax.Array, k: int,
                recall_target: float | None):
    """Top-k (scores, global rows) of one corpus block; rows at or past `valid` are padding. A NaN score (a NaN row
    or query) is no score: that row is never a hit, as in faiss; a slot without a hit has row -1 and score -inf."""
    scores = jnp.einsum("qp,np->qn", queries, block.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)  # Q N
    ok = (jnp.arange(block.shape[0])[None, :] < valid) & ~jnp.isnan(scores)  # Q N
    scores = jnp.where(ok, scores, -jnp.inf)
    if recall_target is None:
        top, idx = jax.lax.top_k(scores, k)  # Q k; ties: lower row first
    else:
        top, idx = jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    return top, jnp.where(jnp.take_along_axis(ok, idx, axis=1), idx + offset, -1)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge(s1: jax.Array, i1: jax.Array, s2: jax.Array, i2: jax.Array, k: int):
    s = jnp.concatenate([s1, s2], axis=1)
    i = jnp.concatenate([i1, i2], axis=1)
    # top_k is stable on ties, and the running best (earlier rows) comes first: lower rows win, as in one top-k
    # over the whole corpus.
    top, pos = jax.lax.top_k(s, k)
    return top, jnp.take_along_axis(i, pos, axis=1)


def _rank(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidates in the total order (score descending, row ascending), the first k; a slot without a
    hit (row -1) has score -inf and comes last."""
    scores = np.where(rows < 0, -np.inf, scores)
    order = np.lexsort((rows, rows < 0, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class Index:
    """An embedding directory opened for exact inner-product search; the shards stay memory-mapped.

    Args:
      directory: the output of `retribert-jax embed`.
      backend: "jax" (blocked jitted matmul + top-k on the default device) or "faiss" (an `IndexFlatIP` built from
        the shards; needs `pip install faiss-cpu`, and holds the corpus in memory).
      block_size: corpus rows scored per block by the jax backend.
      recall_target: jax backend only: None (default) for exact top-k; a value in (0, 1] uses
        `jax.lax.approx_max_k` with that recall target, which is approximate on TPU and exact elsewhere.
    """

    def __init__(self, directory: str, *, backend: str = "jax", block_size: int = 65536,
                 recall_target: float | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if recall_target is not None and not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        if backend == "faiss":
            _faiss()  # fail now, not after the model is loaded
        self.directory = directory
        self.manifest = embedding_dir.read_manifest(directory)
        self.backend, self.block_size, self.recall_target = backend, block_size, recall_target
        self.shards = embedding_dir.open_shards(directory, self.manifest)
        self._ids = embedding_dir.row_files(directory, self.manifest, "ids")
        self._texts = embedding_dir.row_files(directory, self.manifest, "texts") if self.manifest["has_text"] else []
        self._faiss = None

    def __len__(self) -> int:
        return self.manifest["count"]

    @property
    def dim(self) -> int:
        return self.manifest["projection_dim"]

    def check_model(self, model) -> None:
        """Refuses a model other than the one that embedded the index, or a question index.

        Args:
          model: a `RetriBertModel` or an `Encoder` (its architecture and, where the manifest records one, its
            weights' fingerprint are compared), or a `RetriBertConfig` (the architecture alone).

        Raises:
          ValueError: a question index, another architecture, or other weights (both models named).
        """
        from retribert_jax.params import weights_fingerprint

        m = self.manifest
        if m["kind"] != "passages":
            raise ValueError(f"{self.directory}: holds {m['kind']} embeddings; searching needs passages")
        model = getattr(model, "model", model)  # an Encoder's model
        config = getattr(model, "config", model)
        if m["config_hash"] != config.architecture_hash():
            raise ValueError(f"{self.directory}: embedded by a model with config hash {m['config_hash']} "
                             f"({m['model']}), but this model's is {config.architecture_hash()}")
        if "weights_fingerprint" in m and model is not config:
            mine = weights_fingerprint(model)
            if mine != m["weights_fingerprint"]:
                raise ValueError(f"{self.directory}: embedded by {m['model']} (weights fingerprint "
                                 f"{m['weights_fingerprint']}), but this model's weights differ (fingerprint {mine}); "
                                 "search with the model that embedded the index, or embed the corpus again")

    def _search_jax(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = jnp.asarray(q, dtype=jnp.float32)
        best_s = jnp.full((q.shape[0], k), -jnp.inf, dtype=jnp.float32)
        best_i = jnp.full((q.shape[0], k), -1, dtype=jnp.int32)
        # One block shape for the whole corpus, hence one compilation: the short last block is padded.
        width = min(self.block_size, len(self))
        start = 0
        for shard in self.shards:
            for s in range(0, shard.shape[0], self.block_size):
                rows = shard[s:s + self.block_size]
                n = rows.shape[0]
                block = np.zeros((width, self.dim), dtype=rows.dtype)
                block[:n] = rows
                top, idx = _block_topk(queries, block, n, start + s, k=min(k, width),
                                       recall_target=self.recall_target)
                best_s, best_i = _merge(best_s, best_i, top, idx.astype(jnp.int32), k=k)
            start += shard.shape[0]
        return np.asarray(best_s), np.asarray(best_i)

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self._faiss is None:
            index = faiss.IndexFlatIP(self.dim)
            for shard in self.shards:
                for s in range(0, shard.shape[0], self.block_size):
                    index.add(np.ascontiguousarray(shard[s:s + self.block_size], dtype=np.float32))
            self._faiss = index
        q = np.ascontiguousarray(q, dtype=np.float32)
        # faiss orders equal scores as its heap leaves them. Ask for one more than k: where the (k+1)-th ties with
        # the k-th, the tie may run past k, so search deeper until it ends, then apply the total order.
        depth = min(k + 1, len(self))
        scores, rows = self._faiss.search(q, depth)
        while depth < len(self):
            # faiss never returns a row whose score is NaN: its empty slots (row -1) are not a tie.
            open_tie = (scores[:, -1] == scores[:, k - 1]) & (rows[:, -1] >= 0)
            if not open_tie.any():
                break
            depth = min(2 * depth, len(self))
            scores, rows = self._faiss.search(q, depth)
        return _rank(scores, rows, k)

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The top-k rows for each query embedding.

        Args:
          queries: float [Q, projection_dim] (or [projection_dim] for one query).
          k: hits per query (capped at the corpus size).

        Returns:
          One list of `Hit`s per query, in the index's total order (score descending, row ascending). A row whose
          score is NaN (a NaN embedding, or a NaN query) is never a hit, as faiss never returns one, so a query may
          get fewer than k hits.

        Raises:
          ValueError: queries of the wrong width, or k <= 0.
        """
        scores, rows = self.search_rows(queries, k)
        return [self._hits(r[r >= 0], s[r >= 0]) for s, r in zip(scores, rows, strict=True)]

    def search_rows(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Like `search_embeddings`, as arrays: float32 scores [Q, k'] and int corpus rows [Q, k'], k' = min(k, N);
        where a query has fewer than k' hits (NaN scores), the slots left have row -1 and score -inf, last."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries have shape {np.shape(queries)}, expected [n, {self.dim}]")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self))
        if q.shape[0] == 0 or k == 0:
            return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)
        parts = []
        for s in range(0, q.shape[0], QUERY_CHUNK):
            part = q[s:s + QUERY_CHUNK]  # S P
            if self.backend == "faiss":
                parts.append(self._search_faiss(part, k))
                continue
            # Padded to a power of two, so that any number of queries compiles a handful of programs.
            rows = min(QUERY_CHUNK, 1 << max(0, (part.shape[0] - 1).bit_length()))
            padded = np.zeros((rows, q.shape[1]), np.float32)
            padded[:part.shape[0]] = part
            top, idx = self._search_jax(padded, k)
            parts.append((top[:part.shape[0]], idx[:part.shape[0]]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)

    def rows(self, rows: Sequence[int], what: str = "ids") -> list[Any]:
        """The ids (or, with what="texts", the texts) of corpus rows, in the order given, one file read per shard."""
        files = self._ids if what == "ids" else self._texts
        if what == "texts" and not files:
            raise ValueError(f"{self.directory}: the index stores no texts (embed it with --store-text)")
        size = self.manifest["shard_size"]
        by_shard: dict[int, list[int]] = {}
        for pos, row in enumerate(rows):
            by_shard.setdefault(int(row) // size, []).append(pos)
        out: list[Any] = [None] * len(rows)
        for shard, positions in by_shard.items():
            values = files[shard].get([int(rows[p]) - shard * size for p in positions])
            for p, v in zip(positions, values, strict=True):
                out[p] = v
        return out

    def iter_ids(self) -> Iterator[Any]:
        """Every row's id, in row order, read sequentially (what a pass over the whole index wants)."""
        for f in self._ids:
            yield from f

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        ids = self.rows(rows)
        texts = self.rows(rows, "texts") if self._texts else [None] * len(ids)
        return [Hit(id=i, score=float(s), text=t) for i, s, t in zip(ids, scores, texts, strict=True)]

    def search(self, encoder, questions: str | Sequence[str], k: int = 10, *, batch_size: int | None = None,
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


def build_index(encoder, passages: Sequence[str], directory: str, *, ids: Sequence[Any] | None = None,
                store_text: bool = True, batch_size: int | None = None, max_length: int = 128, normalize: bool = False,
                shard_size: int = 100_000, overwrite: bool = False) -> Index:
    """Embeds passages into an embedding directory (the layout `retribert-jax embed` writes) and opens it: the job
    of `embed` (`embedding_job.embed_corpus`), for corpora that fit in a Python list.

    Args:
      encoder: an `Encoder`; its model's config is recorded so that searching with another model is refused.
      passages: the texts, in corpus order.
      directory: where to write; an existing one is refused unless `overwrite`.
      ids: one JSON-serialisable id per passage (default: 0-based row numbers).
      store_text: keep the texts beside the embeddings (what `mine` and readable hits need).
      batch_size, max_length, normalize: passed to `encoder.encode_passages`.
      shard_size: rows per shard.

    Returns:
      The `Index` over the new directory (jax backend).

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False.
      ValueError: no passages, not as many ids as passages, or an id given twice (as text: 7 and "7" are one).
    """
    import shutil

    from retribert_jax.embedding_job import embed_corpus
    from retribert_jax.io import check_overwrite

    passages = list(passages)
    if not passages:
        raise ValueError(f"{directory}: no passages to index")
    ids = list(range(len(passages))) if ids is None else list(ids)
    if len(ids) != len(passages):
        raise ValueError(f"{len(ids)} ids for {len(passages)} passages")
    repeats = RepeatedIds(lambda: enumerate(ids))
    for i, v in enumerate(ids):
        first = repeats.first_position(i, v)
        if first is not None:
            raise ValueError(f"ids[{i}] ({id_string(v)!r}) repeats ids[{first}]; ids must be unique, and are compared "
                             f"as text (7 and \"7\" are one id)")
    check_overwrite(directory, overwrite)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    embed_corpus(encoder, zip(ids, passages, strict=True), directory, kind="passages",
                 model="in-memory (build_index)", shard_size=shard_size, batch_size=batch_size,
                 max_length=max_length, normalize=normalize, store_text=store_text)
    return Index(directory)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("the faiss backend needs faiss: pip install 'retribert_jax[faiss]'") from None
    return faiss
