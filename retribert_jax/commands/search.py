"""`retribert-jax search`: retrieve passages for questions from an embedding directory written by `embed`."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "retrieve the top-k passages for one or more questions from an index written by `retribert-jax embed`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="embedding directory written by `retribert-jax embed`")
    p.add_argument("model", metavar="MODEL", help="the RetriBERT checkpoint that embedded the passages")
    p.add_argument("questions", metavar="QUESTION", nargs="*", help="question(s) to search for")
    p.add_argument("--queries-file", help="more questions, one per line ('-' for stdin)")
    p.add_argument("-k", type=int, default=10, help="passages per question (%(default)s)")
    p.add_argument("--json", action="store_true", help='print one JSON object per question: {"question", "hits"}')
    p.add_argument("--batch-size", type=int, default=None,
                   help="packed rows per forward call (default: a platform's efficient size, ~1024 tokens on CPU)")
    p.add_argument("--max-length", type=int,
                   help="question truncation length (default: 128, or the model's max_position_embeddings if less)")
    p.add_argument("--backend", choices=("jax", "faiss"), default="jax",
                   help="exact search in JAX, or faiss IndexFlatIP (needs faiss-cpu) (%(default)s)")
    p.add_argument("--block-size", type=int, default=65536, help="corpus rows scored at once (%(default)s)")
    p.add_argument("--recall-target", type=float,
                   help="jax backend: approximate top-k (jax.lax.approx_max_k) with this recall target, which only a "
                        "TPU uses; default exact")


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


def run(args: argparse.Namespace) -> int:
    if args.k <= 0:
        raise ValueError(f"-k must be positive, got {args.k}")
    questions = _questions(args)
    timings = args.timings
    with timings.phase("import retribert_jax"):
        from retribert_jax import RetriBertModel, RetriBertTokenizer
        from retribert_jax.encode import Encoder
        from retribert_jax.search import Index
    with timings.phase("open index"):
        index = Index(args.index, backend=args.backend, block_size=args.block_size, recall_target=args.recall_target)
        if index.manifest["kind"] != "passages":
            raise ValueError(f"{args.index}: holds {index.manifest['kind']} embeddings; searching needs passages")
    with timings.phase("load model"):
        model = RetriBertModel.from_pretrained(args.model)
        index.check_model(model.config)
    with timings.phase("load tokenizer"):
        tokenizer = RetriBertTokenizer.from_pretrained(args.model)
    with timings.phase("place parameters"):
        encoder = Encoder(model, tokenizer)
    max_length = args.max_length or min(128, model.config.max_position_embeddings)
    with timings.phase("encode and search"):
        results = index.search(encoder, questions, args.k, batch_size=args.batch_size, max_length=max_length)
    timings.report()
    for question, hits in zip(questions, results, strict=True):
        if args.json:
            print(json.dumps({"question": question, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for rank, h in enumerate(hits, 1):
            text = "" if h.text is None else "  " + " ".join(h.text.split())[:200]
            print(f"  {rank:>3}. {h.score:9.4f}  {json.dumps(h.id, ensure_ascii=False)}{text}")
    return 0
