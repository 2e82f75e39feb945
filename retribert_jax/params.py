"""The one table between HF/PyTorch RetriBERT parameter names and ours, used in both directions.

Each rule pairs a PyTorch name template with a Flax path template and says how the tensor changes on the way:
`nn.Linear.weight` is [out, in] and `nnx.Linear.kernel` is [in, out] (transpose); everything else is kept as it is.
Expanding the rules over a config gives every parameter the model has, so conversion is strict both ways: a name
outside the table, a parameter never filled, one filled twice, or a wrong shape is an error naming the key.

Flax paths name one tensor per HF tensor (`bert_query.encoder.layer.3.attention.self.query.kernel`): that is how our
checkpoint files store them. In the model, the encoder's layers are one stacked `BertLayer` (see modeling.py), so a
layer's parameter lives at the path without the index (`bert_query.encoder.layer.attention.self.query.kernel`), as
row 3 of an array with a leading [num_hidden_layers] axis. `stack_layers` and `flat_params` move between the two.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from retribert_jax.config import RetriBertConfig

FlaxPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One PyTorch name template <-> one Flax path template, and whether the tensor is transposed."""

    torch: str
    flax: str
    transpose: bool = False


_LAYER = "{enc}.encoder.layer.{i}"
RULES: tuple[Rule, ...] = (
    Rule("{enc}.embeddings.{emb}_embeddings.weight", "{enc}.embeddings.{emb}_embeddings.embedding"),
    Rule("{enc}.embeddings.LayerNorm.weight", "{enc}.embeddings.LayerNorm.scale"),
    Rule("{enc}.embeddings.LayerNorm.bias", "{enc}.embeddings.LayerNorm.bias"),
    Rule(_LAYER + ".attention.self.{qkv}.weight", _LAYER + ".attention.self.{qkv}.kernel", transpose=True),
    Rule(_LAYER + ".attention.self.{qkv}.bias", _LAYER + ".attention.self.{qkv}.bias"),
    Rule(_LAYER + ".{block}.dense.weight", _LAYER + ".{block}.dense.kernel", transpose=True),
    Rule(_LAYER + ".{block}.dense.bias", _LAYER + ".{block}.dense.bias"),
    Rule(_LAYER + ".{norm}.LayerNorm.weight", _LAYER + ".{norm}.LayerNorm.scale"),
    Rule(_LAYER + ".{norm}.LayerNorm.bias", _LAYER + ".{norm}.LayerNorm.bias"),
    Rule("{enc}.pooler.dense.weight", "{enc}.pooler.dense.kernel", transpose=True),
    Rule("{enc}.pooler.dense.bias", "{enc}.pooler.dense.bias"),
    Rule("project_{side}.weight", "project_{side}.kernel", transpose=True),
)

# Buffers HF stores beside the parameters; they hold no learned values and are skipped on reading.
SKIPPED_BUFFERS = re.compile(r"^(bert_query|bert_doc)\.embeddings\.(position_ids|token_type_ids)$")
# Checkpoints from before transformers 2.x name LayerNorm parameters gamma/beta.
_LEGACY = (
    (re.compile(r"\.LayerNorm\.gamma$"), ".LayerNorm.weight"),
    (re.compile(r"\.LayerNorm\.beta$"), ".LayerNorm.bias"),
)


def _placeholders(cfg: RetriBertConfig) -> dict[str, tuple[Any, ...]]:
    return {
        "enc": ("bert_query",) if cfg.share_encoders else ("bert_query", "bert_doc"),
        "i": tuple(range(cfg.num_hidden_layers)),
        "emb": ("word", "position", "token_type"),
        "qkv": ("query", "key", "value"),
        "block": ("attention.output", "intermediate", "output"),
        "norm": ("attention.output", "output"),
        "side": ("query", "doc"),
    }


