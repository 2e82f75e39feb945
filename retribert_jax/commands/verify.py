"""`retribert-jax verify DIR`: the PyTorch reference (HF transformers) against our Flax model on built-in texts."""

from __future__ import annotations

import argparse

from retribert_jax.commands import common

HELP = "compare a checkpoint's Flax embeddings with HF transformers' PyTorch RetriBertModel on sample texts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a checkpoint directory (Flax, from convert; or HF PyTorch) or hub id")
    common.add_tolerance_arguments(p)
    # The reference is float32 at the highest precision: --dtype bfloat16 (or a lower --precision) measures our
    # model run that way against it, at the tolerance such a run can keep (verify.default_atol).
    common.add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    from retribert_jax.verify import default_atol, report, verify_checkpoint

    # DIR's own weights are the reference here (exported at fp32 when DIR is Flax-only), so the stored dtype adds no
    # error; the compute dtype and precision may.
    atol = default_atol(None, args.dtype, args.precision) if args.atol is None else args.atol
    result = verify_checkpoint(
        args.dir,
        atol=atol,
        min_agreement=args.min_agreement,
        max_length=args.max_length,
        dtype=args.dtype,
        precision=args.precision,
    )
    print(report(result, atol, args.min_agreement))
    return 0 if result["ok"] else 1
