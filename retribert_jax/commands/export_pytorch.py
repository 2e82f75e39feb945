"""`retribert-jax export-pytorch FLAX_DIR OUT`: a Flax checkpoint back to an HF PyTorch directory."""

from __future__ import annotations

import argparse

HELP = "export a Flax checkpoint to an HF directory (model.safetensors, config.json, tokenizer) for transformers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="FLAX_DIR", help="a directory written by `retribert-jax convert` or save_pretrained")
    p.add_argument("out", metavar="OUT", help="the HF directory to write")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="cast the tensors (default: keep the stored dtype)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.checkpoint import export_pytorch

    out = export_pytorch(args.src, args.out, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out}: load it with transformers.RetriBertModel.from_pretrained({out!r})")
    return 0