def parse_path(dotted: str) -> FlaxPath:
    """`"a.layer.3.b"` -> `("a", "layer", 3, "b")`: the one parser of dotted names (safetensors keys, orbax keys)."""
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def path_str(path: FlaxPath) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its PyTorch name, its Flax path, whether it is transposed, and where it lives in the model
    (`model_path`, and `layer`: its row of the stacked layers, or None outside them)."""

    torch_key: str
    flax_path: FlaxPath
    transpose: bool
    model_path: FlaxPath
    layer: int | None


def _layer_split(path: FlaxPath) -> tuple[FlaxPath, int | None]:
    """A Flax path -> (its path in the model, its layer index); paths outside `encoder.layer.{i}` are unchanged."""
    for k in range(len(path) - 1):
        if path[k] == "layer" and isinstance(path[k + 1], int):
            return path[: k + 1] + path[k + 2 :], path[k + 1]
    return path, None


def param_table(cfg: RetriBertConfig) -> list[Entry]:
    """Every parameter of a RetriBertModel with this config."""
    values = _placeholders(cfg)
    entries = []
    for rule in RULES:
        names = sorted(set(re.findall(r"{(\w+)}", rule.torch)))
        for combo in itertools.product(*(values[n] for n in names)):
            subst = dict(zip(names, combo, strict=True))
            path = parse_path(rule.flax.format(**subst))
            entries.append(Entry(rule.torch.format(**subst), path, rule.transpose, *_layer_split(path)))
    return entries


def checkpoint_shapes(
    model_shapes: Mapping[FlaxPath, tuple[int, ...]], cfg: RetriBertConfig
) -> dict[FlaxPath, tuple[int, ...]]:
    """Flax path -> shape of each stored tensor, from the model's (stacked) shapes, e.g. of `abstract_model`."""
    return {e.flax_path: tuple(model_shapes[e.model_path])[e.layer is not None :] for e in param_table(cfg)}


def check_arrays(arrays: Mapping[FlaxPath, Any], expected: Mapping[FlaxPath, tuple[int, ...]], source: str) -> None:
    """Every expected parameter present with its shape, and nothing else (`arrays` may hold shape-only specs).

    Raises:
      ValueError: naming `source` and the missing, unexpected or misshapen parameters.
    """
    missing = [path_str(p) for p in expected if p not in arrays]
    extra = [path_str(p) for p in arrays if p not in expected]
    if missing or extra:
        raise ValueError(
            f"{source}: parameters do not match the config: {len(missing)} missing {missing[:3]}, "
            f"{len(extra)} unexpected {extra[:3]}"
        )
    for p, shape in expected.items():
        if tuple(arrays[p].shape) != tuple(shape):
            raise ValueError(
                f"{source}: parameter {path_str(p)!r} has shape {tuple(arrays[p].shape)}, expected "
                f"{tuple(shape)} from the config"
            )


def stack_layers(arrays: Mapping[FlaxPath, Any], cfg: RetriBertConfig, stack=np.stack) -> dict[FlaxPath, Any]:
    """Flax path -> array (one per HF tensor) to model path -> array, the layers' tensors stacked along a new leading
    axis in layer order. `stack` is `np.stack` or `jnp.stack` (for arrays already on a device)."""
    out: dict[FlaxPath, Any] = {}
    layers: dict[FlaxPath, list[Any]] = {}
    for e in param_table(cfg):
        if e.layer is None:
            out[e.model_path] = arrays[e.flax_path]
        else:
            layers.setdefault(e.model_path, [None] * cfg.num_hidden_layers)[e.layer] = arrays[e.flax_path]
    for path, rows in layers.items():
        out[path] = stack(rows)
    return out


def flat_params(state: Any, cfg: RetriBertConfig | None = None) -> dict[FlaxPath, Any]:
    """Flax path -> array for every parameter (one per HF tensor, the layers unstacked as views/slices).

    Args:
      state: a RetriBertModel, an `nnx.State` of its parameters (e.g. gradients), or model path -> array.
      cfg: the model's config (default: the model's own).
    """
    if isinstance(state, nnx.Module):
        cfg = cfg or state.config
        state = nnx.state(state, nnx.Param)
    if isinstance(state, nnx.State):
        state = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    return {
        e.flax_path: state[e.model_path] if e.layer is None else state[e.model_path][e.layer] for e in param_table(cfg)
    }


