"""Fast batch embedding: tokenize once, pack several texts into each row, run data parallel, keep the host off the
device's critical path.

A text that occurs several times in a job is tokenized and embedded once. Texts are tokenized in chunks on background
threads while the device runs the batches of the chunk before (a very long text cut first to a prefix that gives the
same ids, `tokenizer.prefix_cutter`), and packed (`packing.pack_rows`, best-fit decreasing) into rows of one length per
job, the bucket that holds the longest text of the first chunk (a later text too long for it goes to rows of
`max_length`): a row holds as many texts as fit, each seeing only its own tokens with its own positions (the packed rows
of `modeling`), so almost no compute goes to padding and a job needs one program, whatever its lengths. Rows left over
from a chunk join the next chunk's, so only a job's last batch is partial. Every batch that reaches the jitted forward
(`modeling.embed`) has `batch_size` rows (rounded up to a multiple of the device count), by default a platform's
efficient number of tokens per call (`TOKENS_PER_CALL`); a last, partial batch pads to a program the job already has
when that costs less than compiling one of its own (the smallest power-of-two multiple of the device count that holds
it), as do later jobs on the same Encoder (`compilation.CompileCost`). A job too short to repay the compilation of the
[CLS]-only last layer runs that layer on every row instead (`RunConfig.trim_last_layer`: same embeddings, a program ~40%
quicker to compile on CPU). Programs are compiled on a background thread in the order the batches need them, each as the
model's `RunConfig` says (its compiler options; its matmul precision, or else the one in force on the thread that called
`encode`), and JAX's persistent compilation cache, when on, turns a second run's compilations into loads.

The batch is split over a 1-D "data" mesh of this process's devices (`mesh.data_mesh`), the parameters are
replicated on it once, when the Encoder is built. Under `jax.distributed` the mesh is still the local devices: each
process embeds its own texts and nothing crosses hosts.

Packing never changes a text's numbers: keys of other texts and of padding get exactly zero attention weight, and
every other op is token-wise, so results agree with encoding each text alone (to float32 rounding of
differently-shaped matmuls). The one exception is a text whose own numbers are not finite (a corrupted embedding
row): 0 x NaN is NaN in the attention's matmul, so it would reach the other texts of its row; those texts are
embedded again one to a row, and only the text that is NaN alone stays NaN.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retribert_jax.compilation import (
    CompileCost,
    bucket_length,
    cache_hits,
    candidate_lengths,
    compile_lowered,
)
from retribert_jax.config import precision_name
from retribert_jax.mesh import batch_sharding, data_mesh, replicated
from retribert_jax.modeling import KINDS, RetriBertModel, abstract_model, embed, flops_per_sequence
from retribert_jax.packing import PackedBatch, TokenBuffer, TokenIds, build_batch, pack_rows, texts_per_row
from retribert_jax.tokenizer import RetriBertTokenizer, check_vocabulary, prefix_cutter

# Tokens per forward call and device when the caller gives no batch size. On a CPU, a call's activations should stay
# in cache: MiniLM (hidden 384) at 8 x 128 runs 12% faster per row than at 32 x 128 on a 2-core Xeon
# (benchmarks/profiling.py rows), so a call holds about 1024 x 384 activations, and at least 1024 tokens; a smaller
# model then takes more tokens a call rather than paying the call's fixed cost more often. Accelerators want large
# batches to fill their matrix units and few calls: on an H200, RetriBERT-base on 20,000 real texts ran 30.4k texts/s
# at 512 rows of 128 tokens a call and 28.5k at 1024 (and 20.1k at 128 rows with the host path before it was
# pipelined; README, "The accelerator path").
CPU_ACTIVATIONS_PER_CALL = 1024 * 384
# A CPU call also has a fixed cost, about 1 ms on 2 cores (XLA:CPU runs each of the program's ~40 kernels as a task
# on its thread pool and waits for it; the host builds and files the batch): a call should carry ~10 ms of work to
# hide it, 1e9 nominal FLOPs at `CompileCost`'s 1e11 FLOP/s. Only narrow, shallow models reach that bound: the 1-layer,
# 32-wide model of `benchmarks/host_rate.py` (whose 37 us a row that rate predicts, 29-41 us measured) ran 15% less
# CPU time a row at 384 rows a call than at 96, and MiniLM reaches 1e9 FLOPs in 45 tokens.
CPU_FLOPS_PER_CALL = 1e9
TOKENS_PER_CALL = {"cpu": 1024}
ACCELERATOR_TOKENS_PER_CALL = 512 * 128
# Texts tokenized per chunk: a smaller first chunk so that the device starts soon, then larger ones, several ahead.
FIRST_CHUNK_TEXTS, CHUNK_TEXTS, CHUNKS_AHEAD = 2048, 4096, 3

# Per batch: its packed rows (each the indices of the texts it holds, in row order), padded rows, row length.
Plan = list[tuple[list[list[int]], int, int]]


class Encoder:
    """Embeds questions and passages with a RetriBertModel, in the manner of sentence-transformers' `encode`.

    The Encoder runs the model as its `RunConfig` says (compute and residual dtypes, matmul precision, attention
    kernel, compiler options); `dtype` and `precision` change that for this Encoder alone, with a warning that says
    so.

    Args:
      model: the model (its parameters are copied to the devices; the model itself is left as it is).
      tokenizer: the model's tokenizer.
      dtype: compute dtype, "float32" or "bfloat16"; None (default): the model's (`model.run_config.dtype`).
      precision: matmul precision, "default", "high" or "highest"; None (default): the model's, and if that is None
        too, JAX's default on the thread that calls `encode` (so `with jax.default_matmul_precision(...)` around a
        call holds, though the programs compile on another thread).
      mesh: a 1-D mesh with a "data" axis; default: every local device of this process.
      compilation_cache_dir: turns on JAX's persistent compilation cache there (see
        `compilation.enable_compilation_cache`; off by default in the library, on by default on the command line).
      compile_cost: what a new program costs against padded compute, for deciding when a program this Encoder
        already has (longer rows, more rows) beats compiling one that fits, and whether a job's program trims its
        last layer to the [CLS] rows; default: `CompileCost.for_platform` of the mesh's devices.

    Raises:
      ValueError: a dtype or precision outside its choices, or a mesh without a "data" axis.
    """

    def __init__(
        self,
        model: RetriBertModel,
        tokenizer: RetriBertTokenizer,
        *,
        dtype: Any = None,
        precision: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        compilation_cache_dir: str | None = None,
        compile_cost: CompileCost | None = None,
    ):
        if compilation_cache_dir:
            from retribert_jax.compilation import enable_compilation_cache

            enable_compilation_cache(compilation_cache_dir)
        own = model.run_config
        run = own.with_overrides(dtype=dtype, precision=precision)
        if run != own:
            changed = ", ".join(
                f"{k} {getattr(run, k)!r} instead of its {getattr(own, k)!r}"
                for k in ("dtype", "precision")
                if getattr(run, k) != getattr(own, k)
            )
            warnings.warn(
                f"Encoder: running the model with {changed} (load the model with these settings to run "
                "it so everywhere)",
                stacklevel=2,
            )
        mesh = mesh if mesh is not None else data_mesh(jax.local_devices())
        if "data" not in mesh.axis_names:
            raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.run_config, self.mesh = run, mesh
        self.num_devices = mesh.shape["data"]
        platform = self.platform = mesh.devices.flat[0].platform
        self.compile_cost = compile_cost or CompileCost.for_platform(platform, self.num_devices)
        self.tokens_per_call = TOKENS_PER_CALL.get(platform, ACCELERATOR_TOKENS_PER_CALL)
        if platform == "cpu":
            flops_per_token = flops_per_sequence(self.config, 128) / 128
            self.tokens_per_call = max(
                self.tokens_per_call,
                CPU_ACTIVATIONS_PER_CALL // self.config.hidden_size,
                int(CPU_FLOPS_PER_CALL / flops_per_token),
            )
        self._data_sharding = batch_sharding(mesh)
        self._state = jax.device_put(nnx.state(model), replicated(mesh))  # replicated, once
        # A private copy of the tokenizer's backend: truncation is set per call, and the user's stays untouched.
        self._backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
        # The run settings live in the graph, so each (trimmed last layer, precision) is a graphdef of its own over
        # the same parameters.
        self._graphdefs: dict[tuple[bool, str | None], nnx.GraphDef] = {}
        # Programs by (kind, rows, length, trimmed last layer, precision), compiled ahead of need on one thread.
        self._programs: dict[tuple[str, int, int, bool, str | None], concurrent.futures.Future] = {}
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self._tokenizer_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._cut = None  # `tokenizer.prefix_cutter` for the current job's max_length
        self.compile_seconds = 0.0  # summed over programs (on the background thread, partly hidden by compute)
        self.programs_from_cache = 0

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype this Encoder runs the model in (`run_config.dtype`)."""
        return jnp.dtype(self.run_config.dtype)

    @property
    def shapes_seen(self) -> set[tuple[str, int, int]]:
        """The (kind, batch rows, length) of every program this Encoder has compiled or is compiling: for tests and
        diagnostics (which programs a job planned); the Encoder itself reads `_programs`."""
        return {key[:3] for key in self._programs}

    @property
    def compile_count(self) -> int:
        """Programs this Encoder has obtained (compiled, or loaded from the persistent cache): one per shape."""
        return len(self._programs)

    def _precision(self) -> str | None:
        """The matmul precision of this call's programs: the run config's, else the calling thread's default."""
        return self.run_config.precision or precision_name(jax.config.jax_default_matmul_precision)

    def _graphdef(self, trim: bool, precision: str | None) -> nnx.GraphDef:
        if (trim, precision) not in self._graphdefs:
            run = self.run_config.replace(trim_last_layer=trim, precision=precision)
            self._graphdefs[trim, precision], _ = nnx.split(abstract_model(self.config, run_config=run))
        return self._graphdefs[trim, precision]

    def _compile(self, kind: str, rows: int, length: int, trim: bool, precision: str | None):
        spec = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._data_sharding)
        cls_spec = jax.ShapeDtypeStruct((rows, texts_per_row(length)), jnp.int32, sharding=self._data_sharding)
        start, hits = time.perf_counter(), cache_hits()
        lowered = embed.lower(
            self._graphdef(trim, precision), self._state, spec, spec, kind=kind, position_ids=spec, cls_index=cls_spec
        )
        program = compile_lowered(lowered, self.platform, self.run_config.compiler_options(self.platform))
        self.compile_seconds += time.perf_counter() - start
        self.programs_from_cache += cache_hits() > hits  # the hit counter is this (the compiling) thread's
        return program

    def _trim_last_layer(self, kind: str, rows: int, length: int, calls: int) -> bool:
        """Whether the program for `calls` batches of (rows, length) computes the last layer for the [CLS] rows
        alone (`RunConfig.trim_last_layer`): when that saves more compute than its extra compilation costs, or
        when this Encoder already has that program. Both give the same embeddings."""
        if not self.run_config.trim_last_layer:
            return False
        for trim in (True, False):
            if any(key[:4] == (kind, rows, length, trim) for key in self._programs):
                return trim
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        # Per row, trimming skips the queries, attention (its matmuls and its softmax's scores), output projection
        # and FFN of the non-[CLS] tokens.
        skipped = calls * rows * (length - texts_per_row(length))
        saved = self.compile_cost.seconds(
            skipped * (4 * d * d + 4 * d * f + 4 * length * d), skipped * cfg.num_attention_heads * length
        )
        return saved > self.compile_cost.trim_seconds

    def _request(self, key: tuple[str, int, int, bool, str | None]) -> concurrent.futures.Future:
        if key not in self._programs:
            if self._compiler is None:
                self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retribert-compile")
            self._programs[key] = self._compiler.submit(self._compile, *key)
        return self._programs[key]

    def encode_questions(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int = 128,
        show_progress_bar: bool = False,
        normalize: bool = False,
    ) -> np.ndarray:
        """Question embeddings through `bert_query` and `project_query`.

        Args:
          texts: one string or a list of strings (an empty string is embedded as [CLS] [SEP], as HF does).
          batch_size: packed rows per forward call (rounded up to a multiple of the device count); None: the
            platform's `TOKENS_PER_CALL` per device, in rows of this job's row length.
          max_length: truncation length in tokens, [CLS] and [SEP] included.
          show_progress_bar: a tqdm bar over the texts.
          normalize: L2-normalise each vector.

        Returns:
          float32 [N, projection_dim] in input order; [projection_dim] for a single string. A text that occurs more
          than once is tokenized and embedded once, and its rows are copies.
        """
        return self.encode(texts, "questions", batch_size, max_length, show_progress_bar, normalize)

    def encode_passages(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int = 128,
        show_progress_bar: bool = False,
        normalize: bool = False,
    ) -> np.ndarray:
        """Passage embeddings through the document encoder and `project_doc`; same arguments as `encode_questions`."""
        return self.encode(texts, "passages", batch_size, max_length, show_progress_bar, normalize)

    def token_ids(self, texts: Sequence[str], max_length: int) -> TokenIds:
        """Token ids of `texts`, truncated to `max_length` with [CLS] and [SEP], unpadded (`packing.TokenIds`).

        Raises:
          TypeError: a text that is not a str, named by its index.
        """
        _check_texts(texts)
        self._truncate_at(max_length)
        return self._encode_ids(texts)

    def _truncate_at(self, max_length: int) -> None:
        # On the tokenizer's side: truncation_side "left" keeps a long text's end, as HF does. Set once per job:
        # the chunks' threads share the backend, which must not change under them.
        self._backend.enable_truncation(max_length, direction=self.tokenizer.truncation_side)
        self._cut = prefix_cutter(self._backend, max_length, self.tokenizer.truncation_side)

    def _encode_ids(self, texts: Sequence[str]) -> TokenIds:
        """Token ids of texts already checked to be strings (by `token_ids` or `encode`, which name the bad one by
        its index in the caller's list, not in a chunk)."""
        # encode_batch_fast skips the character offsets we do not use.
        fast = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        texts, cut = list(texts), []
        if self._cut is not None:  # long texts tokenized from a prefix with the same first tokens
            for i, text in enumerate(texts):
                prefix = self._cut(text)
                if prefix is not None:
                    texts[i] = prefix
                    cut.append((i, text))
        encodings = fast(texts, add_special_tokens=True)
        redo = [(i, text) for i, text in cut if not encodings[i].overflowing]  # the prefix held too few tokens
        if redo:
            for (i, _), e in zip(redo, fast([text for _, text in redo], add_special_tokens=True), strict=True):
                encodings[i] = e
        return TokenIds.from_lists([e.ids for e in encodings])

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text as lists (see `token_ids`)."""
        ids = self.token_ids(texts, max_length)
        return [ids.ids(i) for i in range(len(ids))]

    def _chunks(self, texts: Sequence[str], max_length: int) -> Iterator[tuple[int, TokenIds]]:
        """(first text's index, its chunk's token ids), in order, tokenized on background threads while the caller
        works on earlier chunks. Two threads: while one turns a chunk's encodings into arrays (Python, under the
        GIL), the other's chunk is in the tokenizer's Rust code, which releases the GIL and runs on all cores."""
        if self._tokenizer_thread is None:
            self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="retribert-tokenize")
        self._truncate_at(max_length)
        bounds = [0, min(len(texts), FIRST_CHUNK_TEXTS)]
        while bounds[-1] < len(texts):
            bounds.append(min(len(texts), bounds[-1] + CHUNK_TEXTS))
        spans = iter(zip(bounds[:-1], bounds[1:], strict=True))
        ahead: collections.deque = collections.deque()

        def submit(span: tuple[int, int] | None) -> None:
            if span is not None:
                a, b = span
                ahead.append((a, self._tokenizer_thread.submit(self._encode_ids, texts[a:b])))

        for _ in range(CHUNKS_AHEAD):
            submit(next(spans, None))
        try:
            while ahead:
                first, future = ahead.popleft()
                submit(next(spans, None))
                yield first, future.result()
        finally:  # an abandoned job (an error downstream) leaves no chunk tokenizing under the next job's settings
            for _, future in ahead:
                future.cancel()
            concurrent.futures.wait([future for _, future in ahead])

    def plan(self, lengths: np.ndarray, batch_size: int | None, max_length: int, kind: str = "passages") -> Plan:
        """Batches of packed rows as (rows of text indices, padded rows, row length), longest texts first, for a
        job whose texts have these token `lengths` (what `encode` runs when the job is one chunk).

        The row length is the bucket that holds the longest text, or a longer one this Encoder has already compiled
        when its extra attention compute costs less than a compilation; a last, partial batch likewise reuses a
        program with more rows when the padding costs less than a new program. The plan depends only on the
        lengths, the arguments and the programs this Encoder has.
        """
        planner = _Planner(self, kind, batch_size, max_length, len(lengths))
        if len(lengths) == 0:
            return []
        return planner.add(np.asarray(lengths, np.int64), 0) + planner.finish()

    def encode(
        self,
        texts: str | Sequence[str],
        kind: str,
        batch_size: int | None = None,
        max_length: int = 128,
        show_progress_bar: bool = False,
        normalize: bool = False,
    ) -> np.ndarray:
        """`encode_questions` (kind="questions") or `encode_passages` (kind="passages")."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_length must be in [2, {self.config.max_position_embeddings}] (the model's "
                f"max_position_embeddings), got {max_length}"
            )
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        _check_texts(texts)
        # A text that occurs several times (corpora repeat boilerplate, questions repeat) is tokenized and embedded
        # once: its embedding does not depend on the other texts.
        first: dict[str, int] = {}
        inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), np.int64, count=len(texts))
        unique = list(first) if len(first) < len(texts) else texts
        out = np.zeros((len(unique), self.config.projection_dim), np.float32)
        if unique:
            bar = None
            if show_progress_bar:
                from tqdm.auto import tqdm

                repeats = f" ({len(texts) - len(unique)} repeated texts embedded once)" if unique is not texts else ""
                bar = tqdm(total=len(unique), unit=kind[:-1], desc=f"encoding {kind}{repeats}")
            try:
                self._run_job(unique, kind, batch_size, max_length, out, bar)
            finally:
                if bar is not None:
                    bar.close()
        if unique is not texts:
            out = out[inverse]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out

    def _run_job(
        self,
        texts: list[str],
        kind: str,
        batch_size: int | None,
        max_length: int,
        out: np.ndarray,
        bar: Any,
        alone: bool = False,
    ) -> None:
        """Tokenizes, plans and runs `texts` into `out` (rows in input order); `alone`: one text per row."""
        planner = _Planner(self, kind, batch_size, max_length, len(texts), alone=alone)
        runner = _Runner(self, kind, self._precision(), out, bar)
        ids = TokenBuffer()
        for first, chunk in self._chunks(texts, max_length):
            check_vocabulary(
                chunk.flat,
                self.config.vocab_size,
                self._backend,
                lambda i, first=first, chunk=chunk: f"text {first + np.searchsorted(chunk.offsets, i, 'right') - 1}",
            )
            ids.append(chunk)
            for batch in planner.add(chunk.lengths, first):
                runner.run(ids.view(), *batch, planner)
        for batch in planner.finish():
            runner.run(ids.view(), *batch, planner)
        runner.drain(keep=0)
        if not alone:
            bad = np.flatnonzero(~np.isfinite(out).all(axis=1) & runner.texts_in_shared_rows)
            if len(bad):
                # Not finite perhaps only because a row-mate is (0 x NaN in attention): again, one text to a row.
                again = np.zeros((len(bad), out.shape[1]), np.float32)
                self._run_job([texts[i] for i in bad], kind, batch_size, max_length, again, None, alone=True)
                out[bad] = again


