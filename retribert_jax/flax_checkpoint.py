"""This package's own checkpoint directory: config.json, tokenizer files, and the Flax parameters.

Two layouts of the parameters, both keyed by the Flax paths of `params.py`'s table:
  - `flax_params/`: an orbax-checkpoint PyTree (nested dict, string keys), restored straight onto a given sharding;
  - `flax_model.safetensors`: flat names like `bert_query.encoder.layer.0.attention.self.query.kernel`,
    memory-mappable and readable without JAX.
Neither needs torch to read. A directory is always built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retribert_jax.checkpoint import (
    FLAX_ORBAX,
    FLAX_SAFETENSORS,
    TOKENIZER_FILES,
    CheckpointError,
    build_model,
    flat_shapes,
    has_flax_weights,
    iter_params,
    read_torch_state_dict,
    resolve_checkpoint,
)
from retribert_jax.config import RetriBertConfig
from retribert_jax.io import atomic_directory
from retribert_jax.modeling import abstract_model
from retribert_jax.params import FlaxPath, path_str, torch_to_flax

FORMATS = ("orbax", "safetensors")
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def parse_dtype(dtype: Any) -> np.dtype | None:
    """None, a name from DTYPES, or a numpy/jax dtype -> numpy dtype (None keeps each parameter's own)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown parameter dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        return np.dtype(DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt not in {np.dtype(d) for d in DTYPES.values()}:
        raise ValueError(f"unsupported parameter dtype {dt}; expected one of {', '.join(DTYPES)}")
    return dt


def _nested(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    # Orbax keys are strings; layer indices become "0", "1", ... and come back through _flat.
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def _flat(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    out: dict[FlaxPath, Any] = {}
    for key, value in tree.items():
        path = (*prefix, int(key) if key.isdigit() else key)
        if isinstance(value, Mapping):
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def _tokenizer_sources(tokenizer: Any) -> tuple[Any, list[str]]:
    """What to write as tokenizer files: (a tokenizer object or None, files to copy)."""
    if tokenizer is None:
        return None, []
    if isinstance(tokenizer, (str, os.PathLike)):
        src = os.fspath(tokenizer)
        return None, [os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    return tokenizer, []


def _orbax_writer():
    """A PyTree checkpointer for host numpy arrays: no defensive copy of each array (we hold them unchanged until
    the save returns) and no zstd (random-looking float weights do not compress; it only costs time)."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


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


def write_flax_directory(arrays: Mapping[FlaxPath, Any], config: RetriBertConfig, directory: str, *,
                         format: str = "orbax", dtype: Any = None, overwrite: bool = False,
                         tokenizer: Any = None, before_commit: Callable[[str], None] | None = None) -> str:
    """Writes config.json, tokenizer files and parameters (Flax path -> array) as one atomic directory.

    Args:
      arrays: Flax path -> numpy or jax array, every parameter of the model (the caller checked them).
      config: written as config.json.
      directory: the output directory; replaced only with `overwrite`.
      format: "orbax" (default) or "safetensors".
      dtype: cast every parameter to this ("float32", "bfloat16", "float16"); None keeps them as they are.
      tokenizer: a RetriBertTokenizer (saved with its save_pretrained), a directory whose tokenizer files are
        copied verbatim, or None. With None and `overwrite`, the tokenizer files already in `directory` are kept.
      before_commit: called with the finished temporary directory before it is renamed into place; raising
        there (e.g. a failed verification) leaves `directory` untouched.

    Returns:
      The directory's absolute path.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    dt = parse_dtype(dtype)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass --overwrite to replace it)")
    if tokenizer is None and os.path.isdir(directory):
        tokenizer = directory  # keep what `tokenizer.save_pretrained(directory)` put there before us
    tok_obj, tok_files = _tokenizer_sources(tokenizer)

    def cast(a: Any) -> np.ndarray:
        a = np.asarray(a)
        # One contiguous copy at most per tensor: the cast, or the transpose a converted kernel still is.
        return np.ascontiguousarray(a if dt is None or a.dtype == dt else a.astype(dt))

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        for f in tok_files:
            shutil.copyfile(f, os.path.join(tmp, os.path.basename(f)))
        if tok_obj is not None:
            tok_obj.save_pretrained(tmp)
        if format == "safetensors":
            from safetensors.numpy import save_file

            flat = {path_str(p): cast(a) for p, a in arrays.items()}
            save_file(flat, os.path.join(tmp, FLAX_SAFETENSORS), metadata={"format": "flax"})
        else:
            tree = _nested({p: cast(a) for p, a in arrays.items()})
            with _orbax_writer() as ckptr:
                ckptr.save(os.path.join(tmp, FLAX_ORBAX), tree)
        if before_commit is not None:
            before_commit(tmp)
    return directory


def save_flax_model(model, directory: str, format: str = "orbax", dtype: Any = None, overwrite: bool = False,
                    tokenizer: Any = None) -> str:
    """Writes a model as a self-contained Flax checkpoint directory (what `RetriBertModel.save_pretrained` does).

    Args:
      model: a RetriBertModel.
      directory: where to write; an existing one is refused unless `overwrite`.
      format: "orbax" (default: restores straight onto a sharding) or "safetensors" (flat names, mmap-able).
      dtype: store parameters as "float32", "bfloat16" or "float16"; None keeps them (float32).
      overwrite: replace an existing directory (its tokenizer files are kept when `tokenizer` is None).
      tokenizer: a RetriBertTokenizer or a directory to copy tokenizer files from.

    Returns:
      The directory's absolute path.
    """
    arrays = {p: np.asarray(jax.device_get(a)) for p, a in iter_params(model)}
    return write_flax_directory(arrays, model.config, directory, format=format, dtype=dtype, overwrite=overwrite,
                                tokenizer=tokenizer)


# Dtypes of our own safetensors files that the aligned reader lays out itself; any other goes through safetensors.
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(jnp.bfloat16), "F16": np.dtype(np.float16)}


def _host_buffer(nbytes: int) -> Any:
    """Writable host memory for `nbytes`, page-aligned and, where the OS allows, populated up front (one kernel
    call instead of a page fault per 4 KiB, which is most of a load's time on a VM)."""
    if os.name != "posix":
        return bytearray(nbytes)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(nbytes, 1), flags=flags)


def _read_safetensors(path: str) -> dict[FlaxPath, np.ndarray]:
    """Flax path -> numpy array of a safetensors file, dtype kept.

    safetensors validates the file (header, offsets, size). Its numpy API returns each tensor as a fresh copy, so
    the data section is instead read with one call into a page-aligned buffer and the arrays are views of it: a
    tensor whose offset is a multiple of 64 bytes (all of ours, for RetriBERT's shapes) is 64-byte aligned, which
    lets `build_model` hand it to the CPU device without a second copy. The views keep the buffer alive.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as st, open(path, "rb", buffering=0) as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            size = os.fstat(f.fileno()).st_size - 8 - header_len
            buf = _host_buffer(size)
            view, done = memoryview(buf), 0
            while done < size:  # a single read() returns at most ~2 GiB
                got = f.readinto(view[done:size])
                if not got:
                    raise ValueError(f"file ended {size - done} bytes early")
                done += got
            arrays = {}
            for name, info in header.items():
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    arrays[name] = st.get_tensor(name)
                    continue
                begin, end = info["data_offsets"]
                arrays[name] = np.frombuffer(buf, dtype, count=(end - begin) // dtype.itemsize,
                                             offset=begin).reshape(info["shape"])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {tuple(int(p) if p.isdigit() else p for p in k.split(".")): a for k, a in arrays.items()}


_orbax_failed = False


def orbax_reads_abandoned() -> bool:
    """Whether an orbax read failed in this process. Orbax then leaves its other reads running, and asyncio reports
    their exceptions later, as never retrieved (the command line drops those reports)."""
    return _orbax_failed


def _orbax_error(path: str, e: BaseException) -> CheckpointError:
    global _orbax_failed
    _orbax_failed = True
    # Orbax wraps tensorstore's error (which names the array and the byte range) in its own generic one.
    while e.__cause__ is not None:
        e = e.__cause__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CheckpointError(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {msg})")


class _DropMetadataWarning(logging.Filter):
    # Orbax logs this and returns None when it cannot read a checkpoint's metadata; our error says it instead.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to get item metadata")


def _orbax_stored(path: str) -> dict[FlaxPath, jax.ShapeDtypeStruct]:
    """Flax path -> shape and dtype as stored (orbax opens every array for this, once more than the restore)."""
    import orbax.checkpoint as ocp

    absl, quiet = logging.getLogger("absl"), _DropMetadataWarning()
    absl.addFilter(quiet)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            item = ckptr.metadata(path).item_metadata
    except Exception as e:  # orbax and tensorstore raise many kinds for a damaged directory
        raise _orbax_error(path, e) from None
    finally:
        absl.removeFilter(quiet)
    if item is None:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint (its metadata or array store is missing or "
                              "damaged)")
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for p, m in _flat(dict(item)).items()}


def _read_orbax(path: str, expected: Mapping[FlaxPath, tuple[int, ...]], *, dtype: Any = None,
                sharding: jax.sharding.Sharding | None = None) -> dict[FlaxPath, jax.Array]:
    """Flax path -> jax.Array, restored by orbax straight onto `sharding` (default: this process's first device),
    cast to `dtype` (None keeps each stored dtype).

    Names and shapes are checked against `expected` first: orbax would refuse a mismatch too, but from inside its
    concurrent reads, which it leaves running (tracebacks on stderr after our error), and without naming it.
    """
    import orbax.checkpoint as ocp

    stored = _orbax_stored(path)
    _check_shapes(stored, expected, path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {p: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sharding) for p, s in stored.items()}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return _flat(ckptr.restore(path, _nested(target)))
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged directory
            raise _orbax_error(path, e) from None


def _check_shapes(arrays: Mapping[FlaxPath, Any], expected: Mapping[FlaxPath, tuple[int, ...]], source: str) -> None:
    """Every expected parameter present with its shape, and nothing else (`arrays` may hold shape-only specs)."""
    missing = [path_str(p) for p in expected if p not in arrays]
    extra = [path_str(p) for p in arrays if p not in expected]
    if missing or extra:
        raise CheckpointError(f"{source}: parameters do not match config.json: {len(missing)} missing "
                              f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    for p, shape in expected.items():
        if tuple(arrays[p].shape) != tuple(shape):
            raise CheckpointError(f"{source}: parameter {path_str(p)!r} has shape {tuple(arrays[p].shape)}, "
                                  f"expected {tuple(shape)} from the config")


def _weights_file(directory: str) -> tuple[str, str]:
    """("safetensors" or "orbax", its path) for the Flax weights in a checkpoint directory."""
    st = os.path.join(directory, FLAX_SAFETENSORS)
    if os.path.isfile(st):
        return "safetensors", st
    orbax_dir = os.path.join(directory, FLAX_ORBAX)
    if os.path.isdir(orbax_dir):
        return "orbax", orbax_dir
    raise CheckpointError(f"{directory}: no Flax weights ({FLAX_SAFETENSORS} or {FLAX_ORBAX}/)")


def read_flax_params(directory: str, config: RetriBertConfig | None = None
                     ) -> tuple[RetriBertConfig, dict[FlaxPath, np.ndarray]]:
    """The config and Flax path -> numpy array of a Flax checkpoint directory, as stored (dtype kept), every name
    and shape checked against the config (for export and re-conversion)."""
    config = config or RetriBertConfig.from_pretrained(directory)
    expected = flat_shapes(abstract_model(config))
    kind, source = _weights_file(directory)
    if kind == "safetensors":
        arrays = _read_safetensors(source)
        _check_shapes(arrays, expected, source)
    else:
        arrays = _read_orbax(source, expected)
    return config, {p: np.asarray(a) for p, a in arrays.items()}


def load_flax_model(directory: str, config: RetriBertConfig | None = None, dtype: Any = jnp.float32,
                    attention_impl: str = "xla", sharding: jax.sharding.Sharding | None = None):
    """Loads a directory written by `save_flax_model` / `retribert-jax convert`; needs no torch.

    Args:
      directory: the checkpoint directory.
      config: overrides its config.json.
      dtype: compute dtype; parameters are float32 on device whatever dtype they were stored in.
      attention_impl: "xla" or "cudnn".
      sharding: where to place the parameters (orbax restores onto it directly); default device otherwise.

    Returns:
      A RetriBertModel in evaluation mode.
    """
    directory = os.fspath(directory)
    config = config or RetriBertConfig.from_pretrained(directory)
    abstract = abstract_model(config, dtype=dtype, attention_impl=attention_impl)
    kind, source = _weights_file(directory)
    arrays = (_read_safetensors(source) if kind == "safetensors"
              else _read_orbax(source, flat_shapes(abstract), dtype=jnp.float32, sharding=sharding))
    # build_model checks every name and shape against the config (again, for orbax) and places the arrays.
    return build_model(abstract, arrays, source=source, sharding=sharding, alias_host=kind == "safetensors")


def _empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


def convert_checkpoint(src: str, out: str, *, config: str | RetriBertConfig | None = None, format: str = "orbax",
                       dtype: Any = None, overwrite: bool = False, tokenizer: str | None = None,
                       before_commit: Callable[[str], None] | None = None) -> tuple[str, list[str]]:
    """Converts an HF PyTorch RetriBERT checkpoint into a self-contained Flax checkpoint directory.

    A thin layer: `checkpoint.read_torch_state_dict` reads (mmap, weights_only), `params.torch_to_flax` maps and
    checks every name and shape against the config, `write_flax_directory` writes atomically.

    Args:
      src: an HF checkpoint directory, a single `.safetensors`/`.bin` file (with `config`, unless a config.json sits
        beside it), a directory this package wrote (re-written in another format/dtype), or a hub id.
      out: the output directory.
      config: a config.json path (or its directory, or a RetriBertConfig) overriding the one in `src`.
      format: "orbax" or "safetensors".
      dtype: "float32", "bfloat16", "float16", or None to keep the stored dtype.
      overwrite: replace an existing `out`.
      tokenizer: a directory to take the tokenizer files from; default `src` (or the weight file's directory).
      before_commit: see `write_flax_directory` (used by `convert --verify`).

    Returns:
      (out's absolute path, warnings for the user).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    parse_dtype(dtype)
    out = os.path.abspath(os.fspath(out))
    # Refuse early: a long conversion that ends in "exists" wastes the user's time.
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    local = resolve_checkpoint(src)
    if _empty_dir(local):
        raise CheckpointError(f"{local}: the directory is empty")
    if os.path.abspath(local) == out:
        raise ValueError(f"{out}: the output directory is the source; write somewhere else")
    base = local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local))
    if isinstance(config, RetriBertConfig):
        cfg = config
    elif config is not None:
        cfg = RetriBertConfig.from_pretrained(config)
    elif os.path.isfile(os.path.join(base, "config.json")):
        cfg = RetriBertConfig.from_pretrained(base)
    else:
        what = "a single weight file needs --config" if os.path.isfile(local) else "no config.json"
        raise CheckpointError(f"{local}: {what} (give the model's config.json with --config)")

    if os.path.isdir(local) and has_flax_weights(local):
        cfg, arrays = read_flax_params(local, cfg)
        source = local
    else:
        # Not memory-mapped, and drained as converted: mapped pages would stay resident beside the copies.
        tensors, source = read_torch_state_dict(local, mmap=False)
        try:
            arrays = torch_to_flax(_Draining(tensors), cfg, flat_shapes(abstract_model(cfg)), source=source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        del tensors
    arrays = _materialize(arrays, parse_dtype(dtype))

    warnings = []
    tok_dir = tokenizer or base
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"{tokenizer}: no such tokenizer directory")
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in ("tokenizer.json", "vocab.txt")):
        warnings.append(f"{tok_dir} has no tokenizer.json or vocab.txt: {out} holds weights and config only; "
                        "add the tokenizer with --tokenizer DIR (RetriBERT uses bert-base-uncased's vocab.txt)")
        tok_dir = None
    write_flax_directory(arrays, cfg, out, format=format, dtype=dtype, overwrite=overwrite, tokenizer=tok_dir,
                         before_commit=before_commit)
    return out, warnings
