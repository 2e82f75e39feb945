"""Top-k inner-product search over an embedding directory (`embedding_dir`), on the devices of a mesh.

The shards stay memory-mapped. The jax backend places the rows on the mesh, split over its "data" axis across every
device of every process (`Index(mesh=...)`), and streams them from the memory map in passes when they do not fit.
Each device finds its rows' exact top-k (`topk.screened_topk`: a screen, a shortlist and an exact float32 rescoring,
at the speed of the matrix product; `topk.blocked_topk` where the screen does not apply); the per-device lists are
gathered and merged exactly, so every mesh returns what one device does. Scores are plain inner products, as faiss'
`IndexFlatIP` (the ELI5 retriever's index) computes them; `backend="faiss"` runs that index itself.

A compressed copy (`quantization`: int8 or binary, `Index(scan=...)`) is scanned instead of the float rows for a
shortlist, which is rescored exactly from the float vectors on disk: less device memory, approximate recall.

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
from jax.sharding import PartitionSpec as P

from retribert_jax import compilation, embedding_dir, quantization, topk
from retribert_jax.config import SEARCH_COMPILER_OPTIONS
from retribert_jax.corpus import RepeatedIds
from retribert_jax.embedding_dir import id_string
from retribert_jax.errors import MissingDependency
from retribert_jax.mesh import batch_sharding, data_mesh, replicated

BACKENDS = embedding_dir.BACKENDS
SCANS = embedding_dir.SCANS
QUERY_CHUNK = 256  # queries searched at once: bounds the [queries, block] score matrix
SCREEN_MIN_ROWS = 4 * topk.SCREEN_BLOCK  # rows per device below which the blocked path is as quick
MAX_SCREEN_K = 1024  # a larger k takes the blocked path
# The longest shortlist (groups) a query is searched again with before the blocked path: 16,384 rows.
MAX_SCREEN_CANDIDATES = 2048
# Rows a compressed scan shortlists per device at most: the gathered codes of that many groups of 8 rows, for 256
# queries, are 134 MB (binary, scored by table lookup) to 1 GiB (int8, and 2 GiB more as bfloat16 for the product).
MAX_SHORTLIST_ROWS = 4096


def default_screen_dtype() -> str:
    """ "float32" on CPUs, "bfloat16" on accelerators (predicted faster there: their bfloat16 matmul rate is twice
    the float32 one). On a 2-core Xeon with AMX and AVX512-BF16 (1M x 128 rows, 1,000 queries, k = 100) XLA's
    product in the screen's [2048, 128] blocks ran slower in bfloat16 than in float32 (0.73 vs 0.53 s per 256
    queries), and the bfloat16 bound left 30% of the queries unproven, searched again: 9.3 s against 3.7 s."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def screen_candidates(k: int, screen_dtype: str) -> int:
    """Groups the screen shortlists for k hits: a float32 screen's bound is tight, so about k groups qualify (one
    an eighth more leaves room for near-ties); a bfloat16 screen's wider bound lets more through."""
    if screen_dtype == "float32":
        return -(-(k + max(8, k // 8)) // 8) * 8
    return _pow2(2 * k)


def shortlist_rows(k: int, rescore_multiplier: int) -> int:
    """Rows a compressed scan shortlists per device for k hits: `k * rescore_multiplier`, as sentence-transformers'
    rescore_multiplier, at most `MAX_SHORTLIST_ROWS`. The screen shortlists as many groups as rows: the best groups
    by their best row are the only ones sure to hold the best rows."""
    return min(k * rescore_multiplier, MAX_SHORTLIST_ROWS)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this process."""
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass(frozen=True)
class _Pass:
    """Rows [start, stop) of the index on the mesh, [devices * per_device, width], split over "data"; `screen`: the
    exact path may screen them; `block`: the blocked path's block; `norm`: per device, its rows' largest norm and
    largest rounding residual in the screen's dtype."""

    start: int
    stop: int
    rows: jax.Array
    norm: jax.Array  # [devices, 2] float32: each device's largest row norm and rounding residual (`screen_bound`)
    screen: bool
    block: int


@functools.lru_cache(maxsize=64)
def _mesh_program(mesh: jax.sharding.Mesh, kind: str, **static):
    """The jitted search of rows split over the mesh's "data" axis: each device searches its own rows with
    `topk` (kind "screened", "blocked" or "shortlist"), row numbers made global, and the per-device lists gathered;
    hits are merged exactly (devices hold consecutive rows, so one stable top-k keeps the total order), shortlists
    by their approximate scores. Compiled with `config.SEARCH_COMPILER_OPTIONS`. Arguments: (queries [Q, D]
    replicated, rows split over "data", n real rows, extra): extra is the query transform [D, D] (replicated) for a
    shortlist, the per-device (row norm, rounding residual) [devices, 2] (split) for the screen, and unused by the
    blocked path."""

    def local(queries, rows, n, extra):
        device = jax.lax.axis_index("data")
        per_device = rows.shape[0]
        valid = jnp.clip(n - device * per_device, 0, per_device).astype(jnp.int32)
        offset = device * per_device

        def gather(x):
            return jax.lax.all_gather(x, "data", axis=1, tiled=True)

        if kind == "shortlist":
            top, hit = topk.compressed_shortlist(queries, rows, valid, extra, **static)
            hit = jnp.where(hit >= 0, hit + offset, -1)
            if mesh.shape["data"] == 1:  # one list: merging it would sort it again
                return top, hit
            return topk.merge_topk(gather(top), gather(hit), static["rows_out"])
        if kind == "screened":
            top, hit, exact, needed = topk.screened_topk(queries, rows, valid, extra[0, 0], extra[0, 1], **static)
        else:
            top, hit = topk.blocked_topk(queries, rows, valid, **static)
        hit = jnp.where(hit >= 0, hit + offset, -1)
        top, hit = topk.merge_topk(gather(top), gather(hit), static["k"])
        if kind == "blocked":
            return top, hit
        return top, hit, jax.lax.pmin(exact.astype(jnp.int32), "data") > 0, jax.lax.pmax(needed, "data")

    specs = (P(), P("data"), P(), P("data") if kind == "screened" else P())
    platform = mesh.devices.flat[0].platform
    options = compilation.supported_options(platform, SEARCH_COMPILER_OPTIONS.get(platform, {}))
    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False),
        compiler_options=options or None,
    )


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


def _rank(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidates in the total order (score descending, row ascending), the first k; a slot without a
    hit (row -1) has score -inf and comes last."""
    scores = np.where(rows < 0, -np.inf, scores)
    if scores.shape[1] > 2 * k:
        # Only what can be among the first k is sorted: every candidate scoring at least the k-th best score (all
        # of a tie at the k-th included), found by partitions rather than a sort of every candidate.
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        width = int((scores >= kth).sum(axis=1).max())
        if width < scores.shape[1]:
            keep = np.argpartition(-scores, width - 1, axis=1)[:, :width]
            scores, rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
    order = np.lexsort((rows, rows < 0, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class Index:
    """An embedding directory opened for top-k inner-product search; the shards stay memory-mapped.

    Args:
      directory: the output of `retribert-jax embed`.
      backend: "jax" (the rows on the devices of `mesh`, searched by `topk`) or "faiss" (an `IndexFlatIP` built
        from the shards; needs `pip install faiss-cpu`, and holds the corpus in memory).
      mesh: jax backend: the devices that hold the rows, split over its "data" axis (default `mesh.data_mesh()`:
        every device of every process; in a multi-process run every process searches the same queries together).
      scan: jax backend: "float" (exact), or "int8" / "binary" to scan the compressed copy (`retribert-jax
        compress`) for a shortlist, rescored exactly from the float vectors on disk.
      rescore_multiplier: scan "int8"/"binary": the shortlist is the `rescore_multiplier * k` best rows by the
        approximate score, as sentence-transformers' `rescore_multiplier` (at most 4,096 rows per device,
        `shortlist_rows`; see `topk.compressed_shortlist`).
      max_device_rows: jax backend: rows held per device at once; a larger index is streamed from the memory map in
        passes of that many rows per device, the next pass's transfer overlapping the current one's search. Default:
        every row at once on a CPU; on an accelerator, what fits in half its memory.
      block_size: rows scored at once by the plain blocked path (`topk.blocked_topk`, used for small shards, a k
        above 1024, and queries whose screen could not prove its result).
      recall_target: jax backend: None (default) for exact top-k; a value in (0, 1] makes the blocked path use
        `jax.lax.approx_max_k`, which is approximate on TPU and exact elsewhere.
      screen_dtype: the exact path's screen: "bfloat16" or "float32" (default `default_screen_dtype()`: float32 on
        CPUs, bfloat16 on accelerators). Either way the result is exact.

    Raises:
      ValueError: a bad argument, or a shard that disagrees with the manifest (named).
      FileNotFoundError: a missing shard, float copy included.
    """

    def __init__(
        self,
        directory: str,
        *,
        backend: str = "jax",
        mesh: jax.sharding.Mesh | None = None,
        scan: str = "float",
        rescore_multiplier: int = 4,
        max_device_rows: int | None = None,
        block_size: int = 65536,
        recall_target: float | None = None,
        screen_dtype: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if recall_target is not None and not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        if rescore_multiplier <= 0:
            raise ValueError(f"rescore_multiplier must be positive, got {rescore_multiplier}")
        if max_device_rows is not None and max_device_rows <= 0:
            raise ValueError(f"max_device_rows must be positive, got {max_device_rows}")
        if screen_dtype is not None and screen_dtype not in topk.SCREEN_DTYPES:
            raise ValueError(f"screen_dtype must be one of {sorted(topk.SCREEN_DTYPES)}, got {screen_dtype!r}")
        if backend == "faiss":
            _faiss()  # fail now, not after the model is loaded
        self.directory = directory
        self.manifest = embedding_dir.read_manifest(directory)
        self.backend, self.block_size, self.recall_target = backend, block_size, recall_target
        self.scan, self.rescore_multiplier = scan, rescore_multiplier
        self.shards = embedding_dir.open_shards(directory, self.manifest)
        self.codes = embedding_dir.open_codes(directory, self.manifest, scan) if scan != "float" else None
        # The compressed scan's query transform (`quantization.query_weights`), [D, D].
        self._query_weights = (
            quantization.query_weights(
                scan,
                embedding_dir.calibration(self.manifest, scan),
                embedding_dir.binary_matrix(directory, self.manifest, "decoder") if scan == "binary" else None,
            )
            if scan != "float"
            else None
        )
        self._ids = embedding_dir.row_files(directory, self.manifest, "ids")
        self._texts = embedding_dir.row_files(directory, self.manifest, "texts") if self.manifest["has_text"] else []
        self._faiss = None
        self._mesh, self._max_device_rows = mesh, max_device_rows
        self.screen_dtype = screen_dtype
        self._resident: _Pass | None = None

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
            raise ValueError(
                f"{self.directory}: embedded by a model with config hash {m['config_hash']} "
                f"({m['model']}), but this model's is {config.architecture_hash()}"
            )
        if "weights_fingerprint" in m and model is not config:
            mine = weights_fingerprint(model)
            if mine != m["weights_fingerprint"]:
                raise ValueError(
                    f"{self.directory}: embedded by {m['model']} (weights fingerprint "
                    f"{m['weights_fingerprint']}), but this model's weights differ (fingerprint {mine}); "
                    "search with the model that embedded the index, or embed the corpus again"
                )

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The devices holding the rows (jax backend)."""
        if self._mesh is None:
            self._mesh = data_mesh()
        return self._mesh

    def _rows_per_pass(self) -> int:
        """Rows of the index held on the mesh at once."""
        per_device = self._max_device_rows
        if per_device is None:
            device = self.mesh.devices.flat[0]
            limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
            if limit is None:
                return len(self)
            width = self.codes[0].shape[1] * self.codes[0].dtype.itemsize if self.codes else self.dim * 4
            # Each row also costs the screen one float per query per fine group (`topk.screened_topk`).
            per_device = max(1, limit // 2 // (width + QUERY_CHUNK * 4 // topk.SCREEN_GROUP))
        return min(len(self), per_device * self.mesh.size)

    def _read(self, start: int, stop: int, pad_to: int) -> np.ndarray:
        """Rows [start, stop) of what the scan reads (float shards, or the compressed copy), zero-padded to
        `pad_to` rows."""
        source = self.codes if self.codes is not None else self.shards
        size = self.manifest["shard_size"]
        out = np.zeros((pad_to, source[0].shape[1]), dtype=source[0].dtype)
        pos = start
        while pos < stop:
            shard, at = divmod(pos, size)
            take = min(stop - pos, source[shard].shape[0] - at)
            out[pos - start : pos - start + take] = source[shard][at : at + take]
            pos += take
        return out

    def _place(self, start: int, stop: int) -> _Pass:
        """Rows [start, stop) on the mesh: split over its "data" axis, each device's part padded alike."""
        mesh = self.mesh
        per_device = -(-(stop - start) // mesh.size)
        screen = self.scan != "float" or (per_device >= SCREEN_MIN_ROWS and self.block_size % topk.SCREEN_BLOCK == 0)
        unit = topk.SCREEN_BLOCK if screen else 1
        block = topk.SCREEN_BLOCK if self.scan != "float" else min(self.block_size, -(-per_device // unit) * unit)
        local = -(-per_device // block) * block
        width = (self.codes or self.shards)[0].shape[1]
        # Device position -> its rows' largest norm and rounding residual (what bound its screen's error).
        norms: dict[int, tuple[float, float]] = {}
        screen_dtype = self._screen_dtype()

        def read(index: tuple[slice, ...]) -> np.ndarray:
            a = index[0].start or 0
            b = index[0].stop if index[0].stop is not None else mesh.size * local
            rows = self._read(min(start + a, stop), min(start + b, stop), b - a)
            if self.codes is None:
                residual = topk.row_residual(rows, screen_dtype) if screen else 0.0
                norms[a // local] = (topk.row_norm(rows), residual)
            return rows

        rows = jax.make_array_from_callback((mesh.size * local, width), batch_sharding(mesh), read)
        norm = jax.make_array_from_callback(
            (mesh.size, 2),
            batch_sharding(mesh),
            lambda index: np.asarray([norms.get(d, (0.0, 0.0)) for d in range(mesh.size)], np.float32)[index],
        )
        return _Pass(start, stop, rows, norm, screen, block)

    def _passes(self) -> Iterator[_Pass]:
        """The index on the mesh, pass by pass: kept when it fits at once, else streamed (the next pass placed while
        the caller searches the current one)."""
        step = self._rows_per_pass()
        if step >= len(self):
            if self._resident is None:
                self._resident = self._place(0, len(self))
            yield self._resident
            return
        for start in range(0, len(self), step):
            yield self._place(start, min(start + step, len(self)))

    def _search_jax(self, q: np.ndarray, k: int, real: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over every pass, merged in the total order, for queries q [Q, D] of which the first `real` are
        real (the rest, padding, are never searched again). The search of a pass is dispatched before the next
        pass is read from disk, so the two overlap."""
        mesh = self.mesh
        queries = jax.make_array_from_callback(q.shape, replicated(mesh), lambda index: q[index])
        results, pending = [], None
        for placed in self._passes():
            dispatched = (placed, self._dispatch(queries, placed, k))
            if pending is not None:
                results.append(self._collect(q, *pending, k, real))
            pending = dispatched
        results.append(self._collect(q, *pending, k, real))
        scores = np.concatenate([r[0] for r in results], axis=1)
        rows = np.concatenate([r[1] for r in results], axis=1)
        return _rank(scores, rows, k) if len(results) > 1 else (scores, rows)

    def _dispatch(self, queries: jax.Array, placed: _Pass, k: int):
        """Starts the search of one pass (asynchronously, as JAX dispatches)."""
        n = np.int32(placed.stop - placed.start)
        if self.scan != "float":
            wanted = shortlist_rows(k, self.rescore_multiplier)
            fn = _mesh_program(
                self.mesh,
                "shortlist",
                form=self.scan,
                rows_out=wanted,
                candidates=wanted,
                screen_dtype=self._screen_dtype(),
            )
            return fn(queries, placed.rows, n, self._query_weights)
        if placed.screen and k <= MAX_SCREEN_K:
            return _mesh_program(
                self.mesh,
                "screened",
                k=k,
                candidates=screen_candidates(k, self._screen_dtype()),
                screen_dtype=self._screen_dtype(),
            )(queries, placed.rows, n, placed.norm)
        return _mesh_program(self.mesh, "blocked", k=k, block=placed.block, recall_target=self.recall_target)(
            queries, placed.rows, n, placed.norm
        )

    def _screen_dtype(self) -> str:
        return self.screen_dtype or default_screen_dtype()

    def _collect(self, q: np.ndarray, placed: _Pass, out, k: int, real: int) -> tuple[np.ndarray, np.ndarray]:
        """One pass's hits as host arrays with index rows; real queries (the first `real`) that the screen could
        not prove are searched again (with a longer shortlist, or by the blocked path); a compressed scan's
        shortlist is rescored here."""
        if self.scan != "float":
            rows = _host(out[1])[:real]  # padding queries are not rescored
            return self._rescore(q[:real], np.where(rows >= 0, rows.astype(np.int64) + placed.start, -1), k)
        if len(out) == 2:
            scores, rows = _host(out[0]), _host(out[1])
        else:
            scores, rows, exact, needed = (_host(x) for x in out)
            scores, rows, exact = scores.copy(), rows.copy(), exact.copy()
            # A padding query (all zeros: every score ties) is never proven, and its hits are dropped anyway.
            exact[real:] = True
            for redo, retry in self._retries(exact, needed, screen_candidates(k, self._screen_dtype())):
                sub = np.zeros((_pow2(len(redo)), q.shape[1]), np.float32)
                sub[: len(redo)] = q[redo]
                sub_q = jax.make_array_from_callback(
                    sub.shape, replicated(self.mesh), lambda index, sub=sub: sub[index]
                )
                n = np.int32(placed.stop - placed.start)
                fn = (
                    _mesh_program(self.mesh, "blocked", k=k, block=placed.block, recall_target=self.recall_target)
                    if retry is None
                    else _mesh_program(self.mesh, "screened", k=k, candidates=retry, screen_dtype=self._screen_dtype())
                )
                again = fn(sub_q, placed.rows, n, placed.norm)
                scores[redo], rows[redo] = _host(again[0])[: len(redo)], _host(again[1])[: len(redo)]
        return scores, np.where(rows >= 0, rows.astype(np.int64) + placed.start, -1)

    @staticmethod
    def _retries(exact: np.ndarray, needed: np.ndarray, candidates: int) -> Iterator[tuple[np.ndarray, int | None]]:
        """The queries to search again: (positions, a longer shortlist), or (positions, None) for the blocked path."""
        bad = np.flatnonzero(~exact)
        if not bad.size:
            return
        # A shortlist at least `needed` long proves the result; past the longest, the blocked path does.
        longer = bad[(needed[bad] > candidates) & (needed[bad] <= MAX_SCREEN_CANDIDATES)]
        if longer.size:
            yield longer, min(_pow2(int(needed[longer].max())), MAX_SCREEN_CANDIDATES)
        rest = np.setdiff1d(bad, longer)
        if rest.size:
            yield rest, None

    def _rescore(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact float32 scores of a compressed scan's shortlist ([Q, M] index rows; past the end: none), from the
        float vectors on disk; the k best in the total order."""
        valid = (rows >= 0) & (rows < len(self))
        wanted = np.unique(rows[valid])
        vectors = np.empty((wanted.size, self.dim), np.float32)
        size = self.manifest["shard_size"]
        for shard in np.unique(wanted // size):
            at = np.flatnonzero(wanted // size == shard)
            vectors[at] = self.shards[shard][wanted[at] - shard * size]
        position = np.zeros(len(self), np.int32)  # each shortlisted row's place in `wanted`
        position[wanted] = np.arange(wanted.size)
        where = position[np.where(valid, rows, 0)]
        # One dot product per (query, row), each summed the same way: equal rows (duplicate passages) get equal
        # scores, so their tie goes to the lower row. A matrix product's kernels round by a column's place in it.
        scores = np.einsum("qd,qnd->qn", q, vectors[where]) if wanted.size else np.zeros(rows.shape, np.float32)
        scores = np.where(valid & ~np.isnan(scores), scores, -np.inf).astype(np.float32)
        return _rank(scores, np.where(valid & (scores > -np.inf), rows, -1), k)

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self._faiss is None:
            index = faiss.IndexFlatIP(self.dim)
            for shard in self.shards:
                for s in range(0, shard.shape[0], self.block_size):
                    index.add(np.ascontiguousarray(shard[s : s + self.block_size], dtype=np.float32))
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
            part = q[s : s + QUERY_CHUNK]  # S P
            if self.backend == "faiss":
                parts.append(self._search_faiss(part, k))
                continue
            # Padded to a power of two, so that any number of queries compiles a handful of programs.
            rows = min(QUERY_CHUNK, _pow2(part.shape[0]))
            padded = np.zeros((rows, q.shape[1]), np.float32)
            padded[: part.shape[0]] = part
            top, idx = self._search_jax(padded, k, real=part.shape[0])
            parts.append((top[: part.shape[0]], idx[: part.shape[0]]))
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

    def search(
        self,
        encoder,
        questions: str | Sequence[str],
        k: int = 10,
        *,
        batch_size: int | None = None,
        max_length: int = 128,
    ) -> list[Hit] | list[list[Hit]]:
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
        q = encoder.encode_questions(
            texts, batch_size=batch_size, max_length=max_length, normalize=self.manifest["normalized"]
        )
        hits = self.search_embeddings(np.atleast_2d(q), k)
        return hits[0] if single else hits


def build_index(
    encoder,
    passages: Sequence[str],
    directory: str,
    *,
    ids: Sequence[Any] | None = None,
    store_text: bool = True,
    batch_size: int | None = None,
    max_length: int = 128,
    normalize: bool = False,
    shard_size: int = 100_000,
    overwrite: bool = False,
) -> Index:
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
            raise ValueError(
                f"ids[{i}] ({id_string(v)!r}) repeats ids[{first}]; ids must be unique, and are compared "
                f'as text (7 and "7" are one id)'
            )
    check_overwrite(directory, overwrite)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    embed_corpus(
        encoder,
        zip(ids, passages, strict=True),
        directory,
        kind="passages",
        model="in-memory (build_index)",
        shard_size=shard_size,
        batch_size=batch_size,
        max_length=max_length,
        normalize=normalize,
        store_text=store_text,
    )
    return Index(directory)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("the faiss backend needs faiss: pip install 'retribert_jax[faiss]'") from None
    return faiss