def _check_texts(texts: Sequence[Any]) -> None:
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"text {bad} is a {type(texts[bad]).__name__}, not a str")


class _Planner:
    """Turns a job's token lengths, chunk by chunk, into batches of packed rows (see `Encoder.plan`): rows of one
    length per job where the texts allow, full batches as soon as they are full, partial ones at `finish`."""

    def __init__(
        self, enc: Encoder, kind: str, batch_size: int | None, max_length: int, total_texts: int, alone: bool = False
    ):
        self.enc, self.kind, self.max_length, self.total = enc, kind, max_length, total_texts
        self.batch_size, self.alone = batch_size, alone
        self.length: int | None = None
        self.pending: dict[int, list[list[int]]] = {}  # row length -> packed rows not yet in a batch
        self.planned: set[tuple[int, int]] = set()  # (rows, length) of the batches handed out
        self.trim: dict[tuple[int, int], bool] = {}
        self.seen = 0

    def _have(self) -> set[tuple[int, int]]:
        return {(r, n) for (k, r, n, *_) in self.enc._programs if k == self.kind}

    def _row_length(self, lengths: np.ndarray) -> int:
        """The job's row length from its first chunk: the bucket of the longest text, or a longer program this
        Encoder has when its extra attention costs less than a compilation."""
        cfg, cost, have = self.enc.config, self.enc.compile_cost, self._have()
        length = bucket_length(int(lengths.max()), candidate_lengths(self.max_length))
        longer = sorted(n for _, n in have if length < n <= self.max_length)
        if longer and all(n != length for _, n in have):
            tokens = float(lengths.sum()) * self.total / len(lengths)  # the whole job's, estimated
            # Per token, a longer row costs only its attention: QK^T and PV, 4 * L * D FLOPs a layer, and the
            # softmax's H * L scores.
            extra = tokens * cfg.num_hidden_layers * (longer[0] - length)
            if cost.seconds(4 * extra * cfg.hidden_size, extra * cfg.num_attention_heads) < cost.compile_seconds:
                length = longer[0]
        return length

    def full(self, length: int) -> int:
        """Rows of a full batch of `length`-token rows (a multiple of the device count)."""
        ndev = self.enc.num_devices
        batch_size = self.batch_size or ndev * max(1, self.enc.tokens_per_call // length)
        return max(ndev, math.ceil(batch_size / ndev) * ndev)

    def trimmed(self, rows: int, length: int, calls: int) -> bool:
        if (rows, length) not in self.trim:
            self.trim[rows, length] = self.enc._trim_last_layer(self.kind, rows, length, calls)
        return self.trim[rows, length]

    def add(self, lengths: np.ndarray, first: int) -> Plan:
        """The full batches that the chunk of texts `first`, `first + 1`, ... (of these token lengths) completes."""
        if self.length is None:
            self.length = self._row_length(lengths)
            full = self.full(self.length)
            # The whole job's calls, estimated from this chunk, decide the last layer's form.
            rows_per_text = len(pack_rows(lengths, self.length, self._per_row(self.length))) / len(lengths)
            self.trimmed(full, self.length, math.ceil(self.total * rows_per_text / full))
        self.seen += len(lengths)
        # A later text too long for the job's rows goes to rows of max_length: one more program at most, and packing
        # fills those rows all the same.
        row_length = np.where(lengths <= self.length, self.length, self.max_length)
        plan: Plan = []
        for length in sorted(set(row_length.tolist())):
            chosen = np.flatnonzero(row_length == length)
            rows = pack_rows(lengths[chosen], length, self._per_row(length))
            pending = self.pending.setdefault(length, [])
            index = (chosen + first).tolist()  # the job's text indices, as Python ints once
            pending.extend([[index[i] for i in row] for row in rows])
            full = self.full(length)
            while len(pending) >= full:
                plan.append((pending[:full], full, length))
                del pending[:full]
        self.planned.update((rows, length) for _, rows, length in plan)
        return plan

    def _per_row(self, length: int) -> int:
        return 1 if self.alone else texts_per_row(length)

    def finish(self) -> Plan:
        """The partial batches left: each padded to the smallest power-of-two multiple of the device count that
        holds it, or to a bigger program already planned or compiled when that costs less than compiling one."""
        ndev, cost, plan = self.enc.num_devices, self.enc.compile_cost, []
        have = self._have() | self.planned
        for length, pending in sorted(self.pending.items()):
            if not pending:
                continue
            rows = min(self.full(length), ndev * 2 ** math.ceil(math.log2(math.ceil(len(pending) / ndev))))
            row_seconds = flops_per_sequence(self.enc.config, length) / cost.flops_per_second
            bigger = sorted(r for r, n in have if n == length and r > rows)
            if (rows, length) not in have and bigger and (bigger[0] - rows) * row_seconds < cost.compile_seconds:
                rows = bigger[0]
            plan.append((pending, rows, length))
        self.pending = {}
        return plan


class _Runner:
    """Runs planned batches on the device, one in flight while the next is built, and files each output row."""

    def __init__(self, enc: Encoder, kind: str, precision: str | None, out: np.ndarray, bar: Any):
        self.enc, self.kind, self.precision, self.out, self.bar = enc, kind, precision, out, bar
        self.pending: collections.deque[tuple[np.ndarray, jax.Array]] = collections.deque()
        self.texts_in_shared_rows = np.zeros(len(out), bool)

    def run(self, ids: TokenIds, rows: list[list[int]], num_rows: int, length: int, planner: _Planner) -> None:
        """Dispatches one batch; `ids` holds the token ids of the job's texts (what `rows` index)."""
        enc = self.enc
        trim = planner.trimmed(num_rows, length, calls=1)  # a shape not decided yet is a job's last, partial batch
        program = enc._request((self.kind, num_rows, length, trim, self.precision))
        batch: PackedBatch = build_batch(ids, rows, num_rows, length, enc.tokenizer.pad_token_id)
        text_index = batch.text_index
        shared = text_index[(text_index >= 0).sum(axis=1) > 1]
        self.texts_in_shared_rows[shared[shared >= 0]] = True
        arrays = jax.device_put(
            [batch.input_ids, batch.attention_mask, batch.position_ids, batch.cls_index], enc._data_sharding
        )
        result = program.result()(enc._state, arrays[0], arrays[1], position_ids=arrays[2], cls_index=arrays[3])
        self.pending.append((text_index, result))
        # Dispatch is asynchronous: building the next batch overlaps with this one's compute.
        self.drain(keep=1)

    def drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            index, result = self.pending.popleft()
            filled = index >= 0
            self.out[index[filled]] = np.asarray(result)[filled]
            if self.bar is not None:
                self.bar.update(int(filled.sum()))
