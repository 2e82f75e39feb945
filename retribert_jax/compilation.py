"""Which programs a job compiles, and compiling each only once.

Every batch that reaches a jitted forward has a (rows, length) shape, and each new shape is one more XLA program to
compile. The package's padded lengths come from one list (`BUCKET_LENGTHS`, `bucket_length`) and one price of a
program against padded compute (`CompileCost`): the Encoder packs texts into rows of one bucket length per job and
reuses programs when padding costs less than compiling (`encode.Encoder.plan`); training fits a job's padded
lengths to its real length histogram (`fit_buckets`). A program's own compile time is cut where its kernels come
from: per platform, XLA's options (`config.COMPILER_OPTIONS` through `compile_lowered`: the loop emitter on a CPU,
cuBLAS rather than Triton GEMMs on a GPU), and for short jobs a last layer
shaped like the scanned ones (`CompileCost.trim_seconds`; `benchmarks/profiling.py compile` shows the split).
Compiled programs are kept across processes by JAX's persistent compilation cache (`enable_compilation_cache`), and
`cache_hits` tells a program loaded from it from one compiled afresh.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from retribert_jax.config import COMPILER_OPTIONS

# The padded lengths a batch may take: steps of 16 tokens up to 128, then 32 and 64 (multiples of 16 suit TPU/GPU
# tiles), plus max_length itself. A job uses one (packing) or a fitted few (training).
BUCKET_LENGTHS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclasses.dataclass(frozen=True)
class CompileCost:
    """What a new program costs against the compute padding wastes, in seconds: `compile_seconds` for one program,
    `flops_per_second` sustained on padded rows' matmuls, `scores_per_second` for the attention's softmax (one score
    is one query-key pair of one head: masking, max, exp, sum and scaling pass over it at elementwise speed, not the
    matmul's; it outweighs the matmuls in narrow models, whose heads are short), and `trim_seconds`, the part of a
    program's compilation that the [CLS]-only last layer adds (`BertEncoder.trim_last_layer`: its kernels are shaped
    unlike the scanned layer's). Fixed per platform rather than measured, so that the same job always plans the
    same programs (a second run then finds every one in the persistent cache)."""

    compile_seconds: float
    flops_per_second: float
    trim_seconds: float = 0.0
    scores_per_second: float = float("inf")

    @classmethod
    def for_platform(cls, platform: str, num_devices: int = 1) -> CompileCost:
        """Rough figures: XLA compiles a RetriBERT program in ~1 s on a CPU and several on a GPU or TPU, which
        compute 2-4 orders of magnitude faster. The trimmed last layer adds ~0.2-0.3 s to a CPU compilation, ~40% of it
        (measured: `benchmarks/profiling.py compile`); on accelerators a like share is a prediction. A CPU's softmax:
        1e9 scores/s on 2 cores, measured as what trimming a 1-layer, 32-wide model's last layer saved beyond its
        matmul FLOPs at 1e11 FLOP/s (6.4 ms against 3.0 ms predicted, 96 rows of 128 tokens; a 2-core Xeon);
        accelerators fuse it into their attention kernels: 1% of their FLOP rate, predicted."""
        if platform == "cpu":
            return cls(
                compile_seconds=1.0, flops_per_second=1e11 * num_devices, trim_seconds=0.3, scores_per_second=1e9
            )
        if platform == "tpu":
            return cls(
                compile_seconds=10.0, flops_per_second=1e14 * num_devices, trim_seconds=3.0, scores_per_second=1e12
            )
        return cls(compile_seconds=5.0, flops_per_second=2e14 * num_devices, trim_seconds=1.5, scores_per_second=2e12)

    def seconds(self, flops: float, scores: float = 0.0) -> float:
        """The predicted compute time of `flops` matmul FLOPs and `scores` attention scores (see the class)."""
        return flops / self.flops_per_second + scores / self.scores_per_second


def compile_lowered(lowered: Any, platform: str, options: dict[str, Any] | None = None) -> Any:
    """`lowered.compile()` (a `jax.stages.Lowered`) with XLA `options` (default: `config.COMPILER_OPTIONS` for
    `platform`, what `RunConfig.compiler_options` gives); a jaxlib that no longer knows one of them compiles with
    XLA's defaults instead (they change only speed, never the numbers)."""
    if options is None:
        options = COMPILER_OPTIONS.get(platform, {})
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=dict(options))
    except Exception as e:  # jax.errors.JaxRuntimeError: INVALID_ARGUMENT: No such compile option: '...'
        if not _unknown_option(e):
            raise
        return lowered.compile()


def _unknown_option(e: Exception) -> bool:
    """Whether XLA refused an option it does not know, or a value its enum lacks (a jaxlib of another version)."""
    return "No such compile option" in str(e) or "is not a valid enum value" in str(e)


_SUPPORTED: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}


