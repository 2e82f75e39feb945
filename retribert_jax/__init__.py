"""RetriBERT (the ELI5 dense retriever) in JAX/Flax NNX, with PyTorch checkpoint conversion.

The public names, re-exported from the modules that define them: the model (`RetriBertConfig`, `RunConfig`,
`RetriBertModel`, `RetriBertTokenizer`), batch embedding (`Encoder`), search (`Index`, `build_index`), the research
loop (`train`, `TrainConfig`, `evaluate`, `mine_hard_negatives`) and the checkpoint verbs (`load_model`,
`convert_checkpoint`, `export_pytorch`). Each is imported on first use, so that `import retribert_jax.cli` (and
`retribert-jax --help`) does not pay for JAX and Flax; a tool that reads code without running it finds each name in
its module (`retribert_jax.encode.Encoder`).
"""

from __future__ import annotations

import importlib

# The public names, by the module that defines each: the one list (`__all__` and `dir()` come from it).
_EXPORTS = {
    "config": ("RetriBertConfig", "RunConfig", "TrainConfig"),
    "modeling": ("RetriBertModel", "in_batch_loss", "init_model"),
    "tokenizer": ("RetriBertTokenizer",),
    "encode": ("Encoder",),
    "search": ("Hit", "Index", "build_index"),
    "evaluation": ("evaluate",),
    "mining": ("mine_hard_negatives",),
    "pairs": ("Pair", "read_pairs"),
    "training": ("train",),
    "checkpoint": ("convert_checkpoint", "export_pytorch", "load_model", "save_model"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"retribert_jax.{_HOME[name]}"), name)
    raise AttributeError(f"module 'retribert_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
