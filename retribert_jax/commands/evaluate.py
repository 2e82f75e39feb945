"""`retribert-jax evaluate`: Recall@k, MRR@10 and nDCG@10 of a model on an index, against qrels, by ir-measures."""

from __future__ import annotations

import argparse
import json

from retribert_jax.commands import common

HELP = "measure retrieval (Recall@k, MRR@10, nDCG@10 by ir-measures/trec_eval) of queries against qrels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="passage embeddings written by `retribert-jax embed`")
    p.add_argument("model", metavar="MODEL", help="the RetriBERT checkpoint that embedded the passages")
    p.add_argument("queries", metavar="QUERIES", help='JSONL {"id" or "_id", "text"} or TSV id<TAB>text')
    p.add_argument(
        "qrels",
        metavar="QRELS",
        help="TREC qrels (qid 0 docid rel) or BEIR TSV (query-id corpus-id score, with that header)",
    )
    p.add_argument(
        "-k", "--depth", type=common.positive_int, default=100, help="passages retrieved per query (%(default)s)"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="MEASURE",
        help="ir-measures names, e.g. R@1000 AP nDCG@20 (default: R@1 R@5 R@10 R@100 RR@10 nDCG@10, "
        "without cutoffs above the depth)",
    )
    p.add_argument("--output", metavar="FILE", help="write the measures (and per-query values) as JSON")
    p.add_argument("--run-file", metavar="FILE", help="write the run in TREC format: qid Q0 docid rank score tag")
    p.add_argument("--run-tag", default="retribert_jax", help="the run file's tag column (%(default)s)")
    common.add_encoding_arguments(p)
    common.add_index_arguments(p)
    p.add_argument(
        "--ignore-identical-ids",
        action="store_true",
        help="drop a hit whose id equals its query's id, as BEIR does by default (Quora, ArguAna, whose "
        "queries are also documents); searches one deeper so that depth hits are left",
    )
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip unreadable query lines (logged) instead of stopping"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check(args: argparse.Namespace) -> None:
    try:
        import ir_measures  # noqa: F401 - the optional dependency, named before anything else is looked at
    except ImportError:
        from retribert_jax.evaluation import require_ir_measures

        require_ir_measures()  # raises, with the install command
    common.require_file(args.queries, "queries file")
    common.require_file(args.qrels, "qrels file")


def run(args: argparse.Namespace) -> int:
    from retribert_jax.evaluation import (
        evaluate,
        parse_metrics,
        read_qrels,
        read_queries,
        require_ir_measures,
        write_trec_run,
    )

    timings = args.timings
    require_ir_measures()
    # The cheap inputs first: a bad line or name should not wait for the model to load.
    with timings.phase("read queries and qrels"):
        parse_metrics(args.metrics, args.depth)
        queries = read_queries(args.queries, skip_bad_lines=args.skip_bad_lines)
        qrels = read_qrels(args.qrels)
    index = common.open_index(args)
    model, encoder = common.open_encoder(args, args.model, check=index.check_model)
    timings.report()
    result = evaluate(
        index,
        encoder,
        queries,
        qrels,
        depth=args.depth,
        metrics=args.metrics,
        batch_size=args.batch_size,
        max_length=common.question_max_length(args, model),
        show_progress=not args.no_progress,
        ignore_identical_ids=args.ignore_identical_ids,
    )
    print(
        f"{result.num_queries} queries with qrels evaluated at depth {args.depth}; "
        f"{len(result.skipped_queries)} queries without qrels skipped; "
        f"{len(result.unmatched_qrels)} qrels query ids not among the queries ignored; "
        f"{result.judged_documents_in_index} of their {result.judged_documents} judged documents in the index"
    )
    if result.identical_ids:
        print(
            f"{result.identical_ids} queries retrieved a document under their own id: "
            + (
                "dropped (--ignore-identical-ids)"
                if args.ignore_identical_ids
                else "kept; BEIR drops them (--ignore-identical-ids) where queries are also documents"
            )
        )
    print(result.table())
    if args.run_file:
        write_trec_run(args.run_file, result.run, tag=args.run_tag)
    if args.output:
        from retribert_jax.io import atomic_file

        report = {
            "index": args.index,
            "model": args.model,
            "queries": args.queries,
            "qrels": args.qrels,
            **result.to_dict(),
        }
        with atomic_file(args.output, "wb") as f:
            f.write((json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return 0
