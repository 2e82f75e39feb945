"""Fast batch embedding: tokenize once, sort by length, pack into (rows, length) buckets fitted to the job, run data
parallel, compile ahead.

Every batch that reaches the jitted forward (`modeling.embed`) has one of a few shapes: the row count is
`batch_size` rounded up to a multiple of the device count (or a smaller power-of-two multiple of it for inputs
shorter than one batch), and the length is one of the buckets `compilation.fit_buckets` chose for this job from its
real lengths: a small job compiles few programs, a large corpus keeps fine buckets. The last, partial batch is
padded rather than recompiled. Programs the job needs are compiled on a background thread in the order the batches
need them, so compilation overlaps with the batches already running; JAX's persistent compilation cache, when on,
turns a second run's compilations into loads.

The batch is split over a 1-D "data" mesh of this process's devices (`mesh.data_mesh`), the parameters are
replicated on it once, when the Encoder is built. Under `jax.distributed` the mesh is still the local devices: each
process embeds its own texts and nothing crosses hosts.

Padding never changes a row's numbers: padded keys get exactly zero attention weight and every other op is
row-wise, so results agree with encoding each text alone (to float32 rounding of differently-shaped matmuls).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retribert_jax.compilation import BUCKET_LENGTHS, CompileCost, bucket_length, cache_hits, fit_buckets
from retribert_jax.mesh import batch_sharding, data_mesh, replicated
from retribert_jax.modeling import KINDS, RetriBertModel, abstract_model, embed, flops_per_sequence
from retribert_jax.tokenizer import RetriBertTokenizer

Plan = list[tuple[np.ndarray, int, int]]  # (row indices into the input, padded rows, padded length) per batch


class Encoder:
    """Embeds questions and passages with a RetriBertModel, in the manner of sentence-transformers' `encode`.

    Args:
      model: the model (its parameters are copied to the devices; the model itself is left as it is).
      tokenizer: the model's tokenizer.
      dtype: compute dtype, float32 or bfloat16 (parameters stay float32; outputs are float32).
      mesh: a 1-D mesh with a "data" axis; default: every local device of this process.
      bucket_lengths: the padded lengths batches may have (plus `max_length`).
      compilation_cache_dir: turns on JAX's persistent compilation cache there (see
        `compilation.enable_compilation_cache`; off by default in the library, on by default on the command line).
      compile_cost: what a new program costs against padded compute, for fitting buckets to a job; default:
        `CompileCost.for_platform` of the mesh's devices.
    """

    def __init__(self, model: RetriBertModel, tokenizer: RetriBertTokenizer, *, dtype: Any = jnp.float32,
                 mesh: jax.sharding.Mesh | None = None, bucket_lengths: Sequence[int] = BUCKET_LENGTHS,
                 compilation_cache_dir: str | None = None, compile_cost: CompileCost | None = None):
        if compilation_cache_dir:
            from retribert_jax.compilation import enable_compilation_cache

            enable_compilation_cache(compilation_cache_dir)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"Encoder dtype must be float32 or bfloat16, got {dtype}")
        mesh = mesh if mesh is not None else data_mesh(jax.local_devices())
        if "data" not in mesh.axis_names:
            raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.dtype, self.mesh = dtype, mesh
        self.bucket_lengths = tuple(sorted(bucket_lengths))
        self.num_devices = mesh.shape["data"]
        self.compile_cost = compile_cost or CompileCost.for_platform(mesh.devices.flat[0].platform,
                                                                     self.num_devices)
        self._data_sharding = batch_sharding(mesh)
        _, state = nnx.split(model)
        attention_impl = model.bert_query.encoder.layer.attention.self.attention_impl
        # The compute dtype lives in the graph (the Linear layers' `dtype`), so another dtype is another graphdef over
        # the same parameters.
        self._graphdef, _ = nnx.split(abstract_model(self.config, dtype=dtype, attention_impl=attention_impl))
        self._state = jax.device_put(state, replicated(mesh))  # replicated, once
        # Programs by (kind, rows, length), compiled ahead of need on one background thread.
        self._programs: dict[tuple[str, int, int], concurrent.futures.Future] = {}
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self.compile_seconds = 0.0  # summed over programs (on the background thread, partly hidden by compute)
        self.programs_from_cache = 0

    @property
    def shapes_seen(self) -> set[tuple[str, int, int]]:
        """The (kind, batch rows, length) of every program this Encoder has compiled or is compiling."""
        return set(self._programs)

    @property
    def compile_count(self) -> int:
        """Programs this Encoder has obtained (compiled, or loaded from the persistent cache): one per shape."""
        return len(self._programs)

    def _compile(self, kind: str, rows: int, length: int):
        spec = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._data_sharding)
        start, hits = time.perf_counter(), cache_hits()
        program = embed.lower(self._graphdef, self._state, spec, spec, kind=kind).compile()
        self.compile_seconds += time.perf_counter() - start
        self.programs_from_cache += cache_hits() > hits  # the hit counter is this (the compiling) thread's
        return program

    def _request(self, key: tuple[str, int, int]) -> concurrent.futures.Future:
        if key not in self._programs:
            if self._compiler is None:
                self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retribert-compile")
            self._programs[key] = self._compiler.submit(self._compile, *key)
        return self._programs[key]

    def encode_questions(self, texts: str | Sequence[str], batch_size: int = 32, max_length: int = 128,
                         show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """Question embeddings through `bert_query` and `project_query`.

        Args:
          texts: one string or a list of strings (an empty string is embedded as [CLS] [SEP], as HF does).
          batch_size: rows per forward call (rounded up to a multiple of the device count).
          max_length: truncation length in tokens, [CLS] and [SEP] included.
          show_progress_bar: a tqdm bar over the texts.
          normalize: L2-normalise each vector.

        Returns:
          float32 [N, projection_dim] in input order; [projection_dim] for a single string.
        """
        return self.encode(texts, "questions", batch_size, max_length, show_progress_bar, normalize)

    def encode_passages(self, texts: str | Sequence[str], batch_size: int = 32, max_length: int = 128,
                        show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """Passage embeddings through the document encoder and `project_doc`; same arguments as `encode_questions`."""
        return self.encode(texts, "passages", batch_size, max_length, show_progress_bar, normalize)

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, truncated to `max_length` with [CLS] and [SEP], unpadded."""
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"text {bad} is a {type(texts[bad]).__name__}, not a str")
        backend = self.tokenizer.backend
        backend.enable_truncation(max_length)
        try:
            # encode_batch_fast skips the character offsets we do not use.
            fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in fast(list(texts), add_special_tokens=True)]
        finally:
            backend.no_truncation()

    def plan(self, lengths: np.ndarray, batch_size: int, max_length: int, kind: str = "passages") -> Plan:
        """Batches as (row indices into the input, padded rows, padded length), longest texts first.

        The lengths are fitted to the job (`compilation.fit_buckets`), counting programs this Encoder already has as
        free; the plan depends only on the lengths, the arguments and those programs.
        """
        n = len(lengths)
        ndev = self.num_devices
        rows = max(ndev, math.ceil(batch_size / ndev) * ndev)
        if n < rows:  # a short input: the smallest power-of-two multiple of the device count that holds it
            rows = min(rows, ndev * 2 ** math.ceil(math.log2(max(1, math.ceil(n / ndev)))))
        # Stable sort, longest first: equal lengths keep input order, so the plan depends only on the lengths.
        order = np.argsort(-lengths, kind="stable")
        groups = [order[s:s + rows] for s in range(0, n, rows)]
        longest = [int(lengths[g[0]]) for g in groups]
        have = [length for (k, r, length) in self._programs if k == kind and r == rows]
        buckets = fit_buckets(longest, rows, max_length, lambda length: flops_per_sequence(self.config, length),
                              self.compile_cost, compiled=have, candidates=self.bucket_lengths)
        return [(g, rows, bucket_length(m, buckets)) for g, m in zip(groups, longest, strict=True)]

    def encode(self, texts: str | Sequence[str], kind: str, batch_size: int = 32, max_length: int = 128,
               show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """`encode_questions` (kind="questions") or `encode_passages` (kind="passages")."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {self.config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_length}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        out = np.zeros((len(texts), self.config.projection_dim), np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts, max_length)
        lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
        batches = self.plan(lengths, batch_size, max_length, kind)
        for _, rows, length in batches:  # in the order the batches need them
            self._request((kind, rows, length))
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit=kind[:-1], desc=f"encoding {kind}")
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                rows_idx, result = pending.pop(0)
                out[rows_idx] = np.asarray(result)[:len(rows_idx)]
                if bar is not None:
                    bar.update(len(rows_idx))

        pad_id = self.tokenizer.pad_token_id
        for rows_idx, rows, length in batches:
            input_ids = np.full((rows, length), pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, i in enumerate(rows_idx):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            # Padding rows attend to one token so that every row is well defined; their outputs are dropped.
            mask[len(rows_idx):, 0] = 1
            program = self._request((kind, rows, length)).result()
            result = program(self._state, jax.device_put(input_ids, self._data_sharding),
                             jax.device_put(mask, self._data_sharding))
            pending.append((rows_idx, result))
            # Dispatch is asynchronous: filling the next batch overlaps with this one's compute.
            drain(keep=1)
        drain(keep=0)
        if bar is not None:
            bar.close()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out