def supported_options(platform: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` if this jaxlib's XLA accepts them on `platform` (a tiny program compiled with them, once per
    process), else {}: for `jax.jit(..., compiler_options=...)`, which would raise on every call instead."""
    import jax
    import numpy as np

    key = (platform, tuple(sorted(options.items())))
    if key not in _SUPPORTED:
        _SUPPORTED[key] = dict(options)
        if options:
            device = jax.devices(platform)[0]  # the platform's, not the default backend's
            try:
                jax.jit(lambda x: x + 1).lower(jax.device_put(np.zeros(2, np.float32), device)).compile(
                    compiler_options=dict(options)
                )
            except Exception as e:
                if not _unknown_option(e):
                    raise
                _SUPPORTED[key] = {}
    return dict(_SUPPORTED[key])


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (sorted) that holds `n_tokens`; the largest if none does."""
    for b in buckets:
        if n_tokens <= b:
            return b
    return buckets[-1]


def candidate_lengths(max_length: int, lengths: Sequence[int] = BUCKET_LENGTHS) -> tuple[int, ...]:
    """The lengths below `max_length` that a batch may be padded to, and `max_length` itself."""
    return tuple(sorted({b for b in lengths if b < max_length} | {max_length}))


def fit_buckets(
    batch_lengths: Sequence[int],
    rows: int,
    max_length: int,
    row_flops: Callable[[int], float],
    cost: CompileCost,
    compiled: Sequence[int] = (),
    candidates: Sequence[int] = BUCKET_LENGTHS,
) -> tuple[int, ...]:
    """The padded lengths that minimise compile time plus the time spent on padded rows, for a job's batches.

    A dynamic programme over the candidate lengths (ascending): the cheapest way to cover every batch up to
    candidate k either pads them all to k or covers those up to some j < k more cheaply and pads only the batches
    in (j, k] to k. A bucket costs `cost.compile_seconds` unless its program is already `compiled`.

    Args:
      batch_lengths: each batch's longest text, in tokens (<= max_length).
      rows: rows per batch (padding rows included).
      max_length: the job's truncation length, always a candidate.
      row_flops: FLOPs of one row padded to a length.
      cost: compile seconds against FLOP/s.
      compiled: lengths whose programs exist already (free to use).
      candidates: the lengths a bucket may have (capped at `max_length`).

    Returns:
      The chosen lengths, ascending; every batch fits the last one.
    """
    if not batch_lengths:
        return ()
    cands = candidate_lengths(max_length, candidates)
    counts = [0] * len(cands)
    for n in batch_lengths:
        counts[cands.index(bucket_length(n, cands))] += 1
    free = set(compiled)
    seconds = [rows * row_flops(c) / cost.flops_per_second for c in cands]  # one batch padded to candidate c
    best: list[tuple[float, tuple[int, ...]]] = []
    for k, c in enumerate(cands):
        program = 0.0 if c in free else cost.compile_seconds
        options = []
        for j in range(-1, k):  # j = -1: bucket k alone covers every batch up to it
            covered = sum(counts[j + 1 : k + 1]) * seconds[k]
            base = (0.0, ()) if j < 0 else best[j]
            options.append(
                (
                    base[0] + covered + (program if sum(counts[j + 1 : k + 1]) else 0.0),
                    base[1] + ((c,) if sum(counts[j + 1 : k + 1]) else ()),
                )
            )
        best.append(min(options))
    last = max(k for k, n in enumerate(counts) if n)
    return best[last][1]


# ------------------------------------------------------------------------------------------------------------------
# The persistent compilation cache

_local = threading.local()
_listening = False
_cache_warned = False
# How JAX's warnings begin when it cannot write or read the persistent cache.
CACHE_WARNINGS = ("Error writing persistent compilation cache", "Error reading persistent compilation")


def _on_event(event: str, **_kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _local.hits = getattr(_local, "hits", 0) + 1


def cache_hits() -> int:
    """How many programs this thread has loaded from the persistent cache so far (JAX's own cache-hit events)."""
    global _listening
    if not _listening:
        import jax.monitoring

        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return getattr(_local, "hits", 0)


def _probe(directory: str) -> str | None:
    """Why `directory` cannot hold the cache (None: it can): it must exist or be creatable, and take a file."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def _warn_once(message: str) -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        print(f"retribert-jax: warning: {message}", file=sys.stderr)


def enable_compilation_cache(directory: str) -> bool:
    """Turns on JAX's persistent compilation cache in `directory`, so that a later process loads the programs this
    one compiles instead of compiling them again (see JAX's "Persistent compilation cache" guide).

    Call it before the first compilation of the process: JAX opens the cache once. The one-line equivalent, for a
    program of your own: `jax.config.update("jax_compilation_cache_dir", DIR)` (plus the two thresholds below, which
    otherwise skip programs that compile in under a second).

    Returns:
      True if the cache is on; False (after one warning line on stderr) if `directory` cannot be written, in which
      case the job goes on without it. Should writing fail later (a full disk, say), JAX warns once per program
      (`CACHE_WARNINGS`; the command line makes them one line).
    """
    import jax

    problem = _probe(directory)
    if problem is not None:
        _warn_once(f"compilation cache {directory} is not writable ({problem}); programs are compiled afresh")
        return False
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program: ours compile in about a second on CPU, below JAX's default threshold on some machines.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return True
