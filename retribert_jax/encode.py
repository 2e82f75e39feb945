"""Fast batch embedding: tokenize once, sort by length, pack into fixed (batch, length) buckets, run data parallel.

Every batch that reaches the jitted forward has one of a handful of shapes: the row count is `batch_size` rounded
up to a multiple of the device count (or a smaller power-of-two multiple of it for inputs shorter than one batch),
and the length is the smallest of `BUCKET_LENGTHS` (capped at `max_length`) that holds the batch's longest text. A
whole corpus therefore compiles a few programs, and the last, partial batch is padded rather than recompiled.

The batch is split over a 1-D "data" mesh of this process's devices (`NamedSharding(mesh, P("data"))`), the
parameters are replicated on it once, when the Encoder is built. Under `jax.distributed` the mesh is still the local
devices: each process embeds its own texts and nothing crosses hosts.

Padding never changes a row's numbers: padded keys get exactly zero attention weight and every other op is
row-wise, so results agree with encoding each text alone (to float32 rounding of differently-shaped matmuls).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retribert_jax.modeling import RetriBertModel, abstract_model, embed_batch
from retribert_jax.tokenizer import RetriBertTokenizer

# Steps of 16 tokens up to 128, then 32 and 64 (multiples of 16 suit TPU/GPU tiles). On a large sorted corpus of real
# text (benchmarks/data.py's lengths) the padded work is 8.5% over the real tokens at max_length 128 and 12% at 512,
# against 13% and 22% with 1.5x/2x steps, for at most 8 programs per kind up to length 128 (14 up to 512).
BUCKET_LENGTHS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
KINDS = ("questions", "passages")

def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory`, so a later process skips XLA compilation."""
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program: ours take seconds on CPU, below JAX's default threshold of one second on some machines.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def bucket_length(n_tokens: int, max_length: int, lengths: Sequence[int] = BUCKET_LENGTHS) -> int:
    """The smallest bucket length >= n_tokens, where `max_length` itself is always a bucket."""
    for b in lengths:
        if n_tokens <= b < max_length:
            return b
    return max_length


class Encoder:
    """Embeds questions and passages with a RetriBertModel, in the manner of sentence-transformers' `encode`."""

    def __init__(self, model: RetriBertModel, tokenizer: RetriBertTokenizer, *, dtype: Any = jnp.float32,
                 mesh: jax.sharding.Mesh | None = None, bucket_lengths: Sequence[int] = BUCKET_LENGTHS,
                 compilation_cache_dir: str | None = None):
        """Places the parameters on the mesh once.

        Args:
          model: the model (its parameters are copied to the devices; the model itself is left as it is).
          tokenizer: the model's tokenizer.
          dtype: compute dtype, float32 or bfloat16 (parameters stay float32; outputs are float32).
          mesh: a 1-D mesh with a "data" axis; default: every local device of this process.
          bucket_lengths: the padded lengths batches may have (plus `max_length`).
          compilation_cache_dir: turns on JAX's persistent compilation cache there.
        """
        if compilation_cache_dir:
            enable_compilation_cache(compilation_cache_dir)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"Encoder dtype must be float32 or bfloat16, got {dtype}")
        if mesh is None:
            devices = jax.local_devices()
            # Auto axes: the compiler propagates the batch sharding through the model (no explicit-mode annotations).
            mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                 devices=devices)
        if "data" not in mesh.axis_names:
            raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.dtype = dtype
        self.mesh = mesh
        self.bucket_lengths = tuple(sorted(bucket_lengths))
        self.num_devices = mesh.shape["data"]
        self._data_sharding = NamedSharding(mesh, P("data"))
        graphdef, state = nnx.split(model)
        attention_impl = model.bert_query.encoder.layer[0].attention.self.attention_impl
        # The compute dtype lives in the graph (the Linear layers' `dtype`), so another dtype is another graphdef over
        # the same parameters.
        graphdef, _ = nnx.split(abstract_model(self.config, dtype=dtype, attention_impl=attention_impl))
        self._graphdef = graphdef
        self._state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated, once
        self._fn = jax.jit(embed_batch, static_argnames=("graphdef", "kind"), out_shardings=self._data_sharding)
        # Ahead-of-time compiled programs by (kind, rows, length): compiling explicitly lets us count and time it.
        self._compiled: dict[tuple[str, int, int], Any] = {}
        self.compile_seconds = 0.0

    @property
    def shapes_seen(self) -> set[tuple[str, int, int]]:
        """The (kind, batch rows, length) of every program this Encoder has compiled."""
        return set(self._compiled)

    @property
    def compile_count(self) -> int:
        """Programs this Encoder has compiled (or loaded from the persistent cache): one per (kind, rows, length)."""
        return len(self._compiled)

    def _program(self, kind: str, rows: int, length: int):
        key = (kind, rows, length)
        if key not in self._compiled:
            spec = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._data_sharding)
            start = time.perf_counter()
            self._compiled[key] = self._fn.lower(self._graphdef, self._state, spec, spec, kind=kind).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

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
        """Passage (answer) embeddings through the document encoder; same arguments as `encode_questions`."""
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

    def plan(self, lengths: np.ndarray, batch_size: int, max_length: int) -> list[tuple[np.ndarray, int, int]]:
        """Batches as (row indices into the input, padded rows, padded length), longest texts first."""
        n = len(lengths)
        ndev = self.num_devices
        rows = max(ndev, math.ceil(batch_size / ndev) * ndev)
        if n < rows:  # a short input: the smallest power-of-two multiple of the device count that holds it
            rows = min(rows, ndev * 2 ** math.ceil(math.log2(max(1, math.ceil(n / ndev)))))
        # Stable sort, longest first: equal lengths keep input order, so the plan depends only on the lengths.
        order = np.argsort(-lengths, kind="stable")
        return [(order[s:s + rows], rows, bucket_length(int(lengths[order[s]]), max_length, self.bucket_lengths))
                for s in range(0, n, rows)]

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
        batches = self.plan(lengths, batch_size, max_length)
        model_kind = "questions" if kind == "questions" else "answers"
        pad_id = self.tokenizer.pad_token_id
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit=kind[:-1] if kind.endswith("s") else kind, desc=f"encoding {kind}")
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                rows_idx, result = pending.pop(0)
                out[rows_idx] = np.asarray(result)[:len(rows_idx)]
                if bar is not None:
                    bar.update(len(rows_idx))

        for rows_idx, rows, length in batches:
            input_ids = np.full((rows, length), pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, i in enumerate(rows_idx):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            # Padding rows attend to one token so that every row is well defined; their outputs are dropped.
            mask[len(rows_idx):, 0] = 1
            program = self._program(model_kind, rows, length)
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
