"""RetriBERT in Flax NNX.

The module tree mirrors HF transformers' PyTorch one name for name (`bert_query.encoder.layer[i].attention.self.query`)
so that `params.py` is a plain table and the two codes can be read side by side.

How a model runs is one `config.RunConfig`, held by the model (`run_config`) and handed to every block: the
compute dtype of the matmuls, the residual stream's dtype, the matmul precision (given to every dot, so that a
program compiled on any thread has it), the attention kernel, the last layer's trimming and the scan's unroll.

Numerics: parameters are float32. In float32 mode everything is float32. In bfloat16 mode the matmuls take bfloat16
operands; the residual stream and LayerNorm outputs are bfloat16 too unless `residual_dtype="float32"`; LayerNorm
statistics, the embeddings' sum, attention scores and softmax, the pooler's tanh and the projections' outputs are
float32. GELU is the exact (erf) one when the config says "gelu". Masked attention logits are set to float32's most
negative value, as HF's additive mask does, so padded keys get exactly zero weight.

Packed rows (Krell et al., 2021, "Efficient Sequence Packing without Cross-contamination"): several sequences may
share one row of `input_ids` (`encode.pack_rows` fills rows so), told apart as in HF's packed-sequence convention by
`position_ids` that restart at 0 where each sequence starts. A token then attends only to the tokens of its own
sequence, with its own positions, so every sequence gets the numbers it would get alone; `cls_index` [B, S] says
where each row's sequences start, and the pooler reads those rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from retribert_jax.config import RetriBertConfig, RunConfig

Array = jax.Array


def activation(name: str):
    return {
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }[name]


def _init(base):
    """`base`, except that with no key (see `abstract_model`) it returns the shape instead of an array."""

    def init(key, shape, dtype=jnp.float32):
        if key is None:
            return jax.ShapeDtypeStruct(tuple(shape), dtype)
        return base(key, shape, dtype)

    return init


def _normal(cfg: RetriBertConfig):
    return _init(nnx.initializers.normal(cfg.initializer_range))


def _linear(
    cfg: RetriBertConfig, din: int, dout: int, run: RunConfig, *, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=jnp.dtype(run.dtype),
        param_dtype=jnp.float32,
        precision=run.precision,
        kernel_init=_normal(cfg),
        bias_init=_init(nnx.initializers.zeros),
        rngs=rngs,
    )


def _layer_norm(cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - mean^2. Flax computes the
    # statistics and the normalisation in float32 whatever `dtype` is, and casts only the output to it.
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=jnp.dtype(run.stream_dtype),
        param_dtype=jnp.float32,
        scale_init=_init(nnx.initializers.ones),
        bias_init=_init(nnx.initializers.zeros),
        rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    """Word + position + token-type (always 0) embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        init = _normal(cfg)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, rngs=rngs
        )
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.LayerNorm = _layer_norm(cfg, run, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, deterministic=True)

    def __call__(self, input_ids: Array, position_ids: Array | None = None, *, rngs: nnx.Rngs | None = None) -> Array:
        """int [B, L] token ids (and positions, default 0..L-1) -> [B, L, D] in the residual stream's dtype.

        Raises:
          ValueError: L is longer than the position table (`max_position_embeddings`).
        """
        length = input_ids.shape[1]
        limit = self.position_embeddings.num_embeddings
        if length > limit:
            raise ValueError(
                f"input length {length} is longer than the model's max_position_embeddings ({limit}); "
                f"truncate the input to at most {limit} tokens"
            )
        with jax.named_scope("embeddings"):  # trace and HLO names read like the modules
            return self._embed(input_ids, position_ids, length, rngs)

    def _embed(self, input_ids: Array, position_ids: Array | None, length: int, rngs: nnx.Rngs | None) -> Array:
        x = self.word_embeddings(input_ids)  # B L D
        if position_ids is None:
            x = x + self.position_embeddings.embedding[:length][None]  # + 1 L D
        else:
            x = x + self.position_embeddings(position_ids)  # + B L D
        # RetriBERT's tokenizer returns no token_type_ids: every token is type 0.
        x = x + self.token_type_embeddings.embedding[0][None, None]  # + 1 1 D
        return self.dropout(self.LayerNorm(x), rngs=rngs)


