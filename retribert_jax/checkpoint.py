"""Reading HF RetriBERT checkpoints (safetensors, `.bin`, sharded) and this package's Flax checkpoints.

Loading builds the model abstractly (`nnx.eval_shape`: no memory, no compute), maps each stored tensor through the
table in `params.py`, and merges the filled state, so the random initialisation never runs.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retribert_jax.config import RetriBertConfig
from retribert_jax.modeling import RetriBertModel, abstract_model
from retribert_jax.params import FlaxPath, path_str, torch_to_flax

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)
FLAX_SAFETENSORS = "flax_model.safetensors"
FLAX_ORBAX = "flax_params"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a RetriBERT; the message names the file and what is wrong."""


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """A local directory for `path_or_id`: the path itself, or a hub snapshot downloaded with huggingface_hub."""
    path = os.fspath(path_or_id)
    if os.path.exists(path):
        return path
    if path.count("/") > 1 or path.startswith((".", "/", "~")) or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{path}: not a local path, and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.txt", "*.safetensors", "*.bin", f"{FLAX_ORBAX}/**"]
    try:
        return snapshot_download(repo_id=path, allow_patterns=patterns)
    except Exception as e:  # network errors, unknown repo, offline mode: all mean "cannot get it"
        raise FileNotFoundError(f"{path}: not a local path, and the hub download failed ({type(e).__name__}: {e})") \
            from None


def _safetensors_file(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
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
        raise CheckpointError(f"{path}: this PyTorch checkpoint needs torch to read "
                              "(pip install 'retribert_jax[torch]'), or convert it to safetensors") from None
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
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index ({type(e).__name__}: {e})") \
            from None
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
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)}, "
                          f"{FLAX_SAFETENSORS}, {FLAX_ORBAX}/)")


def read_torch_state_dict(path: str, mmap: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """An HF checkpoint (directory or single weight file) as PyTorch name -> numpy array, and the file read."""
    if os.path.isfile(path):
        return read_weight_file(path, mmap), path
    name = find_hf_weights(path)
    if name.endswith(".index.json"):
        return _read_index(path, name, mmap), os.path.join(path, name)
    full = os.path.join(path, name)
    return read_weight_file(full, mmap), full


def flat_shapes(model: RetriBertModel) -> dict[FlaxPath, tuple[int, ...]]:
    _, state = nnx.split(model)
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def iter_params(model: RetriBertModel) -> Iterator[tuple[FlaxPath, jax.Array]]:
    """(Flax path, array) for every parameter of a model."""
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        yield path, var.get_value()


def build_model(abstract: RetriBertModel, arrays: Mapping[FlaxPath, Any], *, source: str = "checkpoint",
                sharding: jax.sharding.Sharding | None = None, alias_host: bool = False) -> RetriBertModel:
    """A model from Flax path -> array, every parameter exactly once with the shape its config implies, cast to
    the parameter dtype of `abstract` (float32).

    Args:
      abstract: the model's structure, from `abstract_model(cfg, dtype=..., attention_impl=...)` (callers build it
        once and also take the expected names and shapes from it).
      arrays: Flax path -> array (numpy or jax), e.g. from `torch_to_flax`.
      source: what to call the checkpoint in error messages.
      sharding: where to place the parameters (e.g. replicated over a mesh); default device otherwise.
      alias_host: let a CPU device use 64-byte-aligned numpy arrays in place instead of copying them. Only for
        arrays nothing else writes to or frees: the caller's private buffers (a file's memory map is not).
    """
    graphdef, abstract_state = nnx.split(abstract)
    variables, values = [], []
    for path, var in nnx.to_flat_state(abstract_state):
        if path not in arrays:
            raise CheckpointError(f"{source}: parameter {path_str(path)!r} is missing")
        value, spec = arrays[path], var.get_value()
        want = tuple(spec.shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{source}: parameter {path_str(path)!r} has shape {tuple(value.shape)}, "
                                  f"expected {want} from the config")
        value = np.asarray(value) if not isinstance(value, jax.Array) else value
        variables.append((path, var))
        values.append(value.astype(spec.dtype) if value.dtype != spec.dtype else value)
    extra = [path_str(p) for p in arrays if p not in {path for path, _ in variables}]
    if extra:
        raise CheckpointError(f"{source}: unexpected parameter(s) {extra[:5]}")
    # One batched transfer: per-array `jnp.asarray` would dispatch (and on first use compile) once per parameter.
    placed = jax.device_put(values, sharding if sharding is not None else jax.local_devices()[0],
                            may_alias=alias_host or None)
    filled = [(path, var.replace(value)) for (path, var), value in zip(variables, placed, strict=True)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_hf_checkpoint(path: str, config: RetriBertConfig | None = None, *, dtype: Any = jnp.float32,
                       attention_impl: str = "xla", sharding: jax.sharding.Sharding | None = None) -> RetriBertModel:
    """An HF RetriBERT checkpoint (directory, or a single weight file with `config`) as a RetriBertModel."""
    if config is None:
        config_dir = path if os.path.isdir(path) else os.path.dirname(path)
        config = RetriBertConfig.from_pretrained(config_dir)
    tensors, source = read_torch_state_dict(path)
    abstract = abstract_model(config, dtype=dtype, attention_impl=attention_impl)
    try:
        arrays = torch_to_flax(tensors, config, flat_shapes(abstract), source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return build_model(abstract, arrays, source=source, sharding=sharding)


def has_flax_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, FLAX_SAFETENSORS)) or os.path.isdir(
        os.path.join(directory, FLAX_ORBAX))


def load_model(path: str | os.PathLike, *, config: RetriBertConfig | None = None, dtype: Any = jnp.float32,
               attention_impl: str = "xla", sharding: jax.sharding.Sharding | None = None) -> RetriBertModel:
    """Loads a RetriBertModel.

    Args:
      path: a directory (HF checkpoint or one written by `save_model`/`retribert-jax convert`), a single
        `.safetensors`/`.bin` file (then `config` is needed unless a config.json sits beside it), or a hub id.
      config: overrides the directory's config.json.
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
      attention_impl: "xla" (portable) or "cudnn" (GPU flash attention, bfloat16 only).
      sharding: where to place the parameters; by default the default device.

    Returns:
      The model, in evaluation mode.
    """
    local = resolve_checkpoint(path)
    kwargs = dict(dtype=dtype, attention_impl=attention_impl, sharding=sharding)
    if os.path.isdir(local) and has_flax_weights(local):
        from retribert_jax import flax_checkpoint

        return flax_checkpoint.load_flax_model(local, config=config, **kwargs)
    return load_hf_checkpoint(local, config=config, **kwargs)


def save_model(model: RetriBertModel, directory: str, **kwargs) -> None:
    """Writes a self-contained Flax checkpoint directory; see `flax_checkpoint.save_flax_model`."""
    from retribert_jax import flax_checkpoint

    flax_checkpoint.save_flax_model(model, directory, **kwargs)
