"""HF RetriBERT checkpoint files: reading safetensors, `.bin` (zip or legacy) and sharded checkpoints as PyTorch name
-> numpy array, and writing an HF directory (`model.safetensors`, config.json, tokenizer files).

Knows files, not models: names and shapes are checked against the config by `params.torch_to_flax`.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Mapping

import numpy as np

from retribert_jax.config import RetriBertConfig
from retribert_jax.errors import CheckpointError
from retribert_jax.io import atomic_directory

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)
# The files a checkpoint directory's tokenizer may consist of, as HF names them (copied verbatim when a checkpoint is
# converted or exported).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _safetensors_file(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # safe_open is not a Mapping: it has keys(), no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _torch_bin_file(path: str, mmap: bool = True) -> dict[str, np.ndarray]:
    from retribert_jax import torch_zip

    try:
        # Our allow-list reader first: no torch import (a second saved), and no torch needed at all.
        return torch_zip.read_state_dict(path, mmap=mmap)
    except torch_zip.Unsupported:
        pass  # legacy format or an unusual tensor: torch's own weights_only loader below
    except Exception as e:  # a damaged archive or pickle raises many kinds; RefusedGlobal names the code it refused
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e})") from None
    return _torch_load(path, mmap)


def _torch_load(path: str, mmap: bool) -> dict[str, np.ndarray]:
    """The legacy (pre-1.6) format and tensor kinds our reader does not know, through torch's own safe loader."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: this PyTorch checkpoint needs torch to read "
            "(pip install 'retribert_jax[torch]'), or convert it to safetensors"
        ) from None
    try:
        # weights_only: refuse pickled code. mmap: do not copy the file into memory before converting; without it
        # each tensor owns its memory, so a caller that drops tensors as it converts them frees them one by one.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {msg})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor")
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_weight_file(path: str, mmap: bool = True) -> dict[str, np.ndarray]:
    """One `.safetensors` or `.bin` file as PyTorch name -> numpy array (`mmap`: map a `.bin`, do not read it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.endswith(".safetensors"):
        return _safetensors_file(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return _torch_bin_file(path, mmap)
    raise CheckpointError(f"{path}: unknown weight format; expected .safetensors or .bin")


def _read_index(directory: str, index_name: str, mmap: bool = True) -> dict[str, np.ndarray]:
    index_path = os.path.join(directory, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index ({type(e).__name__}: {e})") from None
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_weight_file(os.path.join(directory, shard), mmap)
        for k, v in tensors.items():
            if k in out:
                raise CheckpointError(f"{index_path}: key {k!r} appears in more than one shard")
            out[k] = v
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index_path}: keys listed in the index but absent from the shards: {missing[:5]}")
    return out


def find_hf_weights(directory: str) -> str:
    """The weight file (or index) an HF checkpoint directory holds, safetensors preferred."""
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return name
    raise CheckpointError(
        f"{directory}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)}, flax_model.safetensors, flax_params/)"
    )


def read_torch_state_dict(path: str, mmap: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """An HF checkpoint (directory or single weight file) as PyTorch name -> numpy array, and the file read."""
    if os.path.isfile(path):
        return read_weight_file(path, mmap), path
    name = find_hf_weights(path)
    if name.endswith(".index.json"):
        return _read_index(path, name, mmap), os.path.join(path, name)
    full = os.path.join(path, name)
    return read_weight_file(full, mmap), full


def copy_tokenizer_files(src: str, dst: str) -> None:
    """Copies the tokenizer files `src` holds (tokenizer.json, vocab.txt, their configs) verbatim into `dst`."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def write_hf_directory(
    tensors: Mapping[str, np.ndarray],
    config: RetriBertConfig,
    out: str,
    *,
    overwrite: bool = False,
    tokenizer_dir: str | None = None,
) -> str:
    """Writes an HF RetriBERT directory atomically: config.json as transformers reads it, `model.safetensors`
    (PyTorch names and layout), and the tokenizer files of `tokenizer_dir`.

    Raises:
      FileExistsError: `out` exists and `overwrite` is False.
    """
    from safetensors.numpy import save_file

    with atomic_directory(out, overwrite=overwrite) as tmp:
        RetriBertConfig.from_hf_dict(config.to_transformers_dict()).save_pretrained(tmp)
        save_file(dict(tensors), os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return os.path.abspath(out)
