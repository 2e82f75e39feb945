"""`retribert-jax convert SRC OUT`: an HF PyTorch RetriBERT checkpoint -> a self-contained Flax checkpoint."""

from __future__ import annotations

import argparse
import sys

from retribert_jax.commands import common

HELP = "convert an HF PyTorch RetriBERT checkpoint (directory, .safetensors/.bin file, or hub id) to Flax"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        metavar="SRC",
        help="an HF checkpoint directory, a .safetensors/.bin file (with --config), "
        "or a hub id (downloaded with huggingface_hub when online)",
    )
    p.add_argument("out", metavar="OUT", help="the output directory (built in a temporary directory, then renamed)")
    p.add_argument("--config", help="config.json to use (required for a single weight file without one beside it)")
    p.add_argument("--tokenizer", metavar="DIR", help="take tokenizer files from DIR instead of SRC")
    p.add_argument(
        "--format",
        choices=("orbax", "safetensors"),
        default="orbax",
        help="orbax-checkpoint (default; restores onto a sharding) or safetensors (flat, mmap-able)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast the parameters (default: keep the checkpoint's dtype)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--verify",
        action="store_true",
        help="before OUT is committed, compare it with the PyTorch reference (needs torch, transformers)",
    )
    common.add_tolerance_arguments(p)


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from retribert_jax.checkpoint import convert_checkpoint
    from retribert_jax.errors import MissingDependency
    from retribert_jax.verify import DEFAULT_ATOL, TORCH_MISSING, VerificationFailed, report, verify_checkpoint

    before_commit = None
    if args.verify:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise MissingDependency(TORCH_MISSING) from None

        def before_commit(tmp: str) -> None:
            # The reference reads SRC itself when it is an HF directory, so the check covers the conversion.
            from retribert_jax.hf_files import find_hf_weights
            from retribert_jax.hub import resolve_checkpoint

            ref, local = None, resolve_checkpoint(args.src)  # a hub id is in the cache by now
            if os.path.isdir(local):
                try:
                    find_hf_weights(local)
                    ref = local
                except ValueError:
                    pass
            atol = DEFAULT_ATOL[args.dtype] if args.atol is None else args.atol
            result = verify_checkpoint(
                tmp, reference=ref, atol=atol, min_agreement=args.min_agreement, max_length=args.max_length
            )
            print(report(result, atol, args.min_agreement))
            if not result["ok"]:
                raise VerificationFailed("verification failed")

    start = time.perf_counter()
    try:
        out, warnings = convert_checkpoint(
            args.src,
            args.out,
            config=args.config,
            format=args.format,
            dtype=args.dtype,
            overwrite=args.overwrite,
            tokenizer=args.tokenizer,
            before_commit=before_commit,
        )
    except VerificationFailed:
        print(f"retribert-jax convert: verification failed; {args.out} was not written", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"retribert-jax convert: warning: {w}", file=sys.stderr)
    print(f"wrote {out} ({args.format}, {args.dtype or 'stored dtype'}) in {time.perf_counter() - start:.1f} s")
    return 0
