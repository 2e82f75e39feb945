"""Convert an HF PyTorch RetriBERT checkpoint to Flax: the same options as `retribert-jax convert`.

python convert/convert_pytorch_checkpoint.py SRC OUT [--config config.json] [--format orbax|safetensors]
    [--dtype float32|bfloat16|float16] [--tokenizer DIR] [--overwrite] [--verify]
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run from a checkout without installing: the package is the directory above this script.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from retribert_jax.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
