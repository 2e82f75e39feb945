"""Training RetriBERT on question/answer pairs with the bidirectional in-batch loss, as the ELI5 recipe did, and
optionally hard negatives (DPR's recipe, mined with `retribert-jax mine`).

One jitted pure step: (params, optimizer state, batch, dropout key) -> (params, optimizer state, metrics). The batch
is sharded over a 1-D "data" mesh and the parameters replicated, so the score matrix, and hence the in-batch
negatives, always spans the global batch. Gradient accumulation uses the "gradient cache" trick: embed the whole
batch without storing activations, take the loss's gradient with respect to the embeddings, then run each
micro-batch's forward + VJP with its slice of those gradients, summing parameter gradients. The loss and gradients
are then those of the full batch, negatives included, while only one micro-batch's activations are alive at a time.

Checkpoints (parameters, optimizer state, step, rng, data position) go through orbax's `CheckpointManager`; a run
restarted with the same command resumes from the latest one and ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from retribert_jax.compilation import CompileCost, bucket_length, fit_buckets
from retribert_jax.config import RunConfig, TrainConfig
from retribert_jax.io import interrupts_held
from retribert_jax.mesh import batch_sharding, data_mesh, replicated
from retribert_jax.modeling import RetriBertModel, flops_per_sequence, in_batch_loss
from retribert_jax.pairs import Pair
from retribert_jax.tokenizer import RetriBertTokenizer, check_vocabulary

Batch = dict[str, jax.Array]  # q_ids, q_mask [B, Lq]; p_ids, p_mask [B, Lp]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def lr_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 then linear decay to 0 at `total_steps`: HF's `get_linear_schedule_with_warmup`."""
    warm = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warm, decay], [warmup_steps])


def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW over every parameter (no mask, as the recipe's `AdamW(model.parameters())`), optionally clipped."""
    schedule = lr_schedule(tcfg.learning_rate, tcfg.warmup_steps, total_steps)
    adamw = optax.adamw(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay)
    if tcfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw)


# ----------------------------------------------------------------------------------------------------------------
# Loss and gradients


def _embed_batch(
    graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, key: jax.Array | None, checkpoint_batch_size: int
) -> dict[str, jax.Array]:
    """Embeddings of one (micro-)batch: {"q": [b, P], "p": [b, P]} and, with hard negatives, "n": [b * m, P]
    (question i's negatives at rows i*m .. i*m + m-1). Dropout from `key` when the graph is in train mode."""
    model = nnx.merge(graphdef, params)
    # Separate streams for the towers, so that equal texts on two sides do not share dropout masks.
    rngs = [nnx.Rngs(dropout=jax.random.fold_in(key, i)) if key is not None else None for i in range(3)]
    out = {
        "q": model.embed_questions(batch["q_ids"], batch["q_mask"], checkpoint_batch_size, rngs=rngs[0]),
        "p": model.embed_answers(batch["p_ids"], batch["p_mask"], checkpoint_batch_size, rngs=rngs[1]),
    }
    if "n_ids" in batch:
        b, m, length = batch["n_ids"].shape
        out["n"] = model.embed_answers(
            batch["n_ids"].reshape(b * m, length),
            batch["n_mask"].reshape(b * m, length),
            checkpoint_batch_size,
            rngs=rngs[2],
        )  # (b m) P
    return out


def _batch_loss(emb: dict[str, jax.Array], batch: Batch, precision: str | None) -> jax.Array:
    if "n" not in emb:
        return in_batch_loss(emb["q"], emb["p"], precision=precision)
    return in_batch_loss(emb["q"], emb["p"], emb["n"], batch["n_valid"].reshape(-1), precision=precision)


