"""Rows per forward call: milliseconds per packed row of the jitted forward at several batch sizes, interleaved.

    python benchmarks/profile_rows.py [--length 128] [--rows 2,4,8,16,32,64] [--rounds 3] [--base]

MiniLM's shape by default (6 x 384, 12 heads, FFN 1536), `--base` for RetriBERT-base. Each row is a packed row of
`--length` tokens holding two texts, as the Encoder builds them. The Encoder's default rows per call on a CPU
(`encode.TOKENS_PER_CALL`) comes from this: the best time per row, not the biggest batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from retribert_jax import RetriBertConfig  # noqa: E402
from retribert_jax.modeling import embed, init_model  # noqa: E402
from retribert_jax.packing import texts_per_row  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rows", default="2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", action="store_true", help="RetriBERT-base instead of MiniLM's shape")
    args = ap.parse_args()
    cfg = RetriBertConfig.retribert_base_uncased() if args.base else RetriBertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    graphdef, state = nnx.split(init_model(cfg))
    length, half = args.length, args.length // 2
    rng = np.random.default_rng(0)
    calls = {}
    for rows in (int(r) for r in args.rows.split(",")):
        ids = rng.integers(1000, 2000, (rows, length)).astype(np.int32)
        positions = np.tile(np.concatenate([np.arange(half), np.arange(length - half)]), (rows, 1)).astype(np.int32)
        cls_index = np.zeros((rows, texts_per_row(length)), np.int32)
        cls_index[:, 1] = half
        batch = (ids, np.ones_like(ids), positions, cls_index)

        def call(batch=batch):
            ids, mask, positions, cls_index = batch
            embed(graphdef, state, ids, mask, kind="passages", position_ids=positions,
                  cls_index=cls_index).block_until_ready()

        call()  # compile
        calls[rows] = call
    times: dict[int, list[float]] = {rows: [] for rows in calls}
    for _ in range(args.rounds):
        for rows, call in calls.items():  # interleaved, so that load and clock changes hit every size alike
            for _ in range(3):
                start = time.perf_counter()
                call()
                times[rows].append((time.perf_counter() - start) / rows)
    best = min(statistics.median(t) for t in times.values())
    print(f"ms per packed row of {length} tokens ({'RetriBERT-base' if args.base else 'MiniLM'} shape), median:")
    for rows, t in times.items():
        med = statistics.median(t)
        print(f"  {rows:4d} rows ({rows * length:6d} tokens a call): {med * 1e3:7.2f} ms  ({med / best:.2f}x the best)")


if __name__ == "__main__":
    main()