class BertSelfAttention(nnx.Module):
    """Multi-head scaled dot-product attention over the unmasked keys."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = _linear(cfg, d, d, run, rngs=rngs)
        self.key = _linear(cfg, d, d, run, rngs=rngs)
        self.value = _linear(cfg, d, d, run, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob, deterministic=True)
        self.attention_impl, self.precision = run.attention_impl, run.precision

    def __call__(
        self,
        x: Array,
        mask: Array,
        *,
        rngs: nnx.Rngs | None = None,
        cls_only: bool = False,
        cls_index: Array | None = None,
    ) -> Array:
        """Context vectors [B, L, D] under `mask` (an attention mask [B, L], or `visible_keys`' bool [B, 1 or L, L]);
        when `cls_only`, for the [CLS] queries alone: [B, 1, D], or [B, S, D] at `cls_index` [B, S]."""
        b, length, _ = x.shape
        if mask.ndim == 2:
            mask = visible_keys(mask)
        if cls_only:
            # Every key and value, but only the [CLS] queries: all the pooler reads from the last layer.
            q = self.query(cls_rows(x, cls_index))  # B Lq D
            if mask.shape[1] > 1:
                mask = cls_rows(mask, cls_index)  # B Lq L
        else:
            q = self.query(x)  # B L D
        k, v = self.key(x), self.value(x)  # B L D each
        q = q.reshape(b, q.shape[1], self.num_heads, self.head_dim)  # B Lq H Dh
        k = k.reshape(b, length, self.num_heads, self.head_dim)  # B L H Dh
        v = v.reshape(b, length, self.num_heads, self.head_dim)
        dropout_on = not self.dropout.deterministic and self.dropout.rate > 0
        if self.attention_impl == "cudnn" and not dropout_on:
            # cuDNN takes the mask as a bias of the full [B, 1, Lq, L] shape (it does not broadcast over queries).
            full = jnp.broadcast_to(mask[:, None], (b, 1, q.shape[1], length))
            ctx = jax.nn.dot_product_attention(q, k, v, mask=full, implementation="cudnn")
        else:
            # Heads-major operands, the mask as an additive bias, and the softmax's division applied to the [Lq, Dh]
            # context rather than the [Lq, L] probabilities: the same numbers as softmax-then-PV (1e-6 apart in
            # fp32), and the form XLA:CPU fuses well (7x faster attention at L=128 than the textbook order, which
            # it splits into slow [B, H, L, L] passes). Dropout of the probabilities commutes with the per-row
            # division, so it drops the same entries of the unnormalised weights.
            qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # B H L Dh (Lq for q)
            scores = jnp.einsum(
                "bhqd,bhkd->bhqk", qh, kh, precision=self.precision, preferred_element_type=jnp.float32
            )  # B H Lq L
            # HF's additive mask (float32's most negative finite value, not -inf): a row with no unmasked key (a
            # padding row) gets uniform weights, not NaN.
            bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # B 1 (1 or Lq) L
            scores = scores * (1.0 / math.sqrt(self.head_dim)) + bias
            weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
            total = weights.sum(axis=-1, keepdims=True)  # B H Lq 1
            weights = self.dropout(weights, rngs=rngs)
            ctx = jnp.einsum(
                "bhqk,bhkd->bhqd",
                weights.astype(v.dtype),
                vh,
                precision=self.precision,
                preferred_element_type=jnp.float32,
            )
            ctx = (ctx / total).astype(v.dtype).transpose(0, 2, 1, 3)  # B Lq H Dh
        return ctx.reshape(b, q.shape[1], -1)  # B Lq D


class BertSelfOutput(nnx.Module):
    """Attention output projection, dropout, residual and LayerNorm."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, run, rngs=rngs)
        self.LayerNorm = _layer_norm(cfg, run, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, deterministic=True)

    def __call__(self, h: Array, residual: Array, *, rngs: nnx.Rngs | None = None) -> Array:
        return self.LayerNorm(self.dropout(self.dense(h), rngs=rngs) + residual)


class BertAttention(nnx.Module):
    """Self-attention followed by its output block."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, run, rngs=rngs)
        self.output = BertSelfOutput(cfg, run, rngs=rngs)

    def __call__(
        self,
        x: Array,
        mask: Array,
        *,
        rngs: nnx.Rngs | None = None,
        cls_only: bool = False,
        cls_index: Array | None = None,
    ) -> Array:
        with jax.named_scope("attention"):
            residual = cls_rows(x, cls_index) if cls_only else x
            ctx = self.self(x, mask, rngs=rngs, cls_only=cls_only, cls_index=cls_index)
            return self.output(ctx, residual, rngs=rngs)


class BertIntermediate(nnx.Module):
    """FFN up-projection and activation."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, run, rngs=rngs)
        self.hidden_act = cfg.hidden_act  # a name, not a function, so that graphdefs of equal configs compare equal

    def __call__(self, x: Array) -> Array:
        return activation(self.hidden_act)(self.dense(x))


class BertOutput(nnx.Module):
    """FFN down-projection, dropout, residual and LayerNorm."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, run, rngs=rngs)
        self.LayerNorm = _layer_norm(cfg, run, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, deterministic=True)

    def __call__(self, h: Array, residual: Array, *, rngs: nnx.Rngs | None = None) -> Array:
        return self.LayerNorm(self.dropout(self.dense(h), rngs=rngs) + residual)


class BertLayer(nnx.Module):
    """One transformer block."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, run, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, run, rngs=rngs)
        self.output = BertOutput(cfg, run, rngs=rngs)

    def __call__(
        self,
        x: Array,
        mask: Array,
        *,
        rngs: nnx.Rngs | None = None,
        cls_only: bool = False,
        cls_index: Array | None = None,
    ) -> Array:
        """[B, L, D] -> [B, L, D]; with `cls_only`, the [CLS] rows alone (keys still see every token): [B, 1, D], or
        [B, S, D] at `cls_index` [B, S] for packed rows."""
        a = self.attention(x, mask, rngs=rngs, cls_only=cls_only, cls_index=cls_index)
        with jax.named_scope("ffn"):
            return self.output(self.intermediate(a), a, rngs=rngs)


def _stack(layers: list[BertLayer]) -> BertLayer:
    """One BertLayer whose every parameter is the layers' parameters stacked along a new leading axis."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def stack(*leaves):
        if isinstance(leaves[0], jax.ShapeDtypeStruct):  # abstract_model: shapes only
            return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
        return jnp.stack(leaves)

    return nnx.merge(graphdef, jax.tree.map(stack, *states))


class BertEncoder(nnx.Module):
    """The stack of `num_hidden_layers` blocks, held as one `BertLayer` whose parameters have a leading
    [num_hidden_layers] axis: HF's `encoder.layer[i]` is row i (params.py maps the names both ways).

    The layers run as one `jax.lax.scan` over that axis, so a program compiles one layer body whatever the depth.
    `RunConfig.scan_unroll` is the scan's `unroll`: 1 (default) compiles one body; the depth unrolls the whole stack,
    which only analysis wants (XLA's `cost_analysis` counts a loop body once; `benchmarks/roofline.py` unrolls).

    `RunConfig.trim_last_layer` (default True): when only the [CLS] rows are wanted (`cls_only`), the last layer runs
    outside the scan on those rows alone. False runs it in the scan on every row and then takes the [CLS] rows: the
    same numbers, more compute, and a program with fewer distinct kernels, which XLA:CPU compiles ~40% faster
    (`benchmarks/bench_jobs.py`); the Encoder turns it off for jobs too short to repay that compilation.
    """

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.layer = _stack([BertLayer(cfg, run, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.num_layers = cfg.num_hidden_layers
        self.scan_unroll, self.trim_last_layer = run.scan_unroll, run.trim_last_layer

    def __call__(
        self,
        x: Array,
        mask: Array,
        *,
        rngs: nnx.Rngs | None = None,
        cls_only: bool = False,
        cls_index: Array | None = None,
    ) -> Array:
        """Hidden states [B, L, D] under `mask` ([B, L], or [B, 1 or L, L] from `visible_keys`); with `cls_only`,
        the last layer computes only the [CLS] rows: [B, 1, D], or [B, S, D] at `cls_index` [B, S] (packed rows).

        Only the pooler's input is needed for embeddings, so (with `trim_last_layer`) the last layer, outside the
        scan, runs its queries, attention output and FFN on one row instead of L (about 11% fewer FLOPs for 8
        layers); the numbers of that row are unchanged.
        """
        graphdef, state = nnx.split(self.layer)
        # One dropout key per call, folded with the layer index, so every layer draws its own masks.
        key = rngs.dropout() if rngs is not None else None
        trim = cls_only and self.trim_last_layer
        x = _run_layers(graphdef, state, x, mask, key, cls_index, cls_only=trim, unroll=self.scan_unroll)
        return cls_rows(x, cls_index) if cls_only and not trim else x


@functools.partial(jax.jit, static_argnames=("graphdef", "cls_only", "unroll"))
def _run_layers(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x: Array,
    mask: Array,
    key: Array | None,
    cls_index: Array | None,
    cls_only: bool,
    unroll: int | bool = 1,
) -> Array:
    """The layer stack as one scan (`BertEncoder.__call__`). Jitted on its own so that a model called eagerly
    compiles it once per shape rather than tracing a new scan every call; inside another jit it is inlined."""
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def block(h: Array, layer_state: nnx.State, i: Array | int | None, last: bool = False) -> Array:
        layer = nnx.merge(graphdef, layer_state)
        layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, i))
        return layer(h, mask, rngs=layer_rngs, cls_only=last, cls_index=cls_index)

    # The layer index only seeds dropout: without a key the scan carries none.
    index = jnp.arange(num_layers) if key is not None else None
    if not cls_only:
        # The stacked parameters are the scan's xs: it hands the body one layer's slice, with no indexing of every
        # parameter to trace and compile.
        x, _ = jax.lax.scan(lambda h, xs: (block(h, xs[1], xs[0]), None), x, (index, state), unroll=unroll)
        return x  # B L D
    # The last layer runs apart, so the scan indexes the first num_layers - 1 rows of the stack (slicing them off as
    # xs would copy them every call).
    x, _ = jax.lax.scan(
        lambda h, i: (block(h, jax.tree.map(lambda a: a[i], state), i), None),
        x,
        jnp.arange(num_layers - 1),
        unroll=unroll,
    )  # B L D
    last = num_layers - 1
    x = block(x, jax.tree.map(lambda a: a[last], state), last, last=True)  # B 1 D, or B S D
    return x


class BertPooler(nnx.Module):
    """tanh(dense(h_CLS))."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, run, rngs=rngs)

    def __call__(self, h: Array) -> Array:
        with jax.named_scope("pooler"):
            return jnp.tanh(self.dense(h[:, 0]).astype(jnp.float32))  # B D


class BertModel(nnx.Module):
    """HF's BertModel (with pooler), as RetriBERT uses it."""

    def __init__(self, cfg: RetriBertConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, run, rngs=rngs)
        self.encoder = BertEncoder(cfg, run, rngs=rngs)
        self.pooler = BertPooler(cfg, run, rngs=rngs)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array | None = None,
        cls_index: Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """The pooler output: float32 [B, D]; for packed rows (`cls_index` int [B, S] given, with the
        `position_ids` [B, L] that mark where sequences start), [B, S, D], one per packed sequence."""
        h = self.embeddings(input_ids, position_ids, rngs=rngs)
        return self.pooled(h, visible_keys(attention_mask, position_ids), cls_index, rngs=rngs)

    def pooled(self, h: Array, mask: Array, cls_index: Array | None = None, *, rngs: nnx.Rngs | None = None) -> Array:
        """The encoder and pooler over embedded tokens `h` [B, L, D] (see `__call__`)."""
        h = self.encoder(h, mask, rngs=rngs, cls_only=True, cls_index=cls_index)  # B 1 D, or B S D
        b, s, d = h.shape
        pooled = self.pooler(h.reshape(b * s, 1, d))
        return pooled if cls_index is None else pooled.reshape(b, s, d)


def visible_keys(attention_mask: Array, position_ids: Array | None = None) -> Array:
    """Which keys each query may attend to: bool [B, 1, L] (every query alike) from an int or bool [B, L] attention
    mask, or [B, L, L] for packed rows, where `position_ids` [B, L] restart at 0 where each sequence starts and a
    token sees only its own sequence's tokens."""
    valid = attention_mask.astype(bool)[:, None, :]  # B 1 L
    if position_ids is None:
        return valid
    sequence = jnp.cumsum(position_ids == 0, axis=1)  # B L: which packed sequence each token belongs to
    return valid & (sequence[:, :, None] == sequence[:, None, :])


def cls_rows(x: Array, cls_index: Array | None) -> Array:
    """The [CLS] rows of `x` [B, L, ...]: [B, 1, ...] (position 0), or [B, S, ...] at `cls_index` int [B, S]."""
    if cls_index is None:
        return x[:, :1]
    index = cls_index.reshape(cls_index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


class RetriBertModel(nnx.Module):
    """RetriBERT: BERT encoder(s) whose pooler outputs are projected to `projection_dim` without bias.

    Built in evaluation mode (dropout off), like a model HF's `from_pretrained` returns; `model.train()` turns
    dropout on, and a training call then needs `rngs`.

    Args:
      config: the architecture.
      run_config: how it runs (`config.RunConfig`); default float32, JAX's default precision, XLA attention.
      dtype, precision, attention_impl: shorthands that override those fields of `run_config` when given.
      rngs: initialisation randomness.

    Raises:
      ValueError: a run setting outside its choices (see `RunConfig`).
    """

    def __init__(
        self,
        config: RetriBertConfig,
        *,
        run_config: RunConfig | None = None,
        dtype: Any = None,
        precision: Any = None,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        run = (run_config or RunConfig()).with_overrides(
            dtype=dtype, precision=precision, attention_impl=attention_impl
        )
        self.config, self.run_config = config, run
        self.bert_query = BertModel(config, run, rngs=rngs)
        self.bert_doc = None if config.share_encoders else BertModel(config, run, rngs=rngs)
        self.project_query = _linear(config, config.hidden_size, config.projection_dim, run, use_bias=False, rngs=rngs)
        self.project_doc = _linear(config, config.hidden_size, config.projection_dim, run, use_bias=False, rngs=rngs)

    def with_run_config(self, run_config: RunConfig) -> RetriBertModel:
        """The same parameters (shared, not copied) under another `RunConfig`: another graph, the same state."""
        graphdef, _ = nnx.split(abstract_model(self.config, run_config=run_config))
        return nnx.merge(graphdef, nnx.state(self))

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> RetriBertModel:
        """Loads an HF RetriBERT checkpoint directory (or hub id), or a directory this package wrote.

        See `retribert_jax.checkpoint.load_model` for the arguments.
        """
        from retribert_jax.checkpoint import load_model

        return load_model(path, **kwargs)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """Writes config.json and the Flax parameters; see `retribert_jax.checkpoint.save_model`."""
        from retribert_jax.checkpoint import save_model

        save_model(self, directory, **kwargs)

    def embed_sentences_checkpointed(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        sent_encoder: BertModel,
        checkpoint_batch_size: int = -1,
        *,
        rngs: nnx.Rngs | None = None,
        position_ids: Array | None = None,
        cls_index: Array | None = None,
    ) -> Array:
        """Pooler outputs [B, D] ([B, S, D] for packed rows, see `BertModel`); with `checkpoint_batch_size` > 0 and
        B >= it, chunk-wise under remat as in HF."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=bool)
        n = input_ids.shape[0]
        if checkpoint_batch_size <= 0 or n < checkpoint_batch_size:
            return sent_encoder(input_ids, attention_mask, position_ids, cls_index, rngs=rngs)
        # Embeddings once for the whole batch, then the encoder and pooler chunk by chunk, with activations
        # recomputed in the backward pass instead of stored. The whole chunks run as one scan, so a program traces
        # and compiles one chunk however many the batch holds (a Python loop would compile each anew); a shorter
        # last chunk runs apart.
        h = sent_encoder.embeddings(input_ids, position_ids, rngs=rngs)  # B L D
        mask = visible_keys(attention_mask, position_ids)  # B 1|L L
        graphdef, state = nnx.split(sent_encoder)
        # One dropout key per call, folded with the chunk's index, so every chunk draws its own masks.
        key = rngs.dropout() if rngs is not None else None

        @jax.checkpoint
        def chunk(state: nnx.State, i: Array, h: Array, mask: Array, cls_index: Array | None) -> Array:
            bert = nnx.merge(graphdef, state)
            chunk_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, i))
            return bert.pooled(h, mask, cls_index, rngs=chunk_rngs)

        c = checkpoint_batch_size
        m, full = n // c, n // c * c

        def whole(a: Array | None) -> Array | None:
            return None if a is None else a[:full].reshape(m, c, *a.shape[1:])

        def rest(a: Array | None) -> Array | None:
            return None if a is None else a[full:]

        _, pooled = jax.lax.scan(
            lambda carry, xs: (carry, chunk(state, *xs)),
            None,
            (jnp.arange(m), whole(h), whole(mask), whole(cls_index)),
        )  # M C D, or M C S D
        pooled = pooled.reshape(full, *pooled.shape[2:])
        if full == n:
            return pooled
        return jnp.concatenate([pooled, chunk(state, jnp.asarray(m), rest(h), rest(mask), rest(cls_index))], axis=0)

    @property
    def doc_encoder(self) -> BertModel:
        return self.bert_query if self.bert_doc is None else self.bert_doc

    def embed_questions(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        checkpoint_batch_size: int = -1,
        *,
        rngs: nnx.Rngs | None = None,
        position_ids: Array | None = None,
        cls_index: Array | None = None,
    ) -> Array:
        """Question embeddings.

        Args:
          input_ids: int [B, L] token ids.
          attention_mask: [B, L], 1 for real tokens, 0 for padding; None means all ones.
          checkpoint_batch_size: > 0 encodes in chunks of that size under gradient checkpointing.
          rngs: dropout randomness; used only in training mode.
          position_ids: int [B, L] positions, default 0..L-1; for packed rows, restarting at 0 where each packed
            sequence starts (which is what tells the sequences apart, as in HF's packed-sequence convention).
          cls_index: int [B, S], packed rows only: the position of each packed sequence's [CLS] (its first token);
            unused slots may hold any position, and their outputs mean nothing.

        Returns:
          float32 [B, projection_dim], not normalised; [B, S, projection_dim] with `cls_index`.
        """
        reps = self.embed_sentences_checkpointed(
            input_ids,
            attention_mask,
            self.bert_query,
            checkpoint_batch_size,
            rngs=rngs,
            position_ids=position_ids,
            cls_index=cls_index,
        )
        return self.project_query(reps).astype(jnp.float32)

    def embed_answers(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        checkpoint_batch_size: int = -1,
        *,
        rngs: nnx.Rngs | None = None,
        position_ids: Array | None = None,
        cls_index: Array | None = None,
    ) -> Array:
        """Answer (passage) embeddings through `bert_doc` when present; same arguments as `embed_questions`."""
        reps = self.embed_sentences_checkpointed(
            input_ids,
            attention_mask,
            self.doc_encoder,
            checkpoint_batch_size,
            rngs=rngs,
            position_ids=position_ids,
            cls_index=cls_index,
        )
        return self.project_doc(reps).astype(jnp.float32)

    def __call__(
        self,
        input_ids_query: Array,
        attention_mask_query: Array | None,
        input_ids_doc: Array,
        attention_mask_doc: Array | None,
        checkpoint_batch_size: int = -1,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """The bidirectional in-batch cross-entropy `(CE(Q A^T) + CE(A Q^T)) / 2`, a float32 scalar.

        Args:
          input_ids_query, attention_mask_query: [B, Lq] questions.
          input_ids_doc, attention_mask_doc: [B, La] their answers, row i answering question i.
          checkpoint_batch_size: as in `embed_questions`.
          rngs: dropout randomness; used only in training mode.
        """
        q = self.embed_questions(input_ids_query, attention_mask_query, checkpoint_batch_size, rngs=rngs)
        a = self.embed_answers(input_ids_doc, attention_mask_doc, checkpoint_batch_size, rngs=rngs)
        return in_batch_loss(q, a, precision=self.run_config.precision)


def in_batch_loss(
    q: Array, a: Array, negatives: Array | None = None, negatives_valid: Array | None = None, *, precision: Any = None
) -> Array:
    """RetriBERT's bidirectional in-batch cross-entropy, `(CE(Q A^T, arange) + CE(A Q^T, arange)) / 2`, a float32
    scalar (HF's `RetriBertModel.forward`).

    With hard negatives (as in DPR, Karpukhin et al., 2020), the question -> passage side scores each question against
    every positive and every hard negative of the batch, `CE(Q [A; N]^T, arange)`; the passage -> question side is
    unchanged. Without them the loss is exactly HF's.

    Args:
      q, a: float [B, P], row i of `a` answering question i.
      negatives: float [M, P], the hard negatives of the whole batch (any order), or None.
      negatives_valid: bool [M]; False marks an empty slot, which takes no part in the softmax. None: all valid.
      precision: of the score matmuls (the model's `RunConfig.precision`); None: JAX's default.

    Raises:
      ValueError: `q` and `a` have different batch sizes.
    """
    if q.shape[0] != a.shape[0]:
        raise ValueError(f"in-batch loss needs as many questions as answers, got {q.shape[0]} and {a.shape[0]}")
    scores = jnp.matmul(q, a.T, precision=precision)  # B B
    labels = jnp.arange(scores.shape[0])
    loss_aq = optax.softmax_cross_entropy_with_integer_labels(scores.T, labels).mean()
    if negatives is not None:
        hard = jnp.matmul(q, negatives.T, precision=precision)  # B M
        if negatives_valid is not None:
            hard = jnp.where(negatives_valid[None, :], hard, jnp.finfo(hard.dtype).min)
        scores = jnp.concatenate([scores, hard], axis=1)  # B (B + M)
    loss_qa = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
    return (loss_qa + loss_aq) / 2


def flops_per_sequence(cfg: RetriBertConfig, length: int) -> float:
    """Nominal matmul FLOPs (2 per multiply-add) of one embedding of `length` tokens:
    layers * L * (8 D^2 + 4 D F + 4 L D) + 2 D^2 + 2 D P (QKV and output projections, FFN, QK^T and PV; pooler and
    projection). The [CLS]-only last layer does less; this is the count every framework's benchmark uses."""
    d, f, p = cfg.hidden_size, cfg.intermediate_size, cfg.projection_dim
    per_token_layer = 8 * d * d + 4 * d * f + 4 * length * d
    return cfg.num_hidden_layers * length * per_token_layer + 2 * d * d + 2 * d * p


def init_model(config: RetriBertConfig, seed: int = 0, **kwargs) -> RetriBertModel:
    """A randomly initialised model (HF's initialisation: normal(initializer_range) weights, zero biases)."""
    return RetriBertModel(config, rngs=nnx.Rngs(seed), **kwargs)


def abstract_model(config: RetriBertConfig, **kwargs) -> RetriBertModel:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
    # Constructing under `nnx.eval_shape` traces every initializer and key split (0.5-1 s for RetriBERT-base, most
    # of a load). Handing out no keys makes our initializers return shapes: the same structure, nothing computed.
    return RetriBertModel(config, rngs=_NoKeys(), **kwargs)  # type: ignore[arg-type]


class _NoKeys:
    """Stands in for `nnx.Rngs` in `abstract_model`: every parameter key is None."""

    def params(self) -> None:
        return None


KINDS = ("questions", "passages")


def embed_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: Array,
    attention_mask: Array,
    kind: str,
    position_ids: Array | None = None,
    cls_index: Array | None = None,
) -> Array:
    """Embeddings of one batch, as a pure function of the model's split state (jit it with `graphdef` and `kind`
    static: `embed` is that jitted function).

    Args:
      graphdef, state: `nnx.split(model)`.
      input_ids, attention_mask: int [B, L].
      kind: "questions" (`embed_questions`) or "passages" (`embed_answers`).
      position_ids, cls_index: packed rows, as in `RetriBertModel.embed_questions`.

    Returns:
      float32 [B, projection_dim]; [B, S, projection_dim] with `cls_index`.
    """
    model = nnx.merge(graphdef, state)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fn = model.embed_questions if kind == "questions" else model.embed_answers
    return fn(input_ids, attention_mask, position_ids=position_ids, cls_index=cls_index)


embed = jax.jit(embed_batch, static_argnames=("graphdef", "kind"))
