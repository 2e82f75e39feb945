"""What the commands repeat: argument types and groups (choices from the library's own constants), and opening a
model with its tokenizer and Encoder, or an index, each as a timed phase of `--verbose`.

Importing this module costs no JAX: the parser is built from it before any command runs, so that a mistake in the
arguments ends at once, not after the seconds JAX takes to import.
"""

from __future__ import annotations

import argparse
import os

from retribert_jax.config import COMPUTE_DTYPES, PRECISIONS
from retribert_jax.embedding_dir import BACKENDS, SCANS

DEFAULT_MAX_LENGTH = 128


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --precision: how the model runs (`config.RunConfig`), given to it when it is loaded."""
    g = p.add_argument_group("how the model runs")
    g.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        default=None,
        help="compute dtype of the matmuls (default: float32); parameters stay float32, LayerNorm "
        "statistics and the softmax run in float32",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="matmul precision (default: JAX's, which on GPUs and TPUs may use TF32 or bf16 passes for "
        "float32; 'highest' is full float32)",
    )


def add_encoding_arguments(p: argparse.ArgumentParser, *, max_length_help: str | None = None) -> None:
    """--batch-size, --max-length, and the run arguments: what every command that encodes texts takes."""
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="packed rows per forward call (default: a platform's efficient size, ~1024 tokens on CPU)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help=max_length_help
        or f"question truncation length (default: {DEFAULT_MAX_LENGTH}, or the "
        "model's max_position_embeddings if less)",
    )
    add_run_arguments(p)


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """--backend, --scan, --rescore-multiplier, --max-device-rows and --block-size: how an index is searched."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=BACKENDS[0],
        help="exact search in JAX on every device, or faiss IndexFlatIP (needs faiss-cpu) (%(default)s)",
    )
    p.add_argument(
        "--scan",
        choices=SCANS,
        default=SCANS[0],
        help="jax backend: scan the float rows (exact), or a compressed copy written by `retribert-jax "
        "compress` for a shortlist rescored exactly from the float rows (%(default)s)",
    )
    p.add_argument(
        "--rescore-multiplier",
        type=positive_int,
        default=4,
        help="--scan int8/binary: rows shortlisted by the approximate score per hit, rescored exactly, as "
        "sentence-transformers' rescore_multiplier, up to 4,096 rows a device (%(default)s; binary copies of "
        "128-d embeddings want 20-40: docs/search.md)",
    )
    p.add_argument(
        "--max-device-rows",
        type=positive_int,
        help="jax backend: rows held per device at once; a larger index streams in passes (default: all on "
        "a CPU, half the memory of an accelerator)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=65536,
        help="corpus rows scored at once by the plain blocked path (%(default)s)",
    )


def add_tolerance_arguments(p: argparse.ArgumentParser) -> None:
    """--atol, --min-agreement, --max-length: how `verify` and `convert --verify` compare with the reference."""
    from retribert_jax.verify import TOP_K

    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="largest allowed |flax - torch| of any embedding entry (default: 1e-4; with convert --dtype, "
        "1e-3 for float16 and 1e-2 for bfloat16, where the reference keeps the fp32 source weights; "
        "1e-2 with verify --dtype bfloat16 or --precision default/high)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help=f"smallest allowed mean overlap of the two top-{TOP_K} rankings (default: %(default)s)",
    )
    p.add_argument(
        "--max-length", type=positive_int, default=128, help="tokenizer truncation length (default: %(default)s)"
    )


def add_pair_field_arguments(p: argparse.ArgumentParser) -> None:
    """--question-field, --positive-field, --negatives-field (`pairs.PairFields`): `train` and `mine`."""
    g = p.add_argument_group(
        "fields of the pairs (default: found by the first row's shape: question/answer/"
        "negatives, Tevatron's query/positive_passages/negative_passages, or sentence-"
        "transformers' anchor/positive/negative)"
    )
    g.add_argument("--question-field", metavar="KEY", help="the question (query, anchor)")
    g.add_argument("--positive-field", "--answer-field", metavar="KEY", help="the positive passage")
    g.add_argument("--negatives-field", metavar="KEY", help="hard negatives: a list, or one passage")


def pair_fields(args: argparse.Namespace):
    """The `pairs.PairFields` that --question-field, --positive-field and --negatives-field name."""
    from retribert_jax.pairs import PairFields

    return PairFields(question=args.question_field, positive=args.positive_field, negatives=args.negatives_field)


def require_file(path: str, what: str) -> None:
    """Refuses a missing input file before anything heavy is imported."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not the {what}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")


def model_name(path: str) -> str:
    """How a run records its model: the absolute path of a local checkpoint, or the hub id as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


def load_model(args: argparse.Namespace, path: str):
    """The model at `path`, run as --dtype and --precision say (a timed phase)."""
    from retribert_jax.modeling import RetriBertModel

    with args.timings.phase("load model"):
        return RetriBertModel.from_pretrained(path, dtype=args.dtype, precision=args.precision)


def open_encoder(args: argparse.Namespace, path: str, check=None):
    """(model, Encoder) for the checkpoint at `path`: the model run as --dtype/--precision say, its tokenizer, and
    an Encoder that places its parameters on the devices. `check(model)` runs before the parameters are placed (a
    refusal then costs no device copy)."""
    from retribert_jax.encode import Encoder
    from retribert_jax.tokenizer import RetriBertTokenizer

    model = load_model(args, path)
    if check is not None:
        check(model)
    with args.timings.phase("load tokenizer"):
        tokenizer = RetriBertTokenizer.from_pretrained(path)
    with args.timings.phase("place parameters"):
        encoder = Encoder(model, tokenizer)
    return model, encoder


def open_index(args: argparse.Namespace):
    """The index at `args.index`, searched as --backend/--block-size (and --recall-target, where there is one) say."""
    from retribert_jax.search import Index

    with args.timings.phase("open index"):
        index = Index(
            args.index,
            backend=args.backend,
            scan=args.scan,
            rescore_multiplier=args.rescore_multiplier,
            max_device_rows=args.max_device_rows,
            block_size=args.block_size,
            recall_target=getattr(args, "recall_target", None),
        )
    if index.manifest["kind"] != "passages":  # before the model loads
        raise ValueError(f"{args.index}: holds {index.manifest['kind']} embeddings; searching needs passages")
    return index


def question_max_length(args: argparse.Namespace, model) -> int:
    """--max-length, else 128 or the model's max_position_embeddings if less."""
    return args.max_length or min(DEFAULT_MAX_LENGTH, model.config.max_position_embeddings)
