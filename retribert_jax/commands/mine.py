"""`retribert-jax mine`: add hard negatives from an index to question/answer training pairs (resumable)."""

from __future__ import annotations

import argparse
import sys

from retribert_jax.commands import common

HELP = "add hard negatives, mined from an index written with --store-text, to training pairs (resumable)"


FILE_OUTPUTS = ("out",)  # the mined JSONL (see `cli.check_outputs_spare_inputs`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "index", metavar="INDEX_DIR", help="passage embeddings written by `retribert-jax embed --store-text`"
    )
    p.add_argument("model", metavar="MODEL", help="the RetriBERT checkpoint that embedded the passages")
    p.add_argument(
        "pairs",
        metavar="PAIRS",
        help="training pairs as `retribert-jax train` reads them (JSONL, CSV, "
        "TSV or parquet; question/answer, Tevatron or sentence-transformers "
        "fields)",
    )
    p.add_argument(
        "out", metavar="OUT", help='the output JSONL: each row with all its keys plus "negatives" and "negative_ids"'
    )
    common.add_pair_field_arguments(p)
    g = p.add_argument_group("which hits become negatives (sentence-transformers' mine_hard_negatives filters)")
    g.add_argument(
        "-n", "--num-negatives", type=common.positive_int, default=3, help="negatives per pair (%(default)s)"
    )
    g.add_argument(
        "--range-min",
        type=common.non_negative_int,
        default=0,
        help="skip the best RANGE_MIN hits that are not the positive, as likely unlabelled positives (%(default)s)",
    )
    g.add_argument(
        "--range-max",
        type=common.positive_int,
        help="consider hits up to this rank (default: range-min + num-negatives, times 10 with a score filter)",
    )
    g.add_argument("--max-score", type=float, help="drop hits scoring above this")
    g.add_argument("--min-score", type=float, help="drop hits scoring below this")
    g.add_argument("--absolute-margin", type=float, help="drop hits scoring above the positive's score minus this")
    g.add_argument(
        "--relative-margin",
        type=float,
        help="drop hits scoring above (1 - this) times the positive's score, e.g. 0.05 (NV-Retriever's TopK-PercPos)",
    )
    g.add_argument(
        "--positive-id-field",
        metavar="KEY",
        help="row key holding the positive's id in the index (the positive is always also recognised by its text)",
    )
    p.add_argument("--include-scores", action="store_true", help='also write "negative_scores" and "positive_score"')
    p.add_argument(
        "--drop-incomplete",
        action="store_true",
        help="leave out pairs with fewer negatives than asked (default: keep them, and count them)",
    )
    p.add_argument(
        "--chunk-size", type=common.positive_int, default=10_000, help="pairs per resumable part (%(default)s)"
    )
    common.add_encoding_arguments(
        p,
        max_length_help="question truncation length (default: 128, or the model's "
        "max_position_embeddings if less); answers are truncated as the "
        "index's passages were",
    )
    common.add_index_arguments(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT, and discard an unfinished run with other settings",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check(args: argparse.Namespace) -> None:
    import os

    from retribert_jax.io import check_overwrite, job_record

    if not os.path.isfile(job_record(args.out)):  # else it may be this very run, finished: `mine_file` tells
        check_overwrite(args.out, args.overwrite)
    common.require_file(args.pairs, "pairs file")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.mining import FILTERS, MiningConfig, check_index, mine_file

    config = MiningConfig(
        num_negatives=args.num_negatives,
        range_min=args.range_min,
        range_max=args.range_max,
        max_score=args.max_score,
        min_score=args.min_score,
        absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin,
        positive_id_field=args.positive_id_field,
        include_scores=args.include_scores,
    )
    index = common.open_index(args)
    # Checked before the encoder copies the parameters to the devices.
    model, encoder = common.open_encoder(args, args.model, check=lambda m: check_index(index, m))
    args.timings.report()
    stats = mine_file(
        index,
        encoder,
        args.pairs,
        args.out,
        config,
        chunk_size=args.chunk_size,
        drop_incomplete=args.drop_incomplete,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_length=common.question_max_length(args, model),
        model_name=common.model_name(args.model),
        show_progress=not args.no_progress,
        fields=common.pair_fields(args),
    )
    kept = stats.pairs - stats.dropped
    if stats.already_complete:
        print(
            f"{args.out}: already complete ({kept} pairs, {stats.negatives} negatives); nothing to do "
            "(--overwrite mines it again)",
            file=sys.stderr,
        )
        return 0
    print(
        f"wrote {args.out}: {kept} pairs, {stats.negatives} negatives (window of ranks {config.range_min}-"
        f"{config.window_end - 1}, up to {config.num_negatives} a pair)",
        file=sys.stderr,
    )
    if stats.incomplete:
        fate = "dropped (--drop-incomplete)" if args.drop_incomplete else "kept with what was found"
        print(
            f"{stats.incomplete} of {stats.pairs} pairs got fewer than {config.num_negatives} negatives: {fate}; "
            f"widen --range-max or loosen the filters for more",
            file=sys.stderr,
        )
    for name in FILTERS:
        if stats.skipped.get(name):
            n = stats.skipped[name]
            print(
                f"{n} candidates ({n / max(1, stats.window):.1%} of the window) dropped by --"
                f"{name.replace('_', '-')} {getattr(config, name)}",
                file=sys.stderr,
            )
    if config.positive_id_field and stats.with_positive_id < stats.pairs:
        print(
            f"warning: only {stats.with_positive_id} of {stats.pairs} pairs carry {config.positive_id_field!r}; "
            f"the others' positives were recognised by text alone",
            file=sys.stderr,
        )
    return 0
