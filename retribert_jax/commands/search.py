"""`retribert-jax search`: retrieve passages for questions from an embedding directory written by `embed`."""

from __future__ import annotations

import argparse
import json
import sys

from retribert_jax.commands import common

HELP = "retrieve the top-k passages for one or more questions from an index written by `retribert-jax embed`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="embedding directory written by `retribert-jax embed`")
    p.add_argument("model", metavar="MODEL", help="the RetriBERT checkpoint that embedded the passages")
    p.add_argument("questions", metavar="QUESTION", nargs="*", help="question(s) to search for")
    p.add_argument("--queries-file", help="more questions, one per line ('-' for stdin)")
    p.add_argument("-k", type=common.positive_int, default=10, help="passages per question (%(default)s)")
    p.add_argument("--json", action="store_true", help='print one JSON object per question: {"question", "hits"}')
    common.add_encoding_arguments(p)
    common.add_index_arguments(p)
    p.add_argument(
        "--recall-target",
        type=float,
        help="jax backend: approximate top-k (jax.lax.approx_max_k) with this recall target, which only a "
        "TPU uses; default exact",
    )


def _questions(args: argparse.Namespace) -> list[str]:
    from retribert_jax.corpus import BadRecord, read_lines

    questions = list(args.questions)
    if args.queries_file:
        # One question a line as `embed` and `wc -l` count lines (not str.splitlines, which also splits at \f, \x85,
        # U+2028 ...); blank lines are skipped.
        if args.queries_file == "-":
            lines = read_lines("<stdin>", sys.stdin.buffer)
        else:
            lines = read_lines(args.queries_file)
        try:
            for _, line in lines:
                if isinstance(line, BadRecord):
                    raise line
                if line.strip():
                    questions.append(line.strip())
        except FileNotFoundError:
            raise FileNotFoundError(f"{args.queries_file}: no such queries file") from None
    if not questions:
        raise ValueError("no questions: give them as arguments or with --queries-file")
    return questions


def check(args: argparse.Namespace) -> None:
    args.question_list = _questions(args)


def shown_id(value) -> str:
    """A hit's id as a person reads it: a string as it is, any other JSON value (a number, a list) as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def run(args: argparse.Namespace) -> int:
    questions = args.question_list
    timings = args.timings
    index = common.open_index(args)
    model, encoder = common.open_encoder(args, args.model, check=index.check_model)
    with timings.phase("encode and search"):
        results = index.search(
            encoder, questions, args.k, batch_size=args.batch_size, max_length=common.question_max_length(args, model)
        )
    timings.report()
    for question, hits in zip(questions, results, strict=True):
        if args.json:
            print(json.dumps({"question": question, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for rank, h in enumerate(hits, 1):
            text = "" if h.text is None else "  " + " ".join(h.text.split())[:200]
            print(f"  {rank:>3}. {h.score:9.4f}  {shown_id(h.id)}{text}")
    return 0
