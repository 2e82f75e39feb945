"""The configs: `RetriBertConfig` (every field of HF's RetriBertConfig, with a lossless `config.json` round trip),
`RunConfig` (how a model runs: dtypes, matmul precision, attention kernel, compiler options) and `TrainConfig`
(training's hyper-parameters). Plain dataclasses: importing them costs nothing."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

# The activations HF BERT accepts under these names; "gelu" is the exact (erf) one.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")

COMPUTE_DTYPES = ("float32", "bfloat16")
# jax.lax.Precision's names, and the aliases JAX accepts for them ("float32" is HIGHEST, and so on).
PRECISIONS = ("default", "high", "highest")
_PRECISION_ALIASES = {"bfloat16": "default", "fastest": "default", "tensorfloat32": "high", "float32": "highest"}
ATTENTION_IMPLS = ("xla", "cudnn")

# XLA options per platform for every program compiled for a model (`compilation.compile_lowered` applies them).
# cpu: the loop emitter that predates XLA:CPU's fusion emitters makes kernels as fast for our programs and compiles
#   them ~14% sooner (`benchmarks/profiling.py compile`).
# gpu: cuBLAS for every GEMM instead of XLA's Triton GEMM fusions: +13% forward throughput and half the first
#   training step's compile time on an H200 (README, "The accelerator path").
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_use_fusion_emitters": False},
    "gpu": {"xla_gpu_enable_triton_gemm": False},
}
# The training step's: cuBLAS on GPUs likewise; on CPUs XLA's defaults, since the loop emitter compiles a training
# step (backward pass included) ~30% slower there.
TRAIN_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {"gpu": COMPILER_OPTIONS["gpu"]}
# Search programs' (`search.Index`): on CPUs YNNPACK takes the matrix products only, leaving the screen's group
# maxima to XLA's own loops. With the screen's earlier per-slot insertion network that ran it faster than YNNPACK's
# reduce fusions (on by default): 2^20 x 128 rows for 256 queries, 0.92 -> 0.81 s on a 2-core Xeon with AVX-512
# (2026-12-06). With the current screen the two are level on a 2-core AVX2 EPYC (0.70-0.77 vs 0.69-0.84 s).
SEARCH_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


@dataclasses.dataclass(frozen=True)
class RetriBertConfig:
    """Hyper-parameters of a RetriBERT bi-encoder, named and defaulted as in HF transformers."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    share_encoders: bool = True
    projection_dim: int = 128
    pad_token_id: int = 0
    # Keys of config.json that are not fields above (architectures, transformers_version, dtype, ...),
    # kept verbatim so that reading and writing a config loses nothing.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "projection_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config: unknown hidden_act {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"config: {name} must be in [0, 1), got {p!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"config: layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"config: pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> RetriBertConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {**self.extra, **d}
        out.setdefault("model_type", "retribert")
        return out

    def to_transformers_dict(self) -> dict[str, Any]:
        """config.json as transformers' PyTorch RetriBertModel needs it (what `export-pytorch` writes).

        HF's RetriBertConfig never defined `position_embedding_type`, which the BERT layers of transformers >= 4.3x
        read: without it transformers cannot construct the model. This is the one place that supplies it.
        """
        d = self.to_hf_dict()
        d.setdefault("architectures", ["RetriBertModel"])
        d.setdefault("position_embedding_type", "absolute")
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> RetriBertConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_hf_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RetriBertConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_json_file(path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def replace(self, **changes) -> RetriBertConfig:
        return dataclasses.replace(self, **changes)

    def architecture_hash(self) -> str:
        """A short hash of the fields that decide the parameters' shapes and the model's numbers."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # Named constructors for known checkpoints.
    @classmethod
    def retribert_base_uncased(cls) -> RetriBertConfig:
        """`yjernite/retribert-base-uncased`: 8 layers x 768, shared encoders, 128-d projections."""
        return cls()

    @classmethod
    def tiny(cls, **changes) -> RetriBertConfig:
        """A tiny random configuration for tests and smoke runs."""
        base = dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            projection_dim=16,
        )
        return cls(**{**base, **changes})


def _dtype_name(value: Any, what: str) -> str:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np

    try:
        name = np.dtype(value).name
    except TypeError:
        raise ValueError(f"{what} must be one of {COMPUTE_DTYPES}, got {value!r}") from None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {COMPUTE_DTYPES}, got {name}")
    return name


def precision_name(value: Any) -> str | None:
    """ "default", "high" or "highest" for a `jax.lax.Precision`, its name or an alias JAX accepts ("float32",
    "tensorfloat32", "bfloat16"); None for None. Raises ValueError for anything else."""
    if value is None:
        return None
    name = str(getattr(value, "name", value)).lower()
    name = _PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None for JAX's default), got {value!r}")
    return name


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a model runs, held by the model (`RetriBertModel.run_config`) and read by every program built for it, on
    whichever thread compiles it: the Encoder's, search's and the training step's. Changing it changes no parameter.

    Fields:
      dtype: compute dtype of the matmuls, "float32" or "bfloat16". Parameters stay float32 in memory.
      residual_dtype: dtype of the residual stream and the LayerNorm outputs; None: the compute dtype (bf16 mode
        then keeps activations in bf16 between blocks, as a bf16 PyTorch model does). LayerNorm statistics, the
        softmax, the pooler's tanh and the embeddings are computed in float32 whatever it is.
      precision: matmul precision, "default", "high" or "highest" (`jax.lax.Precision`); None: JAX's default where
        the call is made (`jax.default_matmul_precision(...)` around it, or `jax_default_matmul_precision`). The
        Encoder reads that default on the calling thread and compiles with it, even on its compile thread.
      attention_impl: "xla" (portable) or "cudnn" (GPU flash attention, bfloat16 only).
      trim_last_layer: when only the [CLS] rows are wanted, the last layer computes them alone (see
        `modeling.BertEncoder`); False runs it on every row: same numbers, fewer kernels to compile.
      scan_unroll: the layer scan's `unroll`, an int >= 1 (the depth unrolls it fully). Booleans are refused: a graph
        compares its static attributes with ==, so True would share programs with 1.

    Raises:
      ValueError: a field outside its choices, named.
    """

    dtype: str = "float32"
    residual_dtype: str | None = None
    precision: str | None = None
    attention_impl: str = "xla"
    trim_last_layer: bool = True
    scan_unroll: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        if self.residual_dtype is not None:
            set_("residual_dtype", _dtype_name(self.residual_dtype, "residual_dtype"))
        set_("precision", precision_name(self.precision))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
            # cuDNN's fused attention has no float32 kernel; say so here, not in a GPU compile error.
            raise ValueError(f"attention_impl='cudnn' needs the bfloat16 compute dtype, got {self.dtype}")
        if not isinstance(self.trim_last_layer, bool):
            raise ValueError(f"trim_last_layer must be True or False, got {self.trim_last_layer!r}")
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be an int >= 1, got {self.scan_unroll!r}")

    @property
    def stream_dtype(self) -> str:
        """The residual stream's dtype: `residual_dtype`, or the compute dtype when that is None."""
        return self.residual_dtype or self.dtype

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, **changes) -> RunConfig:
        """`replace` with the changes that are not None (keyword arguments a caller left unset)."""
        return self.replace(**{k: v for k, v in changes.items() if v is not None})

    def compiler_options(self, platform: str, training: bool = False) -> dict[str, Any]:
        """The XLA options for programs compiled on `platform` ("cpu", "gpu", "tpu"): `COMPILER_OPTIONS`, or
        `TRAIN_COMPILER_OPTIONS` for a training step."""
        return dict((TRAIN_COMPILER_OPTIONS if training else COMPILER_OPTIONS).get(platform, {}))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; the defaults are the ELI5 retriever recipe (lfqa_utils `train_qa_retriever`)."""

    learning_rate: float = 2e-4
    adam_eps: float = 1e-8
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    # The recipe used transformers' AdamW, whose default weight decay is 0.0, over all parameters.
    weight_decay: float = 0.0
    warmup_steps: int = 100
    batch_size: int = 512
    max_length: int = 128
    checkpoint_batch_size: int = 32
    num_epochs: int = 10
    max_steps: int | None = None  # stop early (the schedule still spans `num_epochs`)
    micro_batch_size: int | None = None  # gradient accumulation: micro-batches of this size, negatives over the batch
    num_negatives: int = 1  # hard negatives per question, sampled per epoch from the pair's "negatives" (0: none)
    grad_clip: float | None = None  # clip by global norm
    dropout: bool = True
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self):
        for name in ("batch_size", "max_length", "num_epochs", "save_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_negatives, int) or self.num_negatives < 0:
            raise ValueError(f"num_negatives must be an integer >= 0, got {self.num_negatives!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        # A NaN or infinite value trained a NaN model to the end without a word (every comparison below is False).
        for name in ("learning_rate", "adam_eps", "adam_b1", "adam_b2", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.adam_eps <= 0 or self.weight_decay < 0 or not (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1):
            raise ValueError(
                f"adam_eps must be positive, weight_decay >= 0 and adam_b1, adam_b2 in [0, 1); got {self.adam_eps}, "
                f"{self.weight_decay}, {self.adam_b1}, {self.adam_b2}"
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {self.max_length}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.micro_batch_size is not None and (
            self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size
        ):
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must be positive and divide batch_size {self.batch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
