"""`retribert-jax verify DIR`: the PyTorch reference (HF transformers) against our Flax model on built-in texts."""

from __future__ import annotations

import argparse

HELP = "compare a checkpoint's Flax embeddings with HF transformers' PyTorch RetriBertModel on sample texts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from retribert_jax.commands.common import add_run_arguments

    p.add_argument("dir", metavar="DIR", help="a checkpoint directory (Flax, from convert; or HF PyTorch) or hub id")
    add_tolerance_arguments(p)
    # The reference is float32 at the highest precision: --dtype bfloat16 (or a lower --precision) measures our
    # model run that way against it, at the tolerance such a run can keep (verify.default_atol).
    add_run_arguments(p)


def add_tolerance_arguments(p: argparse.ArgumentParser) -> None:
    from retribert_jax.commands.common import positive_int
    from retribert_jax.verify import TOP_K

    p.add_argument("--atol", type=float, default=None,
                   help="largest allowed |flax - torch| of any embedding entry (default: 1e-4; with convert --dtype, "
                        "1e-3 for float16 and 1e-2 for bfloat16, where the reference keeps the fp32 source weights; "
                        "1e-2 with verify --dtype bfloat16 or --precision default/high)")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help=f"smallest allowed mean overlap of the two top-{TOP_K} rankings (default: %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="tokenizer truncation length (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.verify import default_atol, report, verify_checkpoint

    # DIR's own weights are the reference here (exported at fp32 when DIR is Flax-only), so the stored dtype adds no
    # error; the compute dtype and precision may.
    atol = default_atol(None, args.dtype, args.precision) if args.atol is None else args.atol
    result = verify_checkpoint(args.dir, atol=atol, min_agreement=args.min_agreement, max_length=args.max_length,
                               dtype=args.dtype, precision=args.precision)
    print(report(result, atol, args.min_agreement))
    return 0 if result["ok"] else 1
