"""Private side-by-side timing at RetriBERT-base shape (B=32, L=128, fp32), interleaved so that load hits all alike:
our jitted forward, HF FlaxBertModel + projection under jit, HF PyTorch RetriBertModel eager.

    python benchmarks/profile_fixed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers
    from flax import nnx

    from retribert_jax import RetriBertConfig
    from retribert_jax.modeling import embed, init_model

    b, length = 32, 128
    cfg = RetriBertConfig.retribert_base_uncased()
    ids = np.random.default_rng(0).integers(1000, 20000, size=(b, length)).astype(np.int32)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(init_model(cfg))

    def ours():
        embed(graphdef, state, ids, mask, kind="passages").block_until_ready()

    bert_cfg = transformers.BertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"})
    flax_bert = transformers.FlaxBertModel(bert_cfg, seed=0)
    proj = jnp.asarray(np.random.default_rng(1).standard_normal((cfg.hidden_size, 128)).astype(np.float32))

    @jax.jit
    def flax_fn(params, ids, mask):
        return flax_bert(ids, mask, params=params).pooler_output @ proj

    def flax():
        flax_fn(flax_bert.params, ids, mask).block_until_ready()

    from retribert_jax.verify import hf_torch_config

    ref = transformers.RetriBertModel(hf_torch_config(RetriBertConfig())).eval()
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    def torch_eager():
        with torch.no_grad():
            ref.embed_answers(t_ids, t_mask)

    runs = {"ours": ours, "FlaxBertModel": flax, "torch eager": torch_eager}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        print(f"{name}: first call (compile) {time.perf_counter() - t0:.1f}s")
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    for name in runs:
        print(f"{name}: {b / best[name]:.1f} passages/s (best of {args.rounds}); "
              f"ours / this = {best[name] / best['ours']:.2f}")


if __name__ == "__main__":
    main()
