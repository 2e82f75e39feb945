"""The retrieval research loop with one import: train, embed, evaluate, mine hard negatives, train again, evaluate.

    python examples/research_loop.py --out loop_out            # real weights and text, ~10 min on 2 CPU cores
    python examples/research_loop.py --out loop_out --quick    # a tiny random model, a minute (the suite's test)

Data: paragraphs of real English (the Python standard library's docstrings, `benchmarks/data.py`), each split into
a "question" (its first sentence) and an "answer" (the rest). The corpus is every answer; the test questions' own
answers are their single relevant passage. The starting model is the all-MiniLM-L6-v2 RetriBERT of the demo (real
BERT weights, random projection), so training has to learn the projection and adapt the pooler.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from retribert_jax import (  # noqa: E402
    Encoder,
    RetriBertModel,
    RetriBertTokenizer,
    TrainConfig,
    build_index,
    evaluate,
    mine_hard_negatives,
    train,
)

METRICS = ["R@1", "R@10", "RR@10", "nDCG@10"]


def question_answer_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Real paragraphs split into (first sentence, the rest), for paragraphs with at least two real sentences."""
    from benchmarks.data import real_texts

    pairs, seen = [], set()
    for text in real_texts(4 * n, seed=seed):
        first, _, rest = re.sub(r"\s+", " ", text).partition(". ")
        if len(first.split()) >= 4 and len(rest.split()) >= 8 and rest not in seen:
            seen.add(rest)
            pairs.append((first + ".", rest))
        if len(pairs) == n:
            break
    return pairs


def score(model, tok, corpus: list[str], queries: dict, qrels: dict, directory: str) -> dict[str, float]:
    encoder = Encoder(model, tok)
    index = build_index(encoder, corpus, directory, ids=[f"p{i}" for i in range(len(corpus))], overwrite=True)
    return evaluate(index, encoder, queries, qrels, depth=100, metrics=METRICS).metrics


def run(out: str, quick: bool = False) -> dict[str, dict[str, float]]:
    if quick:
        from tests.embed_helpers import tiny_model_dir

        start = tiny_model_dir(os.path.join(out, "start"), share_encoders=True)
        n_train, n_test = 64, 32
        tcfg = TrainConfig(
            batch_size=16,
            max_length=32,
            num_epochs=2,
            learning_rate=5e-3,
            warmup_steps=2,
            checkpoint_batch_size=-1,
            save_every=1000,
            log_every=4,
        )
    else:
        from retribert_jax.minilm import build_minilm_retribert

        start = build_minilm_retribert(os.path.join(out, "start"), projection_dim=128)
        n_train, n_test = 1024, 256
        tcfg = TrainConfig(
            batch_size=32,
            max_length=128,
            num_epochs=2,
            learning_rate=1e-4,
            warmup_steps=10,
            checkpoint_batch_size=-1,
            save_every=1000,
            log_every=8,
        )
    tok = RetriBertTokenizer.from_pretrained(start)
    pairs = question_answer_pairs(n_train + n_test, seed=7)
    train_pairs, test_pairs = pairs[:n_train], pairs[n_train:]
    corpus = [a for _, a in pairs]
    queries = {f"q{i}": q for i, (q, _) in enumerate(test_pairs)}
    qrels = {f"q{i}": {f"p{n_train + i}": 1} for i in range(len(test_pairs))}

    results = {
        "start": score(
            RetriBertModel.from_pretrained(start), tok, corpus, queries, qrels, os.path.join(out, "index-start")
        )
    }
    first = train(
        RetriBertModel.from_pretrained(start),
        tok,
        train_pairs,
        os.path.join(out, "run-in-batch"),
        TrainConfig(**{**tcfg.to_dict(), "num_negatives": 0}),
        progress=not quick,
        save_final=False,
    )
    results["in-batch negatives"] = score(first.model, tok, corpus, queries, qrels, os.path.join(out, "index-1"))

    # Mine with the trained model over the training answers only (the test answers must not leak in).
    encoder = Encoder(first.model, tok)
    train_index = build_index(
        encoder,
        [a for _, a in train_pairs],
        os.path.join(out, "index-train"),
        ids=[f"p{i}" for i in range(n_train)],
        overwrite=True,
    )
    rows = [{"question": q, "answer": a, "pid": f"p{i}"} for i, (q, a) in enumerate(train_pairs)]
    mined = mine_hard_negatives(
        train_index, encoder, rows, num_negatives=3, range_min=2, positive_id_field="pid", max_length=tcfg.max_length
    ).rows
    with open(os.path.join(out, "mined.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in mined)
    second = train(
        RetriBertModel.from_pretrained(start),
        tok,
        [(r["question"], r["answer"], r["negatives"]) for r in mined],
        os.path.join(out, "run-hard"),
        TrainConfig(**{**tcfg.to_dict(), "num_negatives": 1}),
        progress=not quick,
        save_final=False,
    )
    results["+ mined hard negatives"] = score(second.model, tok, corpus, queries, qrels, os.path.join(out, "index-2"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="loop_out", help="working directory (models, indexes, mined pairs)")
    p.add_argument("--quick", action="store_true", help="a tiny random model and little data")
    args = p.parse_args(argv)
    results = run(args.out, args.quick)
    print(f"{'model':>24} " + " ".join(f"{m:>8}" for m in METRICS))
    for name, metrics in results.items():
        print(f"{name:>24} " + " ".join(f"{metrics[m]:8.3f}" for m in METRICS))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
