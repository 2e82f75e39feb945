"""RetriBERT (the ELI5 dense retriever) in JAX/Flax NNX, with PyTorch checkpoint conversion.

The public names, re-exported from the modules that define them: the model (`RetriBertConfig`, `RunConfig`,
`RetriBertModel`, `RetriBertTokenizer`), batch embedding (`Encoder`), search (`Index`, `build_index`), the research
loop (`train`, `TrainConfig`, `evaluate`, `mine_hard_negatives`) and the checkpoint verbs (`load_model`,
`convert_checkpoint`, `export_pytorch`). Each is imported on first use, so that `import retribert_jax.cli` (and
`retribert-jax --help`) does not pay for JAX and Flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "RetriBertConfig": "config", "RunConfig": "config",
    "RetriBertModel": "modeling", "in_batch_loss": "modeling", "init_model": "modeling",
    "RetriBertTokenizer": "tokenizer",
    "Encoder": "encode",
    "Hit": "search", "Index": "search", "build_index": "search",
    "evaluate": "evaluation", "mine_hard_negatives": "mining",
    "Pair": "pairs", "TrainConfig": "config", "read_pairs": "pairs", "train": "training",
    "convert_checkpoint": "checkpoint", "export_pytorch": "checkpoint", "load_model": "checkpoint",
    "save_model": "checkpoint",
}
__all__ = ["Encoder", "Hit", "Index", "Pair", "RetriBertConfig", "RetriBertModel", "RetriBertTokenizer", "RunConfig",
           "TrainConfig",
           "build_index", "convert_checkpoint", "evaluate", "export_pytorch", "in_batch_loss", "init_model",
           "load_model", "mine_hard_negatives", "read_pairs", "save_model", "train"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from retribert_jax.checkpoint import convert_checkpoint, export_pytorch, load_model, save_model
    from retribert_jax.config import RetriBertConfig, RunConfig, TrainConfig
    from retribert_jax.encode import Encoder
    from retribert_jax.evaluation import evaluate
    from retribert_jax.mining import mine_hard_negatives
    from retribert_jax.modeling import RetriBertModel, in_batch_loss, init_model
    from retribert_jax.pairs import Pair, read_pairs
    from retribert_jax.search import Hit, Index, build_index
    from retribert_jax.tokenizer import RetriBertTokenizer
    from retribert_jax.training import train


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"retribert_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'retribert_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
