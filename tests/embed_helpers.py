"""Tiny models and tokenizers for the encode/embed tests (importable by subprocess scripts too)."""

from __future__ import annotations

import os
import string

import numpy as np

from retribert_jax.config import RetriBertConfig

WORDS = ["the", "sky", "is", "blue", "why", "does", "ice", "float", "bread", "rise", "cat", "purr", "of", "and"]


def tiny_vocab() -> list[str]:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + list(string.digits)
    vocab += list(".,?!'") + WORDS + ["##" + c for c in string.ascii_lowercase + string.digits]
    return vocab


def tiny_model_dir(directory: str, share_encoders: bool = False, seed: int = 0) -> str:
    """An HF-layout RetriBERT directory (config.json, model.safetensors, vocab.txt) with random tiny weights."""
    from safetensors.numpy import save_file

    from retribert_jax.modeling import init_model
    from retribert_jax.params import flat_params, flax_to_torch

    vocab = tiny_vocab()
    cfg = RetriBertConfig.tiny(vocab_size=len(vocab), share_encoders=share_encoders, max_position_embeddings=128)
    model = init_model(cfg, seed=seed)
    os.makedirs(directory, exist_ok=True)
    cfg.save_pretrained(directory)
    flat = {p: np.asarray(v) for p, v in flat_params(model).items()}
    tensors = flax_to_torch(flat, cfg)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in vocab)
    return directory


def random_texts(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Texts of widely varying length (including an empty one) from the tiny vocabulary's words and letters."""
    rng = np.random.default_rng(seed)
    pool = WORDS + ["xyz", "qq", "hello", "7", "42", "?", "!"]
    texts = []
    for i in range(n):
        k = 0 if i == 3 else int(rng.integers(1, max_words))
        texts.append(" ".join(rng.choice(pool, size=k)))
    return texts
