"""This package's own checkpoint directory: config.json, tokenizer files (added by the caller), and the Flax
parameters.

Two layouts of the parameters, both keyed by the Flax paths of `params.py`'s table (one tensor per HF tensor):
  - `flax_params/`: an orbax-checkpoint PyTree (nested dict, string keys), restored straight onto a given sharding;
  - `flax_model.safetensors`: flat names like `bert_query.encoder.layer.0.attention.self.query.kernel`,
    memory-mappable and readable without JAX.
Neither needs torch to read. A directory is always built in a temporary directory and renamed into place. This module
knows files, not models: it reads and writes Flax path -> array, checked against the shapes its caller expects.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retribert_jax.config import RetriBertConfig
from retribert_jax.errors import CheckpointError
from retribert_jax.io import atomic_directory, check_overwrite, host_buffer
from retribert_jax.params import FlaxPath, check_arrays, parse_path, path_str

FLAX_SAFETENSORS = "flax_model.safetensors"
FLAX_ORBAX = "flax_params"
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


def _flat(tree: Mapping[str, Any]) -> dict[FlaxPath, Any]:
    out: dict[FlaxPath, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[parse_path(prefix + key)] = value

    walk(tree, "")
    return out


def _orbax_writer():
    """A PyTree checkpointer for host numpy arrays: no defensive copy of each array (we hold them unchanged until
    the save returns) and no zstd (random-looking float weights do not compress; it only costs time)."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def write_flax_directory(
    arrays: Mapping[FlaxPath, Any],
    config: RetriBertConfig,
    directory: str,
    *,
    format: str = "orbax",
    dtype: Any = None,
    overwrite: bool = False,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """Writes config.json and parameters (Flax path -> array), and what `before_commit` adds, as one atomic directory.

    Args:
      arrays: Flax path -> numpy or jax array, every parameter of the model (the caller checked them).
      config: written as config.json.
      directory: the output directory; replaced only with `overwrite`.
      format: "orbax" (default) or "safetensors".
      dtype: cast every parameter to this ("float32", "bfloat16", "float16"); None keeps them as they are.
      before_commit: called with the finished temporary directory before it is renamed into place, to add files
        (the tokenizer's: `checkpoint.save_model`) or check it; raising there (e.g. a failed verification) leaves
        `directory` untouched.

    Returns:
      The directory's absolute path.

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False.
      ValueError: an unknown format or dtype.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    dt = parse_dtype(dtype)
    directory = os.path.abspath(os.fspath(directory))
    check_overwrite(directory, overwrite)

    def cast(a: Any) -> np.ndarray:
        a = np.asarray(a)
        # One contiguous copy at most per tensor: the cast, or the transpose a converted kernel still is.
        return np.ascontiguousarray(a if dt is None or a.dtype == dt else a.astype(dt))

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
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


# Dtypes of our own safetensors files that the aligned reader lays out itself; any other goes through safetensors.
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(jnp.bfloat16), "F16": np.dtype(np.float16)}


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
            buf = host_buffer(size)
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
                arrays[name] = np.frombuffer(buf, dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(
                    info["shape"]
                )
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {parse_path(k): a for k, a in arrays.items()}


_log = logging.getLogger(__name__)
# The `extra` key of the record logged when an orbax read fails: orbax then leaves its other reads running, and
# asyncio may report their exceptions later, as never retrieved. A process's owner (the command line) drops them.
ORBAX_READS_ABANDONED = "orbax_reads_abandoned"


def _orbax_error(path: str, e: BaseException) -> CheckpointError:
    _log.info(
        "%s: an orbax read failed; orbax leaves its other reads running", path, extra={ORBAX_READS_ABANDONED: True}
    )
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
        raise CheckpointError(
            f"{path}: not a readable orbax checkpoint (its metadata or array store is missing or damaged)"
        )
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for p, m in _flat(dict(item)).items()}


def _read_orbax(
    path: str, expected: Mapping[FlaxPath, tuple[int, ...]], *, dtype: Any = None
) -> dict[FlaxPath, np.ndarray]:
    """Flax path -> numpy array restored by orbax, cast to `dtype` (None keeps each stored dtype).

    Names and shapes are checked against `expected` first: orbax would refuse a mismatch too, but from inside its
    concurrent reads, which it leaves running (tracebacks on stderr after our error), and without naming it.
    """
    import orbax.checkpoint as ocp

    # orbax-checkpoint reads no item metadata from a relative path (and logs, then returns None): give it an
    # absolute one, whatever the caller's working directory.
    path = os.path.abspath(path)
    stored = _orbax_stored(path)
    _check(stored, expected, path)
    target = {p: np.empty(s.shape, dtype or s.dtype) for p, s in stored.items()}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return _flat(ckptr.restore(path, _nested(target)))
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged directory
            raise _orbax_error(path, e) from None


def _check(arrays: Mapping[FlaxPath, Any], expected: Mapping[FlaxPath, tuple[int, ...]], source: str) -> None:
    try:
        check_arrays(arrays, expected, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def weights_file(directory: str) -> tuple[str, str]:
    """("safetensors" or "orbax", its path) for the Flax weights in a checkpoint directory."""
    st = os.path.join(directory, FLAX_SAFETENSORS)
    if os.path.isfile(st):
        return "safetensors", st
    orbax_dir = os.path.join(directory, FLAX_ORBAX)
    if os.path.isdir(orbax_dir):
        return "orbax", orbax_dir
    raise CheckpointError(f"{directory}: no Flax weights ({FLAX_SAFETENSORS} or {FLAX_ORBAX}/)")


def has_flax_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, FLAX_SAFETENSORS)) or os.path.isdir(
        os.path.join(directory, FLAX_ORBAX)
    )


def read_flax_arrays(
    directory: str, expected: Mapping[FlaxPath, tuple[int, ...]], *, dtype: Any = None
) -> tuple[str, dict[FlaxPath, np.ndarray]]:
    """The Flax parameters of a checkpoint directory, every name and shape checked against `expected`.

    Args:
      directory: a directory written by `write_flax_directory`.
      expected: Flax path -> shape (`params.checkpoint_shapes`).
      dtype: orbax only: restore as this dtype (None keeps the stored one). Safetensors arrays keep theirs.

    Returns:
      ("safetensors" or "orbax", Flax path -> numpy array); for safetensors, views of one page-aligned private
      host buffer that nothing else holds.

    Raises:
      CheckpointError: no Flax weights, a damaged file, or names and shapes that do not match `expected`.
    """
    kind, source = weights_file(directory)
    if kind == "safetensors":
        arrays = _read_safetensors(source)
        _check(arrays, expected, source)
        return kind, arrays
    return kind, _read_orbax(source, expected, dtype=dtype)
