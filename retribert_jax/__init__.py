"""RetriBERT (the ELI5 dense retriever) in JAX/Flax NNX, with PyTorch checkpoint conversion."""

from retribert_jax.config import RetriBertConfig
from retribert_jax.modeling import RetriBertModel, in_batch_loss, init_model
from retribert_jax.tokenizer import RetriBertTokenizer

__all__ = ["RetriBertConfig", "RetriBertModel", "RetriBertTokenizer", "in_batch_loss", "init_model"]
__version__ = "0.1.0"
