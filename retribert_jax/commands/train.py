"""`retribert-jax train`: train a RetriBERT on question/answer pairs; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import os

HELP = "train a RetriBERT retriever on JSONL question/answer pairs (resumes from OUT's checkpoints)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="a checkpoint directory to start from, or a config.json for a randomly initialised model")
    p.add_argument("data", metavar="DATA", help='JSONL file of {"question": ..., "answer": ...} objects, optionally '
                                                'with "negatives": [...] (e.g. from `retribert-jax mine`)')
    p.add_argument("out", metavar="OUT", help="output directory: checkpoints/, metrics.jsonl, final model/")
    p.add_argument("--tokenizer", help="tokenizer directory, tokenizer.json or vocab.txt (default: MODEL's own)")
    d = _defaults()
    p.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate, help="peak LR (%(default)s)")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon (%(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (%(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step (%(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="gradient accumulation: micro-batches of this size, in-batch negatives still over the batch")
    p.add_argument("--negatives-per-question", type=int, default=d.num_negatives,
                   help="hard negatives per question, sampled each epoch from the pair's negatives; 0 ignores them "
                        "(%(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="truncation length (%(default)s)")
    p.add_argument("--checkpoint-batch-size", type=int, default=d.checkpoint_batch_size,
                   help="encode in chunks of this size under gradient checkpointing; -1 for none (%(default)s)")
    p.add_argument("--epochs", type=int, default=d.num_epochs, help="epochs (%(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--grad-clip", type=float, default=None, help="clip gradients to this global norm")
    p.add_argument("--no-dropout", action="store_true", help="train with dropout off")
    p.add_argument("--seed", type=int, default=d.seed, help="shuffling, dropout and init seed (%(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (%(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (%(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log metrics every N steps (%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _defaults():
    from retribert_jax.config import TrainConfig

    return TrainConfig()


def _load_start(path: str, tokenizer_path: str | None, seed: int):
    from retribert_jax.config import RetriBertConfig
    from retribert_jax.modeling import RetriBertModel, init_model
    from retribert_jax.tokenizer import RetriBertTokenizer

    if os.path.isfile(path) and path.endswith(".json"):
        model = init_model(RetriBertConfig.from_json_file(path), seed=seed)
        tok_source = tokenizer_path or os.path.dirname(os.path.abspath(path))
    else:
        model = RetriBertModel.from_pretrained(path)
        tok_source = tokenizer_path or path
    try:
        tok = RetriBertTokenizer.from_pretrained(tok_source)
    except FileNotFoundError:
        raise FileNotFoundError(f"{tok_source}: no tokenizer found (pass --tokenizer)") from None
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tok


def run(args: argparse.Namespace) -> int:
    from retribert_jax.config import TrainConfig
    from retribert_jax.training import read_pairs, train

    tcfg = TrainConfig(learning_rate=args.learning_rate, adam_eps=args.adam_eps, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup_steps, batch_size=args.batch_size, max_length=args.max_length,
                       checkpoint_batch_size=args.checkpoint_batch_size, num_epochs=args.epochs,
                       max_steps=args.max_steps, micro_batch_size=args.micro_batch_size, grad_clip=args.grad_clip,
                       num_negatives=args.negatives_per_question,
                       dropout=not args.no_dropout, seed=args.seed, save_every=args.save_every,
                       keep_checkpoints=args.keep_checkpoints, log_every=args.log_every)
    pairs = read_pairs(args.data)
    model, tok = _load_start(args.model, args.tokenizer, args.seed)
    result = train(model, tok, pairs, args.out, tcfg, progress=not args.no_progress)
    model_dir = os.path.join(args.out, "model")
    if result.steps_trained == 0:
        print(f"{args.out}: already trained to step {result.step}; nothing to train; model: {model_dir}")
        return 0
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"trained {result.steps_trained} steps to step {result.step}{resumed} (last loss {loss}); model: "
          f"{model_dir}")
    return 0
