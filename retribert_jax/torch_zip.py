"""PyTorch's zip checkpoints (what `torch.save` writes since 1.6) read as numpy, without importing torch.

Why: importing torch costs about a second, a third of a whole conversion, and a JAX-only TPU or GPU machine should
not need a 700 MB torch install to read a `pytorch_model.bin`.

Safety is the allow-list idea behind `torch.load(weights_only=True)`, applied strictly: the pickle inside the
archive is read by an Unpickler whose `find_class` answers only the handful of globals a state dict is made of
(`OrderedDict`, the tensor and parameter rebuild functions, the typed storage classes), each with a function of
ours. Any other global (which is how pickled code arrives) raises `RefusedGlobal` before anything from the file runs.

Anything this reader does not know (the pre-1.6 legacy format, a tensor subclass, sparse or quantized tensors)
raises `Unsupported`, and the caller can hand the file to `torch.load(weights_only=True)` instead.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class Unsupported(ValueError):
    """A file this reader cannot read but `torch.load(weights_only=True)` may: legacy format, unknown tensor kind."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list: a weights file holds tensors, never code."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise Unsupported(f"a tensor built on {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> Any:
    return data  # an nn.Parameter's value is its tensor


def _ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            pass
        if module == "torch" or module.startswith("torch."):
            raise Unsupported(f"the pickle uses {module}.{name}, which this reader does not know")
        raise RefusedGlobal(f"refused to unpickle the global {module}.{name}: a weights file holds tensors, not code")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise Unsupported(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        return _Storage(str(key), storage_type.dtype, int(numel))


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start: after its local header, whose extra field may differ
    from the central directory's."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_state_dict(path: str, mmap: bool = False) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict as name -> numpy array (each storage read once; views share it as torch does).

    Args:
      path: a zip-format PyTorch checkpoint.
      mmap: map the storages read-only instead of reading them into memory.

    Returns:
      name -> array, in the file's order.

    Raises:
      Unsupported: not the zip format, or something in it this reader does not know (try torch.load).
      RefusedGlobal: the pickle references code.
      ValueError, zipfile.BadZipFile, OSError: a damaged file (the message says what is wrong).
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise zipfile.BadZipFile("a damaged zip archive (truncated or corrupt)")
        raise Unsupported("not a zip-format PyTorch checkpoint (legacy torch.save format?)")
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise Unsupported(f"expected one <archive>/data.pkl, found {len(pkl_names)}")
        prefix = pkl_names[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in zf.namelist():
            big_endian = zf.read(prefix + "byteorder").strip() == b"big"
        state = _StateDictUnpickler(zf.open(pkl_names[0])).load()
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"expected a state dict (name -> tensor), got {type(state).__name__}")

        storages: dict[str, np.ndarray] = {}

        def storage(s: _Storage) -> np.ndarray:
            if s.key in storages:
                return storages[s.key]
            name = f"{prefix}data/{s.key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise ValueError(f"storage {name!r} is missing from the archive") from None
            nbytes = s.numel * s.dtype.itemsize
            if info.file_size != nbytes:
                raise ValueError(
                    f"storage {name!r} holds {info.file_size} bytes, expected {nbytes} ({s.numel} x {s.dtype})"
                )
            dtype = s.dtype.newbyteorder(">") if big_endian else s.dtype
            if info.compress_type != zipfile.ZIP_STORED:
                arr = np.frombuffer(bytearray(zf.read(name)), dtype=dtype)
            else:
                offset = _data_offset(raw, info)
                if offset + nbytes > os.fstat(raw.fileno()).st_size:
                    raise ValueError(f"storage {name!r} runs past the end of the file (truncated?)")
                if mmap and nbytes:
                    arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(s.numel,))
                else:
                    arr = np.empty(s.numel, dtype=dtype)
                    raw.seek(offset)
                    if raw.readinto(arr.view(np.uint8)) != nbytes:
                        raise ValueError(f"storage {name!r}: short read (truncated file?)")
            if big_endian:
                arr = arr.astype(s.dtype)
            storages[s.key] = arr
            return arr

        out: dict[str, np.ndarray] = {}
        for key, t in state.items():
            if not isinstance(t, _Tensor):
                raise ValueError(f"entry {key!r} is a {type(t).__name__}, not a tensor")
            buf = storage(t.storage)
            item = buf.dtype.itemsize
            if len(t.shape) != len(t.stride) or any(d < 0 for d in t.shape) or any(s < 0 for s in t.stride):
                raise ValueError(f"entry {key!r} has an invalid size {t.shape} or stride {t.stride}")
            extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True)) if all(t.shape) else 0
            if t.offset < 0 or t.offset + extent > buf.size:
                raise ValueError(
                    f"entry {key!r} (shape {t.shape}, offset {t.offset}) reaches past its storage "
                    f"of {buf.size} elements"
                )
            out[str(key)] = np.lib.stride_tricks.as_strided(
                buf[t.offset :], shape=t.shape, strides=tuple(s * item for s in t.stride), writeable=False
            )
    return out
