"""Training RetriBERT on question/answer pairs with the bidirectional in-batch loss, as the ELI5 recipe did.

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
import functools
import json
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
from jax.sharding import PartitionSpec as P

from retribert_jax.corpus import BadRecord, read_lines
from retribert_jax.modeling import RetriBertModel, in_batch_loss
from retribert_jax.tokenizer import RetriBertTokenizer

Batch = dict[str, jax.Array]  # q_ids, q_mask [B, Lq]; a_ids, a_mask [B, La]
BATCH_KEYS = ("q_ids", "q_mask", "a_ids", "a_mask")


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
    adamw = optax.adamw(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                        weight_decay=tcfg.weight_decay)
    if tcfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw)


# ----------------------------------------------------------------------------------------------------------------
# Loss and gradients


def _embed_pair(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, key: jax.Array | None,
                checkpoint_batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(question, answer) embeddings [B, P] of one (micro-)batch; dropout from `key` when the graph is in train mode."""
    model = nnx.merge(graphdef, params)
    # Separate streams for the two towers, so that equal texts on both sides do not share dropout masks.
    rq = nnx.Rngs(dropout=jax.random.fold_in(key, 0)) if key is not None else None
    ra = nnx.Rngs(dropout=jax.random.fold_in(key, 1)) if key is not None else None
    q = model.embed_questions(batch["q_ids"], batch["q_mask"], checkpoint_batch_size, rngs=rq)
    a = model.embed_answers(batch["a_ids"], batch["a_mask"], checkpoint_batch_size, rngs=ra)
    return q, a


