"""Private timing of the jitted forward at RetriBERT-base shape (B=32, L=128): passages/s, plus HF PyTorch eager.

    python benchmarks/profile_forward.py [--iters 5] [--torch] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from retribert_jax import RetriBertConfig  # noqa: E402
from retribert_jax.modeling import embed, init_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--torch", action="store_true")
    args = ap.parse_args()
    cfg = RetriBertConfig.retribert_base_uncased()
    model = init_model(cfg, dtype=jnp.dtype(args.dtype))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    out = embed(graphdef, state, ids, mask, kind="passages").block_until_ready()
    print(f"compile + first call: {time.perf_counter() - t0:.2f}s")
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = embed(graphdef, state, ids, mask, kind="passages").block_until_ready()
        times.append(time.perf_counter() - t0)
    best, med = min(times), float(np.median(times))
    print(f"jax {args.dtype}: best {args.batch / best:.1f} passages/s, median {args.batch / med:.1f} passages/s")
    np.save("/tmp/profile_out.npy", np.asarray(out))
    if args.torch:
        import torch
        import transformers

        torch.manual_seed(0)
        from retribert_jax.verify import hf_torch_config

        ref = transformers.RetriBertModel(hf_torch_config(RetriBertConfig())).eval()
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
        with torch.no_grad():
            ref.embed_answers(t_ids, t_mask)
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                ref.embed_answers(t_ids, t_mask)
                times.append(time.perf_counter() - t0)
        print(f"torch eager: best {args.batch / min(times):.1f} passages/s, "
              f"median {args.batch / float(np.median(times)):.1f} passages/s")


if __name__ == "__main__":
    main()
