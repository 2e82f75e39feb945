"""The host's rate: how fast the Encoder turns texts into embeddings when the model costs nothing, against the
tokenizer alone on the same texts. What separates the two is the Encoder's own host work (packing, building the
arrays, dispatch, filing the results), which should hide behind tokenization.

    python benchmarks/host_rate.py [--texts 20000] [--repeats 3] [--distinct]

Prints texts/s of HF `tokenizers` alone (`encode_batch_fast`, truncation at 128, the ids read out as the Encoder reads
them), of `Encoder.encode_passages` with a 1-layer, 32-wide RetriBERT, and of the same Encoder on the same texts already
tokenized (its packing, arrays, dispatch and the model's compute: everything but the tokenizer), interleaved, best of
`--repeats`, and the ratio of the first two (and its median over the rounds). The Encoder tokenizes a repeated text once
and cuts very long texts before the tokenizer (both exact), so on texts with repeats or long tails it does less
tokenizing than the tokenizer alone; `--distinct` drops the repeats first. Where the host has cores to spare the job
takes about the longer of the tokenizer and the rest; where the tokenizer's threads already fill every core (a 2-core
CPU, on which that small model's compute is no longer negligible), it takes about their sum, and `overlap` says which:
the share of the shorter part that the job hid. `device_check.py` runs the same measurement on an accelerator beside the
device's own rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def negligible_config(vocab_size: int):
    """The model whose compute the host's rate neglects: 1 layer, 32 wide, 2 heads (a `RetriBertConfig`)."""
    from retribert_jax import RetriBertConfig

    return RetriBertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        projection_dim=16,
    )


def host_rate(texts: list[str], tokenizer_dir: str, repeats: int = 3, max_length: int = 128) -> dict[str, Any]:
    """Texts/s of the tokenizer alone and of the Encoder over a model of negligible compute, interleaved."""
    from retribert_jax import RetriBertTokenizer, init_model
    from retribert_jax.encode import Encoder

    tok = RetriBertTokenizer.from_pretrained(tokenizer_dir)
    enc = Encoder(init_model(negligible_config(tok.backend.get_vocab_size())), tok)
    backend = type(tok.backend).from_str(tok.backend.to_str())
    backend.enable_truncation(max_length)

    def tokenizer_alone() -> None:
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
        assert len(ids) == len(texts)

    def encoder() -> None:
        enc.encode_passages(texts, max_length=max_length)

    # The Encoder's own chunks (of the distinct texts, which are what it tokenizes), tokenized once.
    chunks = list(enc._chunks(list(dict.fromkeys(texts)), max_length))

    def encoder_pretokenized() -> None:
        enc._chunks = lambda texts, max_length: iter(chunks)
        try:
            enc.encode_passages(texts, max_length=max_length)
        finally:
            del enc._chunks

    encoder()  # compile
    best = {"tokenizer": float("inf"), "encoder": float("inf"), "pretokenized": float("inf")}
    round_ratios = []
    for _ in range(repeats):
        seconds = {}
        for name, fn in (("tokenizer", tokenizer_alone), ("encoder", encoder), ("pretokenized", encoder_pretokenized)):
            start = time.perf_counter()
            fn()
            seconds[name] = time.perf_counter() - start
            best[name] = min(best[name], seconds[name])
        round_ratios.append(seconds["tokenizer"] / seconds["encoder"])
    return {
        "texts": len(texts),
        "distinct_texts": len(set(texts)),
        "tokenizer_texts_per_s": len(texts) / best["tokenizer"],
        "encoder_texts_per_s": len(texts) / best["encoder"],
        "pretokenized_texts_per_s": len(texts) / best["pretokenized"],
        "ratio": best["tokenizer"] / best["encoder"],
        # The same ratio within each round (the two timed back to back), the median over rounds: less moved by a
        # machine whose speed drifts between rounds.
        "median_round_ratio": float(np.median(round_ratios)),
        # 1: the job took the longer part's time (the shorter one hidden); 0: their sum (nothing overlapped).
        "overlap": (best["tokenizer"] + best["pretokenized"] - best["encoder"])
        / min(best["tokenizer"], best["pretokenized"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--distinct",
        action="store_true",
        help="drop repeated texts first (the Encoder tokenizes and embeds a repeated text once, the tokenizer alone "
        "does not): the ratio without that gain",
    )
    args = p.parse_args(argv)
    from benchmarks.data import real_texts
    from retribert_jax.minilm import minilm_dir

    texts = real_texts(args.texts, seed=4)
    if args.distinct:
        texts = list(dict.fromkeys(texts))
    r = host_rate(texts, minilm_dir(), args.repeats)
    print(
        f"{r['texts']} texts ({r['distinct_texts']} distinct): tokenizer alone {r['tokenizer_texts_per_s']:.0f} "
        f"texts/s, Encoder (negligible model) {r['encoder_texts_per_s']:.0f} texts/s: {r['ratio']:.2f}x the "
        f"tokenizer's rate (best of {args.repeats} each; median of the rounds' ratios {r['median_round_ratio']:.2f}"
        f"x); the Encoder on tokenized texts {r['pretokenized_texts_per_s']:.0f} texts/s; overlap {r['overlap']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