def loss_and_grads(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, key: jax.Array | None, *,
                   checkpoint_batch_size: int = -1, micro_batch_size: int | None = None,
                   batch_sharding: NamedSharding | None = None) -> tuple[jax.Array, nnx.State]:
    """The in-batch loss of the whole batch and its gradient with respect to `params`.

    Args:
      graphdef, params: `nnx.split(model, nnx.Param)` (the graph in train mode for dropout).
      batch: q_ids, q_mask [B, Lq], a_ids, a_mask [B, La].
      key: the dropout key of this step (None with dropout off).
      checkpoint_batch_size: encode in chunks of this size under remat (as HF); -1 for none.
      micro_batch_size: None for one pass; else gradient cache over B / micro_batch_size micro-batches.
      batch_sharding: the batch's sharding, kept on each micro-batch so that it too spans every device.

    Returns:
      (scalar loss, gradients shaped like `params`).
    """
    b = batch["q_ids"].shape[0]
    if micro_batch_size is None or micro_batch_size >= b:
        def loss_fn(p):
            return in_batch_loss(*_embed_pair(graphdef, p, batch, key, checkpoint_batch_size))

        return jax.value_and_grad(loss_fn)(params)

    n_micro = b // micro_batch_size
    # Row r = i * n_micro + j goes to micro-batch j: the leading axis stays the sharded one, so every micro-batch
    # is spread over all devices instead of living on one.
    micro = {k: v.reshape(micro_batch_size, n_micro, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}
    keys = (jax.random.split(key, n_micro) if key is not None else None)

    def constrain(tree):
        if batch_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)

    def embed_micro(p, j):
        mb = constrain({k: v[j] for k, v in micro.items()})
        return _embed_pair(graphdef, p, mb, None if keys is None else keys[j], checkpoint_batch_size)

    # 1. All embeddings, no activations kept: a scan body's residuals are dropped since nothing differentiates it.
    # params travel as the carry, not a closure: NNX variables must not cross into the scan's trace.
    _, (q, a) = jax.lax.scan(lambda p, j: (p, embed_micro(p, j)), params, jnp.arange(n_micro))  # M m P
    q_full = q.swapaxes(0, 1).reshape(b, -1)  # back to row order: B P
    a_full = a.swapaxes(0, 1).reshape(b, -1)
    # 2. The loss over the full batch and its gradient with respect to the embeddings.
    loss, (gq, ga) = jax.value_and_grad(in_batch_loss, argnums=(0, 1))(q_full, a_full)
    gq = gq.reshape(micro_batch_size, n_micro, -1).swapaxes(0, 1)  # M m P
    ga = ga.reshape(micro_batch_size, n_micro, -1).swapaxes(0, 1)

    # 3. Per micro-batch: recompute its forward with the same dropout key and pull the embedding gradients back.
    def body(carry, j):
        p, acc = carry
        _, vjp = jax.vjp(lambda p_: embed_micro(p_, j), p)
        (g,) = vjp((gq[j], ga[j]))
        return (p, jax.tree.map(jnp.add, acc, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (_, grads), _ = jax.lax.scan(body, (params, zeros), jnp.arange(n_micro))
    return loss, grads


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, tcfg: TrainConfig,
                    schedule: optax.Schedule | None = None, batch_sharding: NamedSharding | None = None,
                    param_sharding: NamedSharding | None = None) -> Callable:
    """The jitted step `(params, opt_state, batch, key, step) -> (params, opt_state, metrics)`.

    `key` is the step's dropout key (ignored when the graph is in eval mode); `step` only feeds the logged
    learning rate. Params and optimizer state are donated.
    """
    dropout = tcfg.dropout

    def step_fn(params, opt_state, batch, key, step):
        loss, grads = loss_and_grads(graphdef, params, batch, key if dropout else None,
                                     checkpoint_batch_size=tcfg.checkpoint_batch_size,
                                     micro_batch_size=tcfg.micro_batch_size, batch_sharding=batch_sharding)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(step)
        return params, opt_state, metrics

    kwargs = {}
    if param_sharding is not None and batch_sharding is not None:
        kwargs = dict(in_shardings=(param_sharding, param_sharding, batch_sharding, None, None),
                      out_shardings=(param_sharding, param_sharding, None))
    return jax.jit(step_fn, donate_argnums=(0, 1), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Data


def read_pairs(path: str) -> list[tuple[str, str]]:
    """A JSONL file of {"question": str, "answer": str} objects, one per line (blank lines skipped).

    Lines are those of `corpus.read_lines` (split at \n only, CRLF and a byte-order mark allowed), so a line number
    in an error is the one an editor or `wc -l` shows. Raises ValueError naming file and line for a bad line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    pairs = []
    for lineno, line in read_lines(path):
        if isinstance(line, BadRecord):
            raise line
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for field in ("question", "answer"):
            if not isinstance(rec.get(field), str):
                got = "missing" if field not in rec else type(rec[field]).__name__
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string ({got})")
        pairs.append((rec["question"], rec["answer"]))
    if not pairs:
        raise ValueError(f"{path}: no question/answer pairs")
    return pairs


def bucket_length(n: int, max_length: int) -> int:
    """The padded length for a batch whose longest text has n tokens: the next power of two (>= 16), capped."""
    width = 16
    while width < n:
        width *= 2
    return min(width, max_length)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def tokenize_batch(tok: RetriBertTokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> dict[str, np.ndarray]:
    out = {}
    for side, texts in (("q", [p[0] for p in pairs]), ("a", [p[1] for p in pairs])):
        width = bucket_length(int(tok.encode_lengths(texts, max_length).max()), max_length)
        enc = tok(texts, max_length=width, padding="max_length")
        out[f"{side}_ids"], out[f"{side}_mask"] = enc["input_ids"], enc["attention_mask"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over `devices` (default: all)."""
    devices = list(devices) if devices is not None else jax.devices()
    # Auto axes: sharding propagates through the step (jax's default here would be Explicit, which types it).
    return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model, the step reached and the last logged loss."""

    model: RetriBertModel
    step: int
    loss: float | None


def _save_final(model: RetriBertModel, tok: RetriBertTokenizer, directory: str) -> None:
    """The package's checkpoint layout (config, Flax weights via `save_pretrained`) plus the tokenizer files."""
    model.save_pretrained(directory, overwrite=True)
    tok.save_pretrained(directory)


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


def train(model: RetriBertModel, tokenizer: RetriBertTokenizer, pairs: Sequence[tuple[str, str]], out_dir: str,
          tcfg: TrainConfig = TrainConfig(), *, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
          save_final: bool = True) -> TrainResult:
    """Trains `model` on (question, answer) pairs, resuming from `out_dir`'s checkpoints when present.

    Args:
      model: the starting model (its weights are ignored when resuming).
      tokenizer: tokenizes both sides, truncated to `tcfg.max_length`.
      pairs: the training pairs; each epoch visits them in a shuffled order, dropping the last partial batch.
      out_dir: where `checkpoints/`, `metrics.jsonl`, `train_config.json` and the final `model/` go.
      tcfg: hyper-parameters; a resumed run must use the same ones.
      mesh: the data mesh; default all devices. The batch size must divide over it.
      progress: show a tqdm bar with loss, learning rate and examples/s.
      save_final: write the final model to `out_dir/model` in the package's checkpoint layout.

    Returns:
      A `TrainResult` with the trained model.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from retribert_jax.io import atomic_file

    mesh = mesh if mesh is not None else data_mesh()
    n_dev = mesh.devices.size
    per = tcfg.micro_batch_size or tcfg.batch_size
    if tcfg.batch_size % n_dev or per % n_dev:
        raise ValueError(f"batch_size {tcfg.batch_size} (micro-batch {per}) must be a multiple of the "
                         f"{n_dev} devices")
    steps_per_epoch = len(pairs) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"only {len(pairs)} pairs: fewer than one batch of {tcfg.batch_size} (lower --batch-size)")
    total_steps = steps_per_epoch * tcfg.num_epochs
    last_step = min(total_steps, tcfg.max_steps or total_steps)

    os.makedirs(out_dir, exist_ok=True)
    run_info = {"train_config": tcfg.to_dict(), "num_pairs": len(pairs), "config_hash":
                model.config.architecture_hash()}
    info_path = os.path.join(out_dir, "train_config.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != run_info:
            diff = sorted(k for k in set(previous.get("train_config", {})) | set(tcfg.to_dict())
                          if previous.get("train_config", {}).get(k) != tcfg.to_dict().get(k))
            raise ValueError(f"{info_path}: {out_dir} holds a run with different settings "
                             f"({', '.join(diff) or 'data size or model'}); use a new output directory")
    else:
        with atomic_file(info_path, "w") as f:
            json.dump(run_info, f, indent=2, sort_keys=True)

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    if tcfg.dropout:
        model.train()
    else:
        model.eval()
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, replicated)
    schedule = lr_schedule(tcfg.learning_rate, tcfg.warmup_steps, total_steps)
    tx = make_optimizer(tcfg, total_steps)
    opt_state = jax.device_put(tx.init(params), replicated)
    base_key = jax.random.key(tcfg.seed)

    ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=False, create=True))
    step = 0
    latest = manager.latest_step()
    if latest is not None:
        abstract = lambda t: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), t)
        restored = manager.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)), opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            meta=ocp.args.JsonRestore()))
        params, opt_state, meta = restored.params, restored.opt_state, restored.meta
        step = int(meta["step"])
        base_key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], dtype=jnp.uint32))
    log_path = os.path.join(out_dir, "metrics.jsonl")
    _rewrite_log(log_path, step)

    def save(at_step: int) -> None:
        epoch, pos = divmod(at_step, steps_per_epoch)
        meta = {"step": at_step, "epoch": epoch, "position": pos * tcfg.batch_size,
                "rng": np.asarray(jax.random.key_data(base_key)).tolist()}
        manager.save(at_step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      opt_state=ocp.args.StandardSave(opt_state),
                                                      meta=ocp.args.JsonSave(meta)))

    train_step = make_train_step(graphdef, tx, tcfg, schedule, batch_sharding, replicated)
    bar = tqdm(total=last_step, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    loss_value = None
    t0, seen = time.perf_counter(), 0
    order, order_epoch = None, -1
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            while step < last_step:
                epoch, pos = divmod(step, steps_per_epoch)
                if order_epoch != epoch:
                    order, order_epoch = epoch_order(len(pairs), tcfg.seed, epoch), epoch
                rows = order[pos * tcfg.batch_size:(pos + 1) * tcfg.batch_size]
                host = tokenize_batch(tokenizer, [pairs[i] for i in rows], tcfg.max_length)
                batch = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
                key = jax.random.fold_in(base_key, step)
                params, opt_state, metrics = train_step(params, opt_state, batch, key, step)
                step += 1
                seen += tcfg.batch_size
                if step % tcfg.log_every == 0 or step == last_step:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    loss_value = m["loss"]
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    rec = {"step": step, "epoch": epoch, **m, "examples_per_s": rate}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", ex_s=f"{rate:.1f}")
                    t0, seen = time.perf_counter(), 0
                bar.update(1)
                if step % tcfg.save_every == 0 or step == last_step:
                    save(step)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    model = nnx.merge(graphdef, jax.device_get(params))
    model.eval()
    if save_final:
        _save_final(model, tokenizer, os.path.join(out_dir, "model"))
    return TrainResult(model=model, step=step, loss=loss_value)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed_both(graphdef, params, batch):
    return _embed_pair(graphdef, params, batch, None, -1)


def recall_at_1(model: RetriBertModel, tokenizer: RetriBertTokenizer, pairs: Sequence[tuple[str, str]],
                max_length: int = 128) -> float:
    """The fraction of questions whose own answer scores highest among all answers in `pairs`."""
    model.eval()
    graphdef, params = nnx.split(model, nnx.Param)
    batch = tokenize_batch(tokenizer, pairs, max_length)
    q, a = _embed_both(graphdef, params, batch)
    scores = np.asarray(q) @ np.asarray(a).T
    return float(np.mean(np.argmax(scores, axis=1) == np.arange(len(pairs))))


__all__ = ["TrainConfig", "TrainResult", "data_mesh", "loss_and_grads", "lr_schedule", "make_optimizer",
           "make_train_step", "read_pairs", "recall_at_1", "train"]
