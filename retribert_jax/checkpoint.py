"""The verbs on checkpoints: load a model, save one, convert an HF PyTorch checkpoint, export back to PyTorch.

They sit on top of the file formats (`hf_files`: HF's safetensors/.bin/sharded files; `flax_files`: our orbax and
safetensors directories) and the model core (`modeling`, the name table in `params`). Loading builds the model
abstractly (shapes only), maps each stored tensor through the table, stacks the encoder layers and places the
arrays, so the random initialisation never runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retribert_jax import flax_files, hf_files
from retribert_jax.config import RetriBertConfig, RunConfig
from retribert_jax.errors import CheckpointError
from retribert_jax.hub import resolve_checkpoint
from retribert_jax.io import check_overwrite, host_array
from retribert_jax.modeling import RetriBertModel, abstract_model
from retribert_jax.params import (
    FlaxPath,
    check_arrays,
    checkpoint_shapes,
    flat_params,
    flax_to_torch,
    stack_layers,
    torch_to_flax,
)


def model_shapes(model: RetriBertModel) -> dict[FlaxPath, tuple[int, ...]]:
    """Model path -> shape of every parameter (layers stacked), of a real or abstract model."""
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_shapes(config: RetriBertConfig) -> dict[FlaxPath, tuple[int, ...]]:
    """Flax path -> shape of every tensor a checkpoint of `config` holds."""
    return checkpoint_shapes(model_shapes(abstract_model(config)), config)


def build_model(
    abstract: RetriBertModel,
    arrays: Mapping[FlaxPath, Any],
    *,
    source: str = "checkpoint",
    sharding: jax.sharding.Sharding | None = None,
    alias_host: bool = False,
) -> RetriBertModel:
    """A model from Flax path -> array (one per HF tensor), cast to the parameter dtype (float32) and placed.

    Args:
      abstract: the model's structure, from `abstract_model(cfg, run_config=...)`.
      arrays: Flax path -> numpy array, e.g. from `params.torch_to_flax`; every name and shape is checked.
      source: what to call the checkpoint in error messages.
      sharding: where to place the parameters (e.g. replicated over a mesh); default device otherwise.
      alias_host: let a CPU device use the host arrays in place instead of copying them. Only for arrays nothing
        else writes to or frees (the stacked layers are fresh buffers; the others must be the caller's private
        memory, which a file's memory map is not).

    Raises:
      CheckpointError: a missing, unexpected or misshapen parameter, named.
    """
    cfg = abstract.config
    graphdef, abstract_state = nnx.split(abstract)
    try:
        check_arrays(arrays, checkpoint_shapes(model_shapes(abstract), cfg), source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    stacked = stack_layers(arrays, cfg, stack=_stack_aligned)
    variables, values = [], []
    for path, var in nnx.to_flat_state(abstract_state):
        value, dtype = np.asarray(stacked[path]), var.get_value().dtype
        variables.append((path, var))
        values.append(value.astype(dtype) if value.dtype != dtype else value)
    # One batched transfer: per-array `jnp.asarray` would dispatch (and on first use compile) once per parameter.
    placed = jax.device_put(
        values, sharding if sharding is not None else jax.local_devices()[0], may_alias=alias_host or None
    )
    filled = [(path, var.replace(value)) for (path, var), value in zip(variables, placed, strict=True)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _stack_aligned(rows: list[np.ndarray]) -> np.ndarray:
    """`np.stack` into a fresh page-aligned host buffer (so that a CPU device can use it in place)."""
    out = host_array((len(rows), *rows[0].shape), rows[0].dtype)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def load_hf_checkpoint(
    path: str,
    config: RetriBertConfig | None = None,
    *,
    run_config: RunConfig | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> RetriBertModel:
    """An HF RetriBERT checkpoint (directory, or a single weight file with `config`) as a RetriBertModel."""
    if config is None:
        config_dir = path if os.path.isdir(path) else os.path.dirname(path)
        config = RetriBertConfig.from_pretrained(config_dir)
    tensors, source = hf_files.read_torch_state_dict(path)
    abstract = abstract_model(config, run_config=run_config)
    try:
        arrays = torch_to_flax(tensors, config, checkpoint_shapes(model_shapes(abstract), config), source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return build_model(abstract, arrays, source=source, sharding=sharding)


def load_flax_model(
    directory: str,
    config: RetriBertConfig | None = None,
    *,
    run_config: RunConfig | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> RetriBertModel:
    """Loads a directory written by `save_model` / `retribert-jax convert`; needs no torch.

    Args:
      directory: the checkpoint directory.
      config: overrides its config.json.
      run_config: how the model runs; parameters are float32 on device whatever dtype they were stored in.
      sharding: where to place the parameters; default device otherwise.

    Returns:
      A RetriBertModel in evaluation mode.
    """
    directory = os.fspath(directory)
    config = config or RetriBertConfig.from_pretrained(directory)
    abstract = abstract_model(config, run_config=run_config)
    expected = checkpoint_shapes(model_shapes(abstract), config)
    _, arrays = flax_files.read_flax_arrays(directory, expected, dtype=jnp.float32)
    return build_model(abstract, arrays, source=directory, sharding=sharding, alias_host=True)


def load_model(
    path: str | os.PathLike,
    *,
    config: RetriBertConfig | None = None,
    run_config: RunConfig | None = None,
    dtype: Any = None,
    precision: Any = None,
    attention_impl: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> RetriBertModel:
    """Loads a RetriBertModel (what `RetriBertModel.from_pretrained` does).

    Args:
      path: a directory (HF checkpoint or one written by `save_model`/`retribert-jax convert`), a single
        `.safetensors`/`.bin` file (then `config` is needed unless a config.json sits beside it), or a hub id.
      config: overrides the directory's config.json.
      run_config: how the model runs (`RunConfig`: compute and residual dtypes, matmul precision, attention
        kernel); default float32 at JAX's default precision with XLA attention.
      dtype: compute dtype, "float32" or "bfloat16" (overrides `run_config.dtype`); parameters stay float32.
      precision: matmul precision, "default", "high" or "highest" (overrides `run_config.precision`).
      attention_impl: "xla" (portable) or "cudnn" (GPU flash attention, bfloat16 only).
      sharding: where to place the parameters; by default the default device.

    Returns:
      The model, in evaluation mode.

    Raises:
      FileNotFoundError: no such path (and no downloadable hub id).
      CheckpointError: a file that is not a RetriBERT checkpoint, or one that disagrees with its config.
      ValueError: a run setting outside its choices.
    """
    run = (run_config or RunConfig()).with_overrides(dtype=dtype, precision=precision, attention_impl=attention_impl)
    local = resolve_checkpoint(path)
    kwargs = dict(run_config=run, sharding=sharding)
    if os.path.isdir(local) and flax_files.has_flax_weights(local):
        return load_flax_model(local, config=config, **kwargs)
    return load_hf_checkpoint(local, config=config, **kwargs)


def _adding_tokenizer(
    tokenizer: Any, directory: str, before_commit: Callable[[str], None] | None = None
) -> Callable[[str], None]:
    """What a Flax directory's writer runs on its finished temporary directory: the tokenizer written into it (by a
    tokenizer object's `save_pretrained`, or its files copied verbatim from a directory), then `before_commit`.
    With `tokenizer` None and `directory` already there (an overwrite), that directory's tokenizer files are kept."""
    if tokenizer is None and os.path.isdir(directory):
        tokenizer = directory  # keep what `tokenizer.save_pretrained(directory)` put there before us

    def finish(tmp: str) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            hf_files.copy_tokenizer_files(os.fspath(tokenizer), tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if before_commit is not None:
            before_commit(tmp)

    return finish


def save_model(
    model: RetriBertModel,
    directory: str,
    format: str = "orbax",
    dtype: Any = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> str:
    """Writes a model as a self-contained Flax checkpoint directory (what `RetriBertModel.save_pretrained` does).

    Args:
      model: a RetriBertModel.
      directory: where to write; an existing one is refused unless `overwrite`.
      format: "orbax" (default) or "safetensors" (flat names, mmap-able, the fastest to load).
      dtype: store parameters as "float32", "bfloat16" or "float16"; None keeps them (float32).
      overwrite: replace an existing directory (its tokenizer files are kept when `tokenizer` is None).
      tokenizer: a RetriBertTokenizer or a directory to copy tokenizer files from.

    Returns:
      The directory's absolute path.
    """
    state = {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return flax_files.write_flax_directory(
        flat_params(state, model.config),
        model.config,
        directory,
        format=format,
        dtype=dtype,
        overwrite=overwrite,
        before_commit=_adding_tokenizer(tokenizer, os.path.abspath(directory)),
    )


def read_flax_params(
    directory: str, config: RetriBertConfig | None = None
) -> tuple[RetriBertConfig, dict[FlaxPath, np.ndarray]]:
    """The config and Flax path -> numpy array of a Flax checkpoint directory, as stored (dtype kept), every name
    and shape checked against the config (for export and re-conversion)."""
    config = config or RetriBertConfig.from_pretrained(directory)
    _, arrays = flax_files.read_flax_arrays(directory, expected_shapes(config))
    return config, {p: np.asarray(a) for p, a in arrays.items()}


class _Draining(Mapping):
    """A read-once view of a state dict: each tensor leaves the dict when read, so its memory can be freed as soon
    as its converted copy exists (peak memory: the checkpoint plus one tensor, not two checkpoints)."""

    def __init__(self, tensors: dict[str, Any]):
        self._tensors = tensors
        self._keys = list(tensors)

    def __getitem__(self, key: str) -> Any:
        return self._tensors.pop(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _materialize(arrays: dict[FlaxPath, Any], dtype: np.dtype | None) -> dict[FlaxPath, np.ndarray]:
    """Contiguous (and cast) arrays, one at a time, each replacing the view it came from so that the source
    tensor is freed before the next copy is made."""
    for path in list(arrays):
        a = arrays[path]
        a = a if dtype is None or a.dtype == dtype else a.astype(dtype)
        arrays[path] = np.ascontiguousarray(a)
        del a
    return arrays


def _source_config(local: str, config: str | RetriBertConfig | None) -> RetriBertConfig:
    """The config a conversion uses: given, or the config.json in (or beside) `local`."""
    base = local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local))
    if isinstance(config, RetriBertConfig):
        return config
    if config is not None:
        return RetriBertConfig.from_pretrained(config)
    if os.path.isfile(os.path.join(base, "config.json")):
        return RetriBertConfig.from_pretrained(base)
    what = "a single weight file needs --config" if os.path.isfile(local) else "no config.json"
    raise CheckpointError(f"{local}: {what} (give the model's config.json with --config)")


def convert_checkpoint(
    src: str,
    out: str,
    *,
    config: str | RetriBertConfig | None = None,
    format: str = "orbax",
    dtype: Any = None,
    overwrite: bool = False,
    tokenizer: str | None = None,
    before_commit: Callable[[str], None] | None = None,
) -> tuple[str, list[str]]:
    """Converts an HF PyTorch RetriBERT checkpoint into a self-contained Flax checkpoint directory.

    `hf_files.read_torch_state_dict` reads (weights_only), `params.torch_to_flax` maps and checks every name and
    shape against the config, `flax_files.write_flax_directory` writes atomically. The arrays never pass through a
    model, so the conversion computes nothing.

    Args:
      src: an HF checkpoint directory, a single `.safetensors`/`.bin` file (with `config`, unless a config.json sits
        beside it), a directory this package wrote (re-written in another format/dtype), or a hub id.
      out: the output directory.
      config: a config.json path (or its directory, or a RetriBertConfig) overriding the one in `src`.
      format: "orbax" or "safetensors".
      dtype: "float32", "bfloat16", "float16", or None to keep the stored dtype.
      overwrite: replace an existing `out`.
      tokenizer: a directory to take the tokenizer files from; default `src` (or the weight file's directory).
      before_commit: see `flax_files.write_flax_directory` (used by `convert --verify`).

    Returns:
      (out's absolute path, warnings for the user).

    Raises:
      FileExistsError: `out` exists and `overwrite` is False (checked before any reading).
      CheckpointError, ValueError: a source that is not a RetriBERT checkpoint of its config, named.
    """
    if format not in flax_files.FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {flax_files.FORMATS}")
    flax_files.parse_dtype(dtype)
    out = os.path.abspath(os.fspath(out))
    check_overwrite(out, overwrite)  # refuse early: a long conversion that ends in "exists" wastes the user's time
    local = resolve_checkpoint(src)
    if os.path.isdir(local) and not os.listdir(local):
        raise CheckpointError(f"{local}: the directory is empty")
    if os.path.abspath(local) == out:
        raise ValueError(f"{out}: the output directory is the source; write somewhere else")
    cfg = _source_config(local, config)

    if os.path.isdir(local) and flax_files.has_flax_weights(local):
        cfg, arrays = read_flax_params(local, cfg)
    else:
        # Not memory-mapped, and drained as converted: mapped pages would stay resident beside the copies.
        tensors, source = hf_files.read_torch_state_dict(local, mmap=False)
        try:
            arrays = torch_to_flax(_Draining(tensors), cfg, expected_shapes(cfg), source=source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        del tensors
    arrays = _materialize(arrays, flax_files.parse_dtype(dtype))

    warnings = []
    tok_dir = tokenizer or (local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local)))
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"{tokenizer}: no such tokenizer directory")
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in ("tokenizer.json", "vocab.txt")):
        warnings.append(
            f"{tok_dir} has no tokenizer.json or vocab.txt: {out} holds weights and config only; "
            "add the tokenizer with --tokenizer DIR (RetriBERT uses bert-base-uncased's vocab.txt)"
        )
        tok_dir = None
    flax_files.write_flax_directory(
        arrays,
        cfg,
        out,
        format=format,
        dtype=dtype,
        overwrite=overwrite,
        before_commit=_adding_tokenizer(tok_dir, out, before_commit),
    )
    return out, warnings