def loss_and_grads(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Batch,
    key: jax.Array | None,
    *,
    checkpoint_batch_size: int = -1,
    micro_batch_size: int | None = None,
    batch_sharding: NamedSharding | None = None,
) -> tuple[jax.Array, nnx.State]:
    """The in-batch loss of the whole batch and its gradient with respect to `params`.

    Args:
      graphdef, params: `nnx.split(model, nnx.Param)` (the graph in train mode for dropout).
      batch: q_ids, q_mask [B, Lq], p_ids, p_mask [B, Lp]; with hard negatives also n_ids, n_mask [B, m, Ln] and
        n_valid bool [B, m] (False: an empty slot of a question with fewer than m negatives); JAX or numpy arrays.
      key: the dropout key of this step (None with dropout off).
      checkpoint_batch_size: encode in chunks of this size under remat (as HF); -1 for none.
      micro_batch_size: None for one pass; else gradient cache (Gao et al., 2021, "Scaling Deep Contrastive
        Learning Batch Size under Memory Limited Setup") over B / micro_batch_size micro-batches: the loss and
        gradients of the full batch, negatives included, with one micro-batch's activations alive at a time.
      batch_sharding: the batch's sharding, kept on each micro-batch so that it too spans every device.

    Returns:
      (scalar loss, gradients shaped like `params`).
    """
    b = batch["q_ids"].shape[0]
    precision = nnx.merge(graphdef, params).run_config.precision  # the model's, for the score matmuls too
    if micro_batch_size is None or micro_batch_size >= b:

        def loss_fn(p):
            return _batch_loss(_embed_batch(graphdef, p, batch, key, checkpoint_batch_size), batch, precision)

        return jax.value_and_grad(loss_fn)(params)

    n_micro = b // micro_batch_size
    # As JAX arrays: a micro-batch is taken by a traced index inside the scans below, which numpy cannot do.
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    # Row r = i * n_micro + j goes to micro-batch j: the leading axis stays the sharded one, so every micro-batch
    # is spread over all devices instead of living on one.
    def split(x):
        return x.reshape(micro_batch_size, n_micro, *x.shape[1:]).swapaxes(0, 1)  # M m ...

    def join(x):
        return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])  # back to row order

    micro = {k: split(v) for k, v in batch.items()}
    keys = jax.random.split(key, n_micro) if key is not None else None

    def constrain(tree):
        if batch_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)

    def embed_micro(p, j):
        mb = constrain({k: v[j] for k, v in micro.items()})
        emb = _embed_batch(graphdef, p, mb, None if keys is None else keys[j], checkpoint_batch_size)
        if "n" in emb:  # (m_rows negatives) P -> m_rows negatives P, so that micro-batches split by question
            emb["n"] = emb["n"].reshape(micro_batch_size, -1, emb["n"].shape[-1])
        return emb

    # 1. All embeddings, no activations kept: a scan body's residuals are dropped since nothing differentiates it.
    # params travel as the carry, not a closure: NNX variables must not cross into the scan's trace.
    _, emb = jax.lax.scan(lambda p, j: (p, embed_micro(p, j)), params, jnp.arange(n_micro))  # M m ...
    full = {k: join(v) for k, v in emb.items()}  # B P (negatives: B m P)

    # 2. The loss over the full batch and its gradient with respect to the embeddings.
    def loss_of(e):
        if "n" in e:
            e = {**e, "n": e["n"].reshape(-1, e["n"].shape[-1])}
        return _batch_loss(e, batch, precision)

    loss, g_emb = jax.value_and_grad(loss_of)(full)
    g_emb = {k: split(v) for k, v in g_emb.items()}  # M m ...

    # 3. Per micro-batch: recompute its forward with the same dropout key and pull the embedding gradients back.
    def body(carry, j):
        p, acc = carry
        _, vjp = jax.vjp(lambda p_: embed_micro(p_, j), p)
        (g,) = vjp({k: v[j] for k, v in g_emb.items()})
        return (p, jax.tree.map(jnp.add, acc, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (_, grads), _ = jax.lax.scan(body, (params, zeros), jnp.arange(n_micro))
    return loss, grads


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    tcfg: TrainConfig,
    schedule: optax.Schedule | None = None,
    batch_sharding: NamedSharding | None = None,
    param_sharding: NamedSharding | None = None,
    run_config: RunConfig | None = None,
) -> Callable:
    """The jitted step `(params, opt_state, batch, key, step) -> (params, opt_state, metrics)`.

    `key` is the step's dropout key (ignored when the graph is in eval mode); `step` only feeds the logged
    learning rate. Params and optimizer state are donated. The step runs as the model's `RunConfig` says: the graph
    carries its dtypes and matmul precision (`loss_and_grads` gives the loss's score matmuls the same), and
    `run_config` (the model's: `model.run_config`) gives the compiler options for the platform of `param_sharding`'s
    devices (default: JAX's default backend).
    """
    dropout = tcfg.dropout

    def step_fn(params, opt_state, batch, key, step):
        loss, grads = loss_and_grads(
            graphdef,
            params,
            batch,
            key if dropout else None,
            checkpoint_batch_size=tcfg.checkpoint_batch_size,
            micro_batch_size=tcfg.micro_batch_size,
            batch_sharding=batch_sharding,
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(step)
        return params, opt_state, metrics

    kwargs = {}
    if param_sharding is not None and batch_sharding is not None:
        kwargs = dict(
            in_shardings=(param_sharding, param_sharding, batch_sharding, None, None),
            out_shardings=(param_sharding, param_sharding, None),
        )
    platform = param_sharding.mesh.devices.flat[0].platform if param_sharding is not None else jax.default_backend()
    options = (run_config or RunConfig()).compiler_options(platform, training=True)
    return jax.jit(step_fn, donate_argnums=(0, 1), compiler_options=options or None, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Data


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def sample_negatives(pairs: Sequence[Pair], rows: np.ndarray, m: int, seed: int, epoch: int) -> list[list[str]]:
    """Up to `m` hard negatives for each of `rows`, drawn without replacement, a pure function of (seed, epoch, row)
    so that every epoch sees another sample and a resumed run the same one."""
    out = []
    for r in rows:
        negs = pairs[r].negatives
        if len(negs) <= m:
            out.append(list(negs))
        else:
            pick = np.random.default_rng([seed, epoch, int(r), 1]).choice(len(negs), m, replace=False)
            out.append([negs[i] for i in sorted(pick)])
    return out


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded lengths of each side of a training batch (one bucket policy: `compilation.fit_buckets`)."""

    questions: tuple[int, ...]
    passages: tuple[int, ...]


def fit_train_buckets(tok: RetriBertTokenizer, pairs: Sequence[Pair], tcfg: TrainConfig, cfg) -> Buckets:
    """Bucket lengths fitted to the batches of the first epoch (a deterministic function of the data and settings,
    so a resumed run compiles the same programs). A train step costs about three forward passes of both towers, and
    its compilation about three forward compilations, so the forward's cost model applies as it is."""
    cost = CompileCost.for_platform(jax.default_backend(), jax.device_count())
    order = epoch_order(len(pairs), tcfg.seed, 0)
    steps = len(pairs) // tcfg.batch_size
    out = []
    for texts in ([p.question for p in pairs], [p.passage for p in pairs]):
        lengths = tok.encode_lengths(texts, tcfg.max_length)
        longest = [int(lengths[order[s * tcfg.batch_size : (s + 1) * tcfg.batch_size]].max()) for s in range(steps)]
        out.append(
            fit_buckets(longest, tcfg.batch_size, tcfg.max_length, lambda length: flops_per_sequence(cfg, length), cost)
        )
    return Buckets(*out)


def tokenize_batch(
    tok: RetriBertTokenizer,
    pairs: Sequence[Pair],
    max_length: int,
    buckets: Buckets,
    negatives: Sequence[Sequence[str]] | None = None,
    num_negatives: int = 0,
) -> dict[str, np.ndarray]:
    """One batch as arrays: q_ids, q_mask [B, Lq], p_ids, p_mask [B, Lp], each side padded to its bucket; with
    `num_negatives` m > 0 also n_ids, n_mask [B, m, Ln] and n_valid [B, m] (negatives padded to the passages'
    buckets; empty slots hold [CLS] [SEP] and are not valid)."""
    out = {}
    sides = [("q", [p.question for p in pairs], buckets.questions), ("p", [p.passage for p in pairs], buckets.passages)]
    if num_negatives:
        flat = [n for negs in negatives for n in list(negs) + [""] * (num_negatives - len(negs))]
        sides.append(("n", flat, buckets.passages))
    for side, texts, side_buckets in sides:
        width = bucket_length(int(tok.encode_lengths(texts, max_length).max()), side_buckets)
        enc = tok(texts, max_length=width, padding="max_length")
        out[f"{side}_ids"], out[f"{side}_mask"] = enc["input_ids"], enc["attention_mask"]
    if num_negatives:
        b = len(pairs)
        out["n_ids"] = out["n_ids"].reshape(b, num_negatives, -1)
        out["n_mask"] = out["n_mask"].reshape(b, num_negatives, -1)
        out["n_valid"] = np.array([[j < len(negs) for j in range(num_negatives)] for negs in negatives])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fitting a run to the machine and the data


def activation_bytes_per_pair(cfg, max_length: int, num_negatives: int) -> float:
    """Bytes of activations one pair keeps for the backward pass, at `max_length` on every side, float32.

    Per token and layer a BERT layer keeps ~10 hidden-size vectors (Q, K, V, attention output, residuals, LayerNorm
    inputs and outputs), 2 FFN-size ones (before and after GELU) and 2 rows of attention scores per head (scores
    and probabilities); a pair embeds 2 + `num_negatives` sequences. For MiniLM (384 x 1536, 12 heads, 6 layers) at
    128 tokens and one negative that is 92 MB a pair: 47 GB for a batch of 512, against the 44.8 GB allocation that
    such a step failed on (issue 22).
    """
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    per_token_layer = 10 * d + 2 * f + 2 * h * max_length
    return 4.0 * (2 + num_negatives) * cfg.num_hidden_layers * max_length * per_token_layer


def device_memory_bytes(device=None) -> int | None:
    """Memory one device gives a program: the allocator's limit on a GPU or TPU, physical memory on a CPU (whose
    devices share it); None when unknown."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend implements memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, jax.local_device_count())
        except (ValueError, OSError):
            return None
    return None


def fit_micro_batch(
    cfg, tcfg: TrainConfig, num_negatives: int, num_devices: int, memory_bytes: int | None
) -> int | None:
    """The gradient-cache micro-batch that fits a device's memory: the largest divisor of the batch (a multiple of
    the device count) whose activations (`activation_bytes_per_pair`) take at most half of what the parameters, their
    gradients and AdamW's two moments leave; None when the whole batch fits (one pass), or when the memory is
    unknown. Gradient cache gives the loss and gradients of the whole batch at any micro-batch, so this changes memory
    and speed, not what is learned (dropout masks aside)."""
    if memory_bytes is None:
        return None
    n_params = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
        4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size
    )
    n_params *= 1 if cfg.share_encoders else 2
    budget = 0.5 * max(0.0, memory_bytes - 4 * 4 * n_params)
    per_pair = activation_bytes_per_pair(cfg, tcfg.max_length, num_negatives)
    b = tcfg.batch_size
    if b // num_devices * per_pair <= budget:
        return None
    fits = [m for m in range(num_devices, b, num_devices) if b % m == 0 and m // num_devices * per_pair <= budget]
    return max(fits) if fits else num_devices


def run_warnings(num_pairs: int, tcfg: TrainConfig) -> list[str]:
    """What makes a run with these settings on `num_pairs` pairs train little or oddly, said before it starts: few
    steps per epoch, many pairs dropped each epoch (the last partial batch), a run that never leaves warm-up."""
    out = []
    b = tcfg.batch_size
    per_epoch, dropped = divmod(num_pairs, b)
    if per_epoch == 0:
        return out  # `train` refuses it
    total = per_epoch * tcfg.num_epochs
    last = min(total, tcfg.max_steps or total)
    if per_epoch < 10:
        out.append(
            f"{num_pairs} pairs in batches of {b} make {per_epoch} step{'s' * (per_epoch > 1)} an epoch, "
            f"{last} in all; a smaller --batch-size gives more steps"
        )
    if dropped and dropped / num_pairs >= 0.1:
        out.append(
            f"each epoch leaves out {dropped} of {num_pairs} pairs ({dropped / num_pairs:.0%}): those past "
            f"the last whole batch of {b} (a different sample each epoch)"
        )
    if tcfg.warmup_steps and last <= tcfg.warmup_steps:
        peak = tcfg.learning_rate * (last - 1) / tcfg.warmup_steps  # `lr_schedule` at the last step, last - 1
        out.append(
            f"the run's {last} steps never leave the {tcfg.warmup_steps}-step warm-up: the learning rate "
            f"peaks at {peak:.2g}, not {tcfg.learning_rate:g}; lower --warmup-steps (e.g. "
            f"{max(1, last // 10)})"
        )
    return out


class _StepBar:
    """A tqdm bar that counts the steps the device has finished, not the ones dispatched: each dispatch waits for
    the step before it (one step stays in flight, so the host still prepares the next batch while the device runs),
    and the rate and ETA are those of the device."""

    def __init__(self, bar):
        self.bar, self._pending = bar, None

    def dispatched(self, metrics) -> None:
        self.finish()
        self._pending = metrics

    def finish(self) -> None:
        if self._pending is not None:
            jax.block_until_ready(self._pending)
            self._pending = None
            self.bar.update(1)


def _last_logged_loss(path: str) -> float | None:
    """The loss of the last line of a metrics log, or None."""
    if not os.path.isfile(path):
        return None
    loss = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                loss = json.loads(line).get("loss", loss)
            except json.JSONDecodeError:
                continue
    return loss


# ----------------------------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model, the step reached, the last loss logged (by this call, or by the
    finished run a rerun found), the step this call started from (above 0 when it resumed), and whether `out_dir`
    held this run finished already (then nothing was trained)."""

    model: RetriBertModel
    step: int
    loss: float | None
    start_step: int = 0
    already_complete: bool = False

    @property
    def steps_trained(self) -> int:
        """Steps this call trained (0 for a rerun of a finished run)."""
        return self.step - self.start_step


def _rewrite_log(path: str, upto_step: int) -> None:
    """Drops log lines past `upto_step` (written after the checkpoint a resumed run starts from)."""
    if not os.path.isfile(path):
        return
    from retribert_jax.io import atomic_file

    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= upto_step:
                keep.append(ln)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    with atomic_file(path, "w") as f:
        f.writelines(keep)


def _check_run(out_dir: str, run_info: dict[str, Any]) -> None:
    """Records the run's settings in `out_dir`, or refuses an `out_dir` that holds a run with other settings."""
    from retribert_jax.io import atomic_file

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train_config.json")
    if not os.path.isfile(path):
        with atomic_file(path, "w") as f:
            json.dump(run_info, f, indent=2, sort_keys=True)
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    if previous != run_info:
        old, new = previous.get("train_config", {}), run_info["train_config"]
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"{path}: {out_dir} holds a run with different settings "
            f"({', '.join(diff) or 'data or model'}); use a new output directory"
        )


class _Checkpoints:
    """Orbax checkpoints of (parameters, optimizer state, step, rng) under `out_dir/checkpoints`."""

    def __init__(self, out_dir: str, tcfg: TrainConfig, sharding: NamedSharding):
        import orbax.checkpoint as ocp

        self._ocp, self._sharding = ocp, sharding
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(out_dir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=False, create=True
            ),
        )

    def restore(self, params, opt_state, key):
        """(params, opt_state, step, key) of the latest checkpoint, or the given ones at step 0."""
        latest = self.manager.latest_step()
        if latest is None:
            return params, opt_state, 0, key
        ocp = self._ocp

        def abstract(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._sharding), tree)

        restored = self.manager.restore(
            latest,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        key = jax.random.wrap_key_data(jnp.asarray(restored.meta["rng"], dtype=jnp.uint32))
        return restored.params, restored.opt_state, int(restored.meta["step"]), key

    def save(self, step: int, params, opt_state, key) -> None:
        ocp = self._ocp
        meta = {"step": step, "rng": np.asarray(jax.random.key_data(key)).tolist()}
        # Ctrl-C waits for the save: cut inside it, orbax's writer threads outlived the main thread, and the exit
        # aborted ("cannot schedule new futures after interpreter shutdown") leaving a step-N.orbax-checkpoint-tmp.
        with interrupts_held():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
            )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def train(
    model: RetriBertModel,
    tokenizer: RetriBertTokenizer,
    pairs: Sequence[Pair | tuple],
    out_dir: str,
    tcfg: TrainConfig | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    save_final: bool = True,
) -> TrainResult:
    """Trains `model` on (question, passage[, negatives]) pairs, resuming from `out_dir`'s checkpoints when present.

    Args:
      model: the starting model (its weights are ignored when resuming).
      tokenizer: tokenizes every side, truncated to `tcfg.max_length`.
      pairs: `Pair`s or (question, passage) / (question, passage, negatives) tuples; each epoch visits them in a
        shuffled order, dropping the last partial batch.
      out_dir: where `checkpoints/`, `metrics.jsonl`, `train_config.json` and the final `model/` go.
      tcfg: hyper-parameters (default `TrainConfig()`); a resumed run must use the same ones.
      mesh: the data mesh; default all devices. The batch size must divide over it.
      progress: show a tqdm bar with loss, learning rate and examples/s.
      save_final: write the final model (and tokenizer) to `out_dir/model` in the package's checkpoint layout.

    Returns:
      A `TrainResult` with the trained model.

    Raises:
      ValueError: settings that do not fit the data or the mesh, or an `out_dir` holding another run.
      OutOfMemory: a step did not fit the device's memory (the message says what to lower).
    """
    tcfg = tcfg or TrainConfig()
    pairs = [p if isinstance(p, Pair) else Pair(p[0], p[1], tuple(p[2]) if len(p) > 2 else ()) for p in pairs]
    mesh = mesh if mesh is not None else data_mesh()
    n_dev = mesh.devices.size
    per = tcfg.micro_batch_size or tcfg.batch_size
    if tcfg.batch_size % n_dev or per % n_dev:
        raise ValueError(f"batch_size {tcfg.batch_size} (micro-batch {per}) must be a multiple of the {n_dev} devices")
    steps_per_epoch = len(pairs) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"only {len(pairs)} pairs: fewer than one batch of {tcfg.batch_size} (lower --batch-size)")
    total_steps = steps_per_epoch * tcfg.num_epochs
    last_step = min(total_steps, tcfg.max_steps or total_steps)
    # Hard negatives per question: as many as the richest pair offers, capped by the setting.
    m = min(tcfg.num_negatives, max(len(p.negatives) for p in pairs)) if tcfg.num_negatives else 0
    # Refused before `_check_run` records the settings, so that the corrected rerun may use the same directory.
    if tcfg.max_length > model.config.max_position_embeddings:
        raise ValueError(
            f"max_length {tcfg.max_length} is longer than the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    if tcfg.batch_size == 1 and m == 0:
        raise ValueError(
            "batch_size 1 without hard negatives: the in-batch cross-entropy over one pair is 0 and nothing is "
            "learned; use a batch of at least 2 pairs, or pairs with negatives"
        )
    _check_run(
        out_dir,
        {
            "train_config": tcfg.to_dict(),
            "num_pairs": len(pairs),
            "negatives_per_question": m,
            "config_hash": model.config.architecture_hash(),
        },
    )

    rep, data = replicated(mesh), batch_sharding(mesh)
    model.train() if tcfg.dropout else model.eval()
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = lr_schedule(tcfg.learning_rate, tcfg.warmup_steps, total_steps)
    tx = make_optimizer(tcfg, total_steps)
    params = jax.device_put(params, rep)
    ckpts = _Checkpoints(out_dir, tcfg, rep)
    params, opt_state, step, base_key = ckpts.restore(
        params, jax.device_put(tx.init(params), rep), jax.random.key(tcfg.seed)
    )
    start_step = step
    log_path = os.path.join(out_dir, "metrics.jsonl")
    _rewrite_log(log_path, step)
    buckets = fit_train_buckets(tokenizer, pairs, tcfg, model.config)
    train_step = make_train_step(graphdef, tx, tcfg, schedule, data, rep, run_config=model.run_config)

    def batch_at(step: int) -> dict[str, jax.Array]:
        epoch, pos = divmod(step, steps_per_epoch)
        rows = epoch_order(len(pairs), tcfg.seed, epoch)[pos * tcfg.batch_size : (pos + 1) * tcfg.batch_size]
        negatives = sample_negatives(pairs, rows, m, tcfg.seed, epoch) if m else None
        host = tokenize_batch(tokenizer, [pairs[i] for i in rows], tcfg.max_length, buckets, negatives, m)
        for side, name in (("q", "question"), ("p", "passage"), ("n", "negative")):
            if f"{side}_ids" in host:
                ids = host[f"{side}_ids"]
                per_pair = ids.size // len(rows)
                check_vocabulary(
                    ids,
                    model.config.vocab_size,
                    tokenizer.backend,
                    lambda i, name=name, per_pair=per_pair: f"pair {int(rows[i // per_pair])}'s {name}",
                )
        return {k: jax.device_put(v, data) for k, v in host.items()}

    from tqdm.auto import tqdm

    from retribert_jax.errors import OutOfMemory, is_out_of_memory

    final = os.path.join(out_dir, "model")
    if step >= last_step and (os.path.isdir(final) or not save_final):
        ckpts.close()
        model = nnx.merge(graphdef, jax.device_get(params))
        model.eval()
        return TrainResult(
            model=model, step=step, loss=_last_logged_loss(log_path), start_step=step, already_complete=True
        )
    loss_value, t0, seen = None, time.perf_counter(), 0
    try:
        with (
            open(log_path, "a", encoding="utf-8") as log,
            tqdm(
                total=last_step, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True
            ) as tbar,
        ):
            bar = _StepBar(tbar)
            while step < last_step:
                params, opt_state, metrics = train_step(
                    params, opt_state, batch_at(step), jax.random.fold_in(base_key, step), step
                )
                bar.dispatched(metrics)
                step, seen = step + 1, seen + tcfg.batch_size
                logging_now = step % tcfg.log_every == 0 or step == last_step
                saving_now = step % tcfg.save_every == 0 or step == last_step
                if logging_now or saving_now:
                    m_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(m_host["loss"]):
                        # Checked before each save too, so that no checkpoint holds what a NaN step made.
                        raise ValueError(
                            f"the loss is {m_host['loss']} at step {step}: training stopped, the checkpoints saved "
                            f"before it are kept in {out_dir}; lower the learning rate or clip gradients "
                            "(--grad-clip)"
                        )
                if logging_now:
                    bar.finish()
                    loss_value, rate = m_host["loss"], seen / max(time.perf_counter() - t0, 1e-9)
                    log.write(
                        json.dumps(
                            {"step": step, "epoch": (step - 1) // steps_per_epoch, **m_host, "examples_per_s": rate}
                        )
                        + "\n"
                    )
                    log.flush()
                    tbar.set_postfix(loss=f"{m_host['loss']:.4f}", lr=f"{m_host['lr']:.2e}", ex_s=f"{rate:.1f}")
                    t0, seen = time.perf_counter(), 0
                if saving_now:
                    ckpts.save(step, params, opt_state, base_key)
            bar.finish()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        per = tcfg.micro_batch_size or tcfg.batch_size
        smaller = max((m for m in range(n_dev, per, n_dev) if tcfg.batch_size % m == 0), default=None)
        hint = (
            f"pass --micro-batch-size {smaller} (micro-batches of {per} pairs did not fit)"
            if smaller
            else "lower --max-length or --negatives-per-question"
        )
        raise OutOfMemory(
            f"a training step of {tcfg.batch_size} pairs at max_length {tcfg.max_length} ran out of "
            f"device memory; {hint}"
        ) from None
    finally:
        ckpts.close()
    model = nnx.merge(graphdef, jax.device_get(params))
    model.eval()
    if save_final:
        model.save_pretrained(final, overwrite=True, tokenizer=tokenizer)
    return TrainResult(model=model, step=step, loss=loss_value, start_step=start_step)


__all__ = [
    "TrainResult",
    "activation_bytes_per_pair",
    "device_memory_bytes",
    "fit_micro_batch",
    "loss_and_grads",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "run_warnings",
    "train",
]
