"""`retribert-jax mine`: add hard negatives from an index to question/answer training pairs (resumable)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "add hard negatives, mined from an index written with --store-text, to training pairs (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="passage embeddings written by `retribert-jax embed "
                                                      "--store-text`")
    p.add_argument("model", metavar="MODEL", help="the RetriBERT checkpoint that embedded the passages")
    p.add_argument("pairs", metavar="PAIRS", help='JSONL {"question", "answer", ...}, as `retribert-jax train` reads')
    p.add_argument("out", metavar="OUT", help='the output JSONL: each row with all its keys plus "negatives" and '
                                              '"negative_ids"')
    g = p.add_argument_group("which hits become negatives (sentence-transformers' mine_hard_negatives filters)")
    g.add_argument("-n", "--num-negatives", type=int, default=3, help="negatives per pair (%(default)s)")
    g.add_argument("--range-min", type=int, default=0,
                   help="skip the best RANGE_MIN hits that are not the positive, as likely unlabelled positives "
                        "(%(default)s)")
    g.add_argument("--range-max", type=int,
                   help="consider hits up to this rank (default: range-min + num-negatives, times 10 with a score "
                        "filter)")
    g.add_argument("--max-score", type=float, help="drop hits scoring above this")
    g.add_argument("--min-score", type=float, help="drop hits scoring below this")
    g.add_argument("--absolute-margin", type=float,
                   help="drop hits scoring above the positive's score minus this")
    g.add_argument("--relative-margin", type=float,
                   help="drop hits scoring above (1 - this) times the positive's score, e.g. 0.05 (NV-Retriever's "
                        "TopK-PercPos)")
    g.add_argument("--positive-id-field", metavar="KEY",
                   help="row key holding the positive's id in the index (the positive is always also recognised "
                        "by its text)")
    p.add_argument("--include-scores", action="store_true",
                   help='also write "negative_scores" and "positive_score"')
    p.add_argument("--drop-incomplete", action="store_true",
                   help="leave out pairs with fewer negatives than asked (default: keep them, and count them)")
    p.add_argument("--chunk-size", type=int, default=10_000,
                   help="pairs per resumable part (%(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="packed rows per forward call (default: a platform's efficient size, ~1024 tokens on CPU)")
    p.add_argument("--max-length", type=int,
                   help="question truncation length (default: 128, or the model's max_position_embeddings if less); "
                        "answers are truncated as the index's passages were")
    p.add_argument("--backend", choices=("jax", "faiss"), default="jax",
                   help="exact search in JAX, or faiss IndexFlatIP (needs faiss-cpu) (%(default)s)")
    p.add_argument("--block-size", type=int, default=65536, help="corpus rows scored at once (%(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT, and discard an unfinished run with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.mining import FILTERS, MiningConfig, mine_file

    for name in ("chunk_size", "batch_size", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    config = MiningConfig(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                          max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
                          relative_margin=args.relative_margin, positive_id_field=args.positive_id_field,
                          include_scores=args.include_scores)
    from retribert_jax.io import check_overwrite

    check_overwrite(args.out, args.overwrite)
    if not os.path.isfile(args.pairs):
        raise FileNotFoundError(f"{args.pairs}: no such pairs file")

    from retribert_jax.encode import Encoder
    from retribert_jax.mining import check_index
    from retribert_jax.modeling import RetriBertModel
    from retribert_jax.search import Index
    from retribert_jax.tokenizer import RetriBertTokenizer

    index = Index(args.index, backend=args.backend, block_size=args.block_size)
    model = RetriBertModel.from_pretrained(args.model)
    check_index(index, model)  # before the encoder copies the parameters to the devices
    encoder = Encoder(model, RetriBertTokenizer.from_pretrained(args.model))
    model_name = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    stats = mine_file(index, encoder, args.pairs, args.out, config, chunk_size=args.chunk_size,
                      drop_incomplete=args.drop_incomplete, overwrite=args.overwrite, batch_size=args.batch_size,
                      max_length=args.max_length or min(128, model.config.max_position_embeddings),
                      model_name=model_name, show_progress=not args.no_progress)
    kept = stats.pairs - stats.dropped
    print(f"wrote {args.out}: {kept} pairs, {stats.negatives} negatives (window of ranks {config.range_min}-"
          f"{config.window_end - 1}, up to {config.num_negatives} a pair)", file=sys.stderr)
    if stats.incomplete:
        fate = "dropped (--drop-incomplete)" if args.drop_incomplete else "kept with what was found"
        print(f"{stats.incomplete} of {stats.pairs} pairs got fewer than {config.num_negatives} negatives: {fate}; "
              f"widen --range-max or loosen the filters for more", file=sys.stderr)
    for name in FILTERS:
        if stats.skipped.get(name):
            n = stats.skipped[name]
            print(f"{n} candidates ({n / max(1, stats.window):.1%} of the window) dropped by --"
                  f"{name.replace('_', '-')} {getattr(config, name)}", file=sys.stderr)
    if config.positive_id_field and stats.with_positive_id < stats.pairs:
        print(f"warning: only {stats.with_positive_id} of {stats.pairs} pairs carry {config.positive_id_field!r}; "
              f"the others' positives were recognised by text alone", file=sys.stderr)
    return 0
