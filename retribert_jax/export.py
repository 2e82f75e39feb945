"""Flax checkpoint -> HF PyTorch directory (`model.safetensors`, `config.json`, tokenizer files), through the
inverse of `params.py`'s table. Needs neither torch nor transformers to write; HF's RetriBertModel loads the result
with strict key checking.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from retribert_jax.checkpoint import SAFETENSORS, TOKENIZER_FILES, CheckpointError, has_flax_weights
from retribert_jax.config import RetriBertConfig
from retribert_jax.io import atomic_directory
from retribert_jax.params import flax_to_torch


def hf_config_dict(cfg: RetriBertConfig) -> dict[str, Any]:
    """config.json as HF transformers wants it for RetriBertModel."""
    d = cfg.to_hf_dict()
    d.setdefault("architectures", ["RetriBertModel"])
    # transformers 4.3x+ BERT code reads this attribute, and RetriBertConfig (frozen since 2023) does not set it.
    d.setdefault("position_embedding_type", "absolute")
    return d


def export_pytorch(src: str, out: str, *, overwrite: bool = False, dtype: Any = None) -> str:
    """Writes an HF RetriBERT directory from a Flax checkpoint directory (or a RetriBertModel).

    Args:
      src: a directory written by `retribert-jax convert` / `save_pretrained`, or a RetriBertModel.
      out: the HF directory to write (atomically); an existing one is refused unless `overwrite`.
      dtype: "float32", "bfloat16" or "float16" to cast to; None keeps the stored dtype.

    Returns:
      out's absolute path.
    """
    from safetensors.numpy import save_file

    from retribert_jax.flax_checkpoint import parse_dtype, read_flax_params

    dt = parse_dtype(dtype)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    tok_dir = None
    if isinstance(src, (str, os.PathLike)):
        src = os.fspath(src)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src}: no such directory")
        if not has_flax_weights(src):
            raise CheckpointError(f"{src}: not a Flax checkpoint (no flax_model.safetensors or flax_params/); "
                                  "an HF PyTorch directory needs no export")
        cfg, arrays = read_flax_params(src)
        tok_dir = src
    else:
        from retribert_jax.checkpoint import iter_params

        cfg, arrays = src.config, {p: np.asarray(a) for p, a in iter_params(src)}
    tensors = flax_to_torch(arrays, cfg)
    if dt is not None:
        tensors = {k: v.astype(dt) for k, v in tensors.items()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        RetriBertConfig.from_hf_dict(hf_config_dict(cfg)).save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tok_dir, name)):
                    shutil.copyfile(os.path.join(tok_dir, name), os.path.join(tmp, name))
    return out
