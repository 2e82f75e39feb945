"""The configs: `RetriBertConfig` (every field of HF's RetriBertConfig, with a lossless `config.json` round trip)
and `TrainConfig` (training's hyper-parameters). Plain dataclasses: importing them costs nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

# The activations HF BERT accepts under these names; "gelu" is the exact (erf) one.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")


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
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "projection_dim")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
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
        base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, projection_dim=16)
        return cls(**{**base, **changes})


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
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.micro_batch_size is not None and (self.micro_batch_size <= 0
                                                  or self.batch_size % self.micro_batch_size):
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must be positive and divide "
                             f"batch_size {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
