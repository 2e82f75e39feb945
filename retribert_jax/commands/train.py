"""`retribert-jax train`: train a RetriBERT on question/answer pairs; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import dataclasses
import os

from retribert_jax.commands import common
from retribert_jax.config import TrainConfig

HELP = "train a RetriBERT retriever on question/answer pairs (resumes from OUT's checkpoints)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a checkpoint directory to start from, or a config.json for a randomly initialised model",
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="training pairs: JSONL, CSV, TSV or parquet rows of question/answer"
        "[/negatives] (e.g. from `retribert-jax mine`), Tevatron's query/"
        "positive_passages/negative_passages or sentence-transformers' anchor/"
        "positive/negative",
    )
    p.add_argument("out", metavar="OUT", help="output directory: checkpoints/, metrics.jsonl, final model/")
    p.add_argument("--tokenizer", help="tokenizer directory, tokenizer.json or vocab.txt (default: MODEL's own)")
    common.add_pair_field_arguments(p)
    d = TrainConfig()
    p.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate, help="peak LR (%(default)s)")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon (%(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (%(default)s)")
    p.add_argument(
        "--warmup-steps",
        type=common.non_negative_int,
        default=d.warmup_steps,
        help="linear warm-up steps (%(default)s)",
    )
    p.add_argument("--batch-size", type=common.positive_int, default=d.batch_size, help="pairs per step (%(default)s)")
    p.add_argument(
        "--micro-batch-size",
        type=common.positive_int,
        default=None,
        help="gradient cache: embed the batch in micro-batches of this size, in-batch negatives still over "
        "the batch (default: the largest that fits the device's memory; a resumed run keeps its own)",
    )
    p.add_argument(
        "--negatives-per-question",
        type=common.non_negative_int,
        default=d.num_negatives,
        help="hard negatives per question, sampled each epoch from the pair's negatives; 0 ignores them (%(default)s)",
    )
    p.add_argument(
        "--max-length",
        type=common.positive_int,
        default=None,
        help=f"truncation length (default: {d.max_length}, or the model's max_position_embeddings when fewer)",
    )
    p.add_argument(
        "--checkpoint-batch-size",
        type=int,
        default=d.checkpoint_batch_size,
        help="encode in chunks of this size under gradient checkpointing; -1 for none (%(default)s)",
    )
    p.add_argument("--epochs", type=common.positive_int, default=d.num_epochs, help="epochs (%(default)s)")
    p.add_argument("--max-steps", type=common.positive_int, default=None, help="stop after this many steps")
    p.add_argument("--grad-clip", type=float, default=None, help="clip gradients to this global norm")
    p.add_argument("--no-dropout", action="store_true", help="train with dropout off")
    p.add_argument("--seed", type=int, default=d.seed, help="shuffling, dropout and init seed (%(default)s)")
    p.add_argument(
        "--save-every", type=common.positive_int, default=d.save_every, help="checkpoint every N steps (%(default)s)"
    )
    p.add_argument(
        "--keep-checkpoints",
        type=common.positive_int,
        default=d.keep_checkpoints,
        help="checkpoints kept (%(default)s)",
    )
    p.add_argument(
        "--log-every", type=common.positive_int, default=d.log_every, help="log metrics every N steps (%(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_run_arguments(p)


def _load_start(args: argparse.Namespace):
    from retribert_jax.config import RetriBertConfig
    from retribert_jax.modeling import init_model
    from retribert_jax.tokenizer import RetriBertTokenizer

    path = args.model
    if os.path.isfile(path) and path.endswith(".json"):
        with args.timings.phase("initialise model"):
            model = init_model(
                RetriBertConfig.from_json_file(path), seed=args.seed, dtype=args.dtype, precision=args.precision
            )
        tok_source = args.tokenizer or os.path.dirname(os.path.abspath(path))
    else:
        model = common.load_model(args, path)
        tok_source = args.tokenizer or path
    try:
        tok = RetriBertTokenizer.from_pretrained(tok_source)
    except FileNotFoundError:
        raise FileNotFoundError(f"{tok_source}: no tokenizer found (pass --tokenizer)") from None
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok


def _resumed_micro_batch(out: str) -> tuple[bool, int | None]:
    """(whether OUT holds a run, the micro-batch it was started with): a resume keeps it, as it keeps every
    setting (`training` refuses a resume with others)."""
    import json

    path = os.path.join(out, "train_config.json")
    if not os.path.isfile(path):
        return False, None
    try:
        with open(path, encoding="utf-8") as f:
            return True, json.load(f)["train_config"]["micro_batch_size"]
    except (ValueError, KeyError, TypeError):
        return False, None  # `training` names what is wrong with the file


def check(args: argparse.Namespace) -> None:
    common.require_file(args.data, "data file")
    if not os.path.exists(args.model) and (args.model.endswith(".json") or args.model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{args.model}: no such checkpoint or config file")


def run(args: argparse.Namespace) -> int:
    import sys

    import jax

    from retribert_jax.pairs import read_pairs
    from retribert_jax.training import device_memory_bytes, fit_micro_batch, run_warnings, train

    with args.timings.phase("read pairs"):
        pairs = read_pairs(args.data, common.pair_fields(args))
    model, tok = _load_start(args)
    tcfg = TrainConfig(
        learning_rate=args.learning_rate,
        adam_eps=args.adam_eps,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        max_length=args.max_length or min(TrainConfig.max_length, model.config.max_position_embeddings),
        checkpoint_batch_size=args.checkpoint_batch_size,
        num_epochs=args.epochs,
        max_steps=args.max_steps,
        micro_batch_size=args.micro_batch_size,
        grad_clip=args.grad_clip,
        num_negatives=args.negatives_per_question,
        dropout=not args.no_dropout,
        seed=args.seed,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
    )
    if args.micro_batch_size is None:
        resumed, micro = _resumed_micro_batch(args.out)
        if not resumed:
            negatives = min(tcfg.num_negatives, max(len(p.negatives) for p in pairs))
            memory = device_memory_bytes()
            micro = fit_micro_batch(model.config, tcfg, negatives, jax.local_device_count(), memory)
            if micro is not None:
                print(
                    f"gradient cache: micro-batches of {micro} pairs, fitted to {memory / 2**30:.0f} GiB of "
                    "device memory (--micro-batch-size to choose)",
                    file=sys.stderr,
                )
        tcfg = dataclasses.replace(tcfg, micro_batch_size=micro)
    for warning in run_warnings(len(pairs), tcfg):
        print(f"retribert-jax train: warning: {warning}", file=sys.stderr)
    args.timings.report()
    result = train(model, tok, pairs, args.out, tcfg, progress=not args.no_progress)
    model_dir = os.path.join(args.out, "model")
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    if result.steps_trained == 0:  # a rerun of a finished run: as `embed` and `mine` say it
        print(
            f"{args.out}: already complete ({result.step} steps, last loss {loss}); nothing to do; model: {model_dir}",
            file=sys.stderr,
        )
        return 0
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    print(f"trained {result.steps_trained} steps to step {result.step}{resumed} (last loss {loss}); model: {model_dir}")
    return 0
