"""`retribert-jax compress INDEX_DIR --forms int8 binary`: compressed copies of an index for a fast first pass."""

from __future__ import annotations

import argparse

from retribert_jax.quantization import BYTES_PER_VALUE, FORMS

HELP = "write int8 / binary copies of an index (`search --scan int8` shortlists on them, rescoring exactly)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="embedding directory written by `retribert-jax embed`")
    p.add_argument(
        "--forms",
        nargs="+",
        choices=FORMS,
        default=list(FORMS),
        help="int8: scalar-quantized, ranges calibrated on the corpus (4x less than float32); binary: sign "
        "bits (32x less) (default: both)",
    )
    p.add_argument("--overwrite", action="store_true", help="write a copy the index already has again")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.embedding_dir import write_compressed

    m = write_compressed(args.index, args.forms, overwrite=args.overwrite)
    for form in args.forms:
        print(
            f"{args.index}: {form} copy of {m['count']} rows, {m['projection_dim'] * BYTES_PER_VALUE[form]:g} "
            f"bytes a row (float: {m['projection_dim'] * BYTES_PER_VALUE[m['dtype']]:g})"
        )
    return 0