def weights_fingerprint(model: nnx.Module, samples: int = 1024) -> str:
    """A short fingerprint of a model's weights: SHA-256 (16 hex digits) over every HF tensor's name, shape and
    `samples` evenly spaced entries, as float32. What an embedding directory records of the model that embedded it,
    so that searching it with another model's weights (a fine-tuned one, say) is refused.

    Sampling keeps the hashing cheap for any model size (a few thousand entries a tensor); training
    or conversion to another stored dtype changes nearly every entry, so two models that differ meet equal samples
    only by design. The name table, not the in-memory layout, orders it: a model stored or stacked otherwise has the
    same fingerprint.
    """
    import hashlib

    table = param_table(model.config)
    state = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    wanted: dict[FlaxPath, list[np.ndarray]] = {}
    shapes = {}
    for e in table:  # each tensor's entries, as positions in its model path's flat array
        arr = state[e.model_path]
        shapes[e.flax_path] = tuple(arr.shape[1:] if e.layer is not None else arr.shape)
        n = int(np.prod(shapes[e.flax_path]))
        wanted.setdefault(e.model_path, []).append(
            (e.layer or 0) * n + np.linspace(0, n - 1, min(n, samples), dtype=np.int64)
        )
    # Gathered on the host: on a CPU the arrays are there already, and a device-side gather would compile a program
    # per shape (a second for RetriBERT-base), where one copy of the weights costs milliseconds.
    values = {
        p: iter(
            np.split(
                np.asarray(state[p], np.float32).reshape(-1)[np.concatenate(idx)], np.cumsum([len(i) for i in idx])[:-1]
            )
        )
        for p, idx in wanted.items()
    }
    h = hashlib.sha256()
    for e in table:
        h.update(f"{path_str(e.flax_path)}{shapes[e.flax_path]}".encode())
        h.update(np.ascontiguousarray(next(values[e.model_path]), dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def canonical_torch_key(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = pattern.sub(repl, key)
    return key


def torch_to_flax(
    tensors: Mapping[str, Any],
    cfg: RetriBertConfig,
    expected: Mapping[FlaxPath, tuple[int, ...]],
    source: str = "checkpoint",
) -> dict[FlaxPath, np.ndarray]:
    """Maps a PyTorch state dict (name -> array-like) onto Flax paths, strictly.

    Args:
      tensors: PyTorch names to arrays (numpy, or anything `np.asarray` takes); read lazily, one at a time.
      cfg: the config the checkpoint claims.
      expected: Flax path -> shape (`checkpoint_shapes`).
      source: what to call the checkpoint in error messages (its path).

    Returns:
      Flax path -> numpy array in the Flax layout, every parameter of the model exactly once.

    Raises:
      ValueError: a key outside the table, one given twice, a missing one, or a shape the config does not imply.
    """
    by_torch = {e.torch_key: e for e in param_table(cfg)}
    out: dict[FlaxPath, np.ndarray] = {}
    origin: dict[FlaxPath, str] = {}
    unknown = []
    for key in tensors:
        if SKIPPED_BUFFERS.match(key):
            continue
        entry = by_torch.get(canonical_torch_key(key))
        if entry is None:
            unknown.append(key)
            continue
        if entry.flax_path in out:
            raise ValueError(
                f"{source}: parameter {entry.torch_key!r} is given twice, as {origin[entry.flax_path]!r} and {key!r}"
            )
        want = tuple(expected[entry.flax_path])
        want_torch = want[::-1] if entry.transpose else want
        value = tensors[key]
        shape = tuple(value.shape)
        if shape != want_torch:
            raise ValueError(f"{source}: key {key!r} has shape {shape}, expected {want_torch} from the config")
        arr = np.asarray(value)
        out[entry.flax_path] = arr.T if entry.transpose else arr
        origin[entry.flax_path] = key
    if unknown:
        shown = ", ".join(repr(k) for k in sorted(unknown)[:5])
        hint = ""
        if any(k.startswith("bert_doc.") for k in unknown) and cfg.share_encoders:
            hint = " (the checkpoint has bert_doc but the config says share_encoders=true)"
        raise ValueError(f"{source}: {len(unknown)} unexpected key(s): {shown}{hint}")
    missing = [e.torch_key for e in by_torch.values() if e.flax_path not in out]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        raise ValueError(f"{source}: {len(missing)} missing key(s): {shown}")
    return out


def flax_to_torch(params: Mapping[FlaxPath, Any], cfg: RetriBertConfig) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: Flax path -> array to PyTorch name -> numpy array (PyTorch layout)."""
    table = {e.flax_path: e for e in param_table(cfg)}
    extra = [path_str(p) for p in params if p not in table]
    if extra:
        raise ValueError(f"parameters outside the RetriBERT table: {extra[:5]}")
    missing = [path_str(p) for p in table if p not in params]
    if missing:
        raise ValueError(f"parameters missing for export: {missing[:5]}")
    out = {}
    for path, entry in table.items():
        arr = np.asarray(params[path])
        out[entry.torch_key] = np.ascontiguousarray(arr.T if entry.transpose else arr)
    return out