def export_pytorch(src: str | RetriBertModel, out: str, *, overwrite: bool = False, dtype: Any = None) -> str:
    """Writes an HF RetriBERT directory (`model.safetensors`, config.json, tokenizer files) that transformers'
    `RetriBertModel.from_pretrained` loads with strict key checking; needs neither torch nor transformers.

    Args:
      src: a directory written by `retribert-jax convert` / `save_pretrained`, or a RetriBertModel.
      out: the HF directory to write (atomically); an existing one is refused unless `overwrite`.
      dtype: "float32", "bfloat16" or "float16" to cast to; None keeps the stored dtype.

    Returns:
      out's absolute path.

    Raises:
      FileExistsError: `out` exists and `overwrite` is False.
      CheckpointError: `src` is not a Flax checkpoint directory.
    """
    dt = flax_files.parse_dtype(dtype)
    out = os.path.abspath(os.fspath(out))
    check_overwrite(out, overwrite)
    tok_dir = None
    if isinstance(src, (str, os.PathLike)):
        src = os.fspath(src)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src}: no such directory")
        if not flax_files.has_flax_weights(src):
            raise CheckpointError(
                f"{src}: not a Flax checkpoint (no flax_model.safetensors or flax_params/); "
                "an HF PyTorch directory needs no export"
            )
        cfg, arrays = read_flax_params(src)
        tok_dir = src
    else:
        cfg, arrays = src.config, {p: np.asarray(a) for p, a in flat_params(src, src.config).items()}
    tensors = flax_to_torch(arrays, cfg)
    if dt is not None:
        tensors = {k: v.astype(dt) for k, v in tensors.items()}
    return hf_files.write_hf_directory(tensors, cfg, out, overwrite=overwrite, tokenizer_dir=tok_dir)
