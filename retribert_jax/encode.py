"""Fast batch embedding: tokenize once, pack several texts into each row, run data parallel, compile ahead.

Texts are packed (`pack_rows`, best-fit decreasing) into rows of one length per job, the bucket that holds the
longest text: a row holds as many texts as fit, each seeing only its own tokens with its own positions (the packed
rows of `modeling`), so almost no compute goes to padding and a job needs one program, whatever its lengths. Every
batch that reaches the jitted forward (`modeling.embed`) has `batch_size` rows (rounded up to a multiple of the
device count), by default a platform's efficient number of tokens per call (`TOKENS_PER_CALL`); a last, partial
batch pads to a program the job already has when that costs less than compiling one of its own (the smallest
power-of-two multiple of the device count that holds it), as do later jobs on the same Encoder
(`compilation.CompileCost`). A job too short to repay the compilation of the [CLS]-only last layer runs that layer
on every row instead (`BertEncoder.trim_last_layer`: same embeddings, a program ~40% quicker to compile on CPU).
Programs are compiled on a background thread in the order the batches need them (on CPU with
`compilation.CPU_COMPILER_OPTIONS`), and JAX's persistent compilation cache, when on, turns a second run's
compilations into loads.

The batch is split over a 1-D "data" mesh of this process's devices (`mesh.data_mesh`), the parameters are
replicated on it once, when the Encoder is built. Under `jax.distributed` the mesh is still the local devices: each
process embeds its own texts and nothing crosses hosts.

Packing never changes a text's numbers: keys of other texts and of padding get exactly zero attention weight, and
every other op is token-wise, so results agree with encoding each text alone (to float32 rounding of
differently-shaped matmuls).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retribert_jax.compilation import (
    BUCKET_LENGTHS,
    CompileCost,
    bucket_length,
    cache_hits,
    candidate_lengths,
    compile_lowered,
)
from retribert_jax.mesh import batch_sharding, data_mesh, replicated
from retribert_jax.modeling import KINDS, RetriBertModel, abstract_model, embed, flops_per_sequence
from retribert_jax.tokenizer import RetriBertTokenizer

# Tokens per forward call and device when the caller gives no batch size. On a CPU, ~1024 keeps a layer's activations
# in cache: MiniLM at 8 x 128 runs 12% faster per row than at 32 x 128 on a 2-core Xeon (benchmarks/profile_rows.py).
# Accelerators want large batches to fill their matrix units (a prediction until measured on one).
TOKENS_PER_CALL = {"cpu": 1024}
ACCELERATOR_TOKENS_PER_CALL = 16384

# Per batch: its packed rows (each the indices of the texts it holds, in row order), padded rows, row length.
Plan = list[tuple[list[list[int]], int, int]]


def texts_per_row(length: int) -> int:
    """The most texts one packed row of `length` tokens holds: the last layer and the pooler compute this many
    [CLS] rows per packed row whether filled or not, so it stays a small fraction (1/8) of the row's tokens."""
    return max(1, length // 8)


def pack_rows(lengths: Sequence[int] | np.ndarray, row_length: int, max_per_row: int) -> list[list[int]]:
    """Packs texts into rows: best-fit decreasing (each text, longest first, goes to the open row it leaves the
    least room in, or starts a new row), the bin-packing heuristic that Krell et al. (2021, "Efficient Sequence
    Packing without Cross-contamination") pair with per-sequence attention masks and positions for BERT.

    Args:
      lengths: tokens of each text, each in [1, row_length].
      row_length: tokens a row holds.
      max_per_row: texts a row holds at most.

    Returns:
      The rows in the order they were opened (longest texts first), each a list of indices into `lengths`; every
      index appears exactly once. Depends only on `lengths` and the limits (ties keep input order).

    Raises:
      ValueError: a length is outside [1, row_length].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > row_length):
        raise ValueError(f"text lengths must be in [1, {row_length}], got {lengths.min()}..{lengths.max()}")
    rows: list[list[int]] = []
    open_rows: list[list[int]] = [[] for _ in range(row_length + 1)]  # rows with room for more, by free tokens
    smallest = int(lengths.min()) if len(lengths) else 1
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        for free in range(n, row_length + 1):
            if open_rows[free]:
                r = open_rows[free].pop()
                break
        else:
            r, free = len(rows), row_length
            rows.append([])
        rows[r].append(i)
        free -= n
        if len(rows[r]) < max_per_row and free >= smallest:
            open_rows[free].append(r)
    return rows


class Encoder:
    """Embeds questions and passages with a RetriBertModel, in the manner of sentence-transformers' `encode`.

    Args:
      model: the model (its parameters are copied to the devices; the model itself is left as it is).
      tokenizer: the model's tokenizer.
      dtype: compute dtype, float32 or bfloat16 (parameters stay float32; outputs are float32).
      mesh: a 1-D mesh with a "data" axis; default: every local device of this process.
      bucket_lengths: the row lengths a job may pack into (plus `max_length`); a job uses the smallest that holds
        its longest text.
      compilation_cache_dir: turns on JAX's persistent compilation cache there (see
        `compilation.enable_compilation_cache`; off by default in the library, on by default on the command line).
      compile_cost: what a new program costs against padded compute, for deciding when a program this Encoder
        already has (longer rows, more rows) beats compiling one that fits, and whether a job's program trims its
        last layer to the [CLS] rows; default: `CompileCost.for_platform` of the mesh's devices.
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
        platform = self.platform = mesh.devices.flat[0].platform
        self.compile_cost = compile_cost or CompileCost.for_platform(platform, self.num_devices)
        self.tokens_per_call = TOKENS_PER_CALL.get(platform, ACCELERATOR_TOKENS_PER_CALL)
        self._data_sharding = batch_sharding(mesh)
        _, state = nnx.split(model)
        attention_impl = model.bert_query.encoder.layer.attention.self.attention_impl
        # The compute dtype lives in the graph (the Linear layers' `dtype`), so another dtype is another graphdef over
        # the same parameters.
        # The last layer trimmed to the [CLS] rows or not is another graph too (`_trim_last_layer`).
        self._graphdefs = {}
        for trim in (True, False):
            structure = abstract_model(self.config, dtype=dtype, attention_impl=attention_impl)
            for bert in (structure.bert_query, structure.bert_doc):
                if bert is not None:
                    bert.encoder.trim_last_layer = trim
            self._graphdefs[trim], _ = nnx.split(structure)
        self._state = jax.device_put(state, replicated(mesh))  # replicated, once
        # Programs by (kind, rows, length, trimmed last layer), compiled ahead of need on one background thread.
        self._programs: dict[tuple[str, int, int, bool], concurrent.futures.Future] = {}
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self.compile_seconds = 0.0  # summed over programs (on the background thread, partly hidden by compute)
        self.programs_from_cache = 0

    @property
    def shapes_seen(self) -> set[tuple[str, int, int]]:
        """The (kind, batch rows, length) of every program this Encoder has compiled or is compiling."""
        return {key[:3] for key in self._programs}

    @property
    def compile_count(self) -> int:
        """Programs this Encoder has obtained (compiled, or loaded from the persistent cache): one per shape."""
        return len(self._programs)

    def _compile(self, kind: str, rows: int, length: int, trim: bool):
        spec = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._data_sharding)
        cls_spec = jax.ShapeDtypeStruct((rows, texts_per_row(length)), jnp.int32, sharding=self._data_sharding)
        start, hits = time.perf_counter(), cache_hits()
        program = compile_lowered(embed.lower(self._graphdefs[trim], self._state, spec, spec, kind=kind,
                                              position_ids=spec, cls_index=cls_spec), self.platform)
        self.compile_seconds += time.perf_counter() - start
        self.programs_from_cache += cache_hits() > hits  # the hit counter is this (the compiling) thread's
        return program

    def _trim_last_layer(self, kind: str, rows: int, length: int, calls: int) -> bool:
        """Whether the program for `calls` batches of (rows, length) computes the last layer for the [CLS] rows
        alone (`BertEncoder.trim_last_layer`): when that saves more compute than its extra compilation costs, or
        when this Encoder already has that program. Both give the same embeddings."""
        for trim in (True, False):
            if (kind, rows, length, trim) in self._programs:
                return trim
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        # Per row, trimming skips the queries, attention, output projection and FFN of the non-[CLS] tokens.
        saved_flops = (length - texts_per_row(length)) * (4 * d * d + 4 * d * f + 4 * length * d)
        return calls * rows * saved_flops / self.compile_cost.flops_per_second > self.compile_cost.trim_seconds

    def _request(self, key: tuple[str, int, int, bool]) -> concurrent.futures.Future:
        if key not in self._programs:
            if self._compiler is None:
                self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retribert-compile")
            self._programs[key] = self._compiler.submit(self._compile, *key)
        return self._programs[key]

    def encode_questions(self, texts: str | Sequence[str], batch_size: int | None = None, max_length: int = 128,
                         show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """Question embeddings through `bert_query` and `project_query`.

        Args:
          texts: one string or a list of strings (an empty string is embedded as [CLS] [SEP], as HF does).
          batch_size: packed rows per forward call (rounded up to a multiple of the device count); None: the
            platform's `TOKENS_PER_CALL` per device, in rows of this job's row length.
          max_length: truncation length in tokens, [CLS] and [SEP] included.
          show_progress_bar: a tqdm bar over the texts.
          normalize: L2-normalise each vector.

        Returns:
          float32 [N, projection_dim] in input order; [projection_dim] for a single string.
        """
        return self.encode(texts, "questions", batch_size, max_length, show_progress_bar, normalize)

    def encode_passages(self, texts: str | Sequence[str], batch_size: int | None = None, max_length: int = 128,
                        show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """Passage embeddings through the document encoder and `project_doc`; same arguments as `encode_questions`."""
        return self.encode(texts, "passages", batch_size, max_length, show_progress_bar, normalize)

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, truncated to `max_length` with [CLS] and [SEP], unpadded."""
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"text {bad} is a {type(texts[bad]).__name__}, not a str")
        backend = self.tokenizer.backend
        self.tokenizer.enable_truncation(max_length)  # on the tokenizer's side (truncation_side "left" keeps the end)
        try:
            # encode_batch_fast skips the character offsets we do not use.
            fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in fast(list(texts), add_special_tokens=True)]
        finally:
            backend.no_truncation()

    def plan(self, lengths: np.ndarray, batch_size: int | None, max_length: int, kind: str = "passages") -> Plan:
        """Batches of packed rows as (rows of text indices, padded rows, row length), longest texts first.

        The row length is the bucket that holds the longest text, or a longer one this Encoder has already compiled
        when its extra attention compute costs less than a compilation; a last, partial batch likewise reuses a
        program with more rows when the padding costs less than a new program. The plan depends only on the
        lengths, the arguments and the programs this Encoder has.
        """
        if len(lengths) == 0:
            return []
        ndev = self.num_devices
        have = {(r, length) for (k, r, length, _) in self._programs if k == kind}
        cost = self.compile_cost
        tokens, longest = float(lengths.sum()), int(lengths.max())
        length = bucket_length(longest, candidate_lengths(max_length, self.bucket_lengths))
        longer = sorted(n for _, n in have if length < n <= max_length)
        if longer and all(n != length for _, n in have):
            # Per token, a longer row costs only its attention: QK^T and PV, 4 * L * D FLOPs a layer.
            extra = tokens * self.config.num_hidden_layers * 4 * (longer[0] - length) * self.config.hidden_size
            if extra / cost.flops_per_second < cost.compile_seconds:
                length = longer[0]
        if batch_size is None:
            batch_size = ndev * max(1, self.tokens_per_call // length)
        full = max(ndev, math.ceil(batch_size / ndev) * ndev)
        packed = pack_rows(lengths, length, texts_per_row(length))
        row_seconds = flops_per_sequence(self.config, length) / cost.flops_per_second
        plan: Plan = []
        for start in range(0, len(packed), full):
            group = packed[start:start + full]
            rows = full
            if len(group) < full:
                rows = min(full, ndev * 2 ** math.ceil(math.log2(math.ceil(len(group) / ndev))))
                # Padding to a bigger program already planned or compiled, when that costs less than compiling one.
                bigger = sorted(r for r, n in have | {(p[1], p[2]) for p in plan} if n == length and r > rows)
                if (rows, length) not in have and bigger and (bigger[0] - rows) * row_seconds < cost.compile_seconds:
                    rows = bigger[0]
            plan.append((group, rows, length))
        return plan

    def encode(self, texts: str | Sequence[str], kind: str, batch_size: int | None = None, max_length: int = 128,
               show_progress_bar: bool = False, normalize: bool = False) -> np.ndarray:
        """`encode_questions` (kind="questions") or `encode_passages` (kind="passages")."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if batch_size is not None and batch_size <= 0:
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
        calls = collections.Counter((rows, length) for _, rows, length in batches)
        trim = {shape: self._trim_last_layer(kind, *shape, n) for shape, n in calls.items()}
        for _, rows, length in batches:  # in the order the batches need them
            self._request((kind, rows, length, trim[rows, length]))
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit=kind[:-1], desc=f"encoding {kind}")
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                index, result = pending.pop(0)
                filled = index >= 0
                out[index[filled]] = np.asarray(result)[filled]
                if bar is not None:
                    bar.update(int(filled.sum()))

        pad_id = self.tokenizer.pad_token_id
        put = functools.partial(jax.device_put, device=self._data_sharding)
        for packed, rows, length in batches:
            input_ids = np.full((rows, length), pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            position_ids = np.zeros((rows, length), np.int32)
            cls_index = np.zeros((rows, texts_per_row(length)), np.int32)
            index = np.full(cls_index.shape, -1, np.int64)  # the text each [CLS] slot embeds; -1: none
            for r, row in enumerate(packed):
                start = 0
                for j, i in enumerate(row):
                    n = int(lengths[i])
                    input_ids[r, start:start + n] = ids[i]
                    mask[r, start:start + n] = 1
                    position_ids[r, start:start + n] = np.arange(n)
                    cls_index[r, j], index[r, j] = start, i
                    start += n
            # Empty padding rows attend to one token so that every row is well defined; their outputs are dropped.
            mask[len(packed):, 0] = 1
            program = self._request((kind, rows, length, trim[rows, length])).result()
            result = program(self._state, put(input_ids), put(mask), position_ids=put(position_ids),
                             cls_index=put(cls_index))
            pending.append((index, result))
            # Dispatch is asynchronous: filling the next batch overlaps with this one's compute.
            drain(keep=1)
        drain(keep=0)
        if bar is not None:
            bar.close()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out
