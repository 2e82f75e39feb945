"""RetriBERT (the ELI5 dense retriever) in JAX/Flax NNX, with PyTorch checkpoint conversion."""

import sys as _sys

# flax.nnx probes for IPython at import time (to colour reprs), and importing IPython costs ~0.5 s of every CLI
# start. When IPython is not loaded already we are not inside it, so the probe's answer is "no" either way: hide it
# for the duration of that one import.
if "IPython" not in _sys.modules:
    _sys.modules["IPython"] = None  # type: ignore[assignment]
    try:
        import flax.nnx  # noqa: F401
    finally:
        if _sys.modules.get("IPython", False) is None:
            del _sys.modules["IPython"]

from retribert_jax.config import RetriBertConfig  # noqa: E402
from retribert_jax.modeling import RetriBertModel, in_batch_loss, init_model  # noqa: E402
from retribert_jax.tokenizer import RetriBertTokenizer  # noqa: E402

__all__ = ["RetriBertConfig", "RetriBertModel", "RetriBertTokenizer", "in_batch_loss", "init_model"]
__version__ = "0.1.0"
