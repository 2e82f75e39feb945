"""The matmul-only bound: how fast one RetriBERT-base batch could run if nothing but its GEMMs took time.

    python benchmarks/profile_gemms.py [--batch 32] [--length 128]

Times each matmul of one encoder layer at its real shape (fused QKV, attention output, the two FFN GEMMs, and
attention's two batched products) under jax.jit, and the same dense GEMMs in PyTorch, then prints the seq/s bound
for a full-length forward and for ours, whose last layer computes only the [CLS] row's query, output and FFN.
A framework measured above that bound would be doing less arithmetic, not doing it faster.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from retribert_jax import RetriBertConfig

    cfg = RetriBertConfig.retribert_base_uncased()
    d, f, h, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers
    b, length = args.batch, args.length
    t = b * length
    dense = {"qkv (fused)": (t, d, 3 * d), "attention output": (t, d, d), "ffn in": (t, d, f), "ffn out": (t, f, d),
             "last layer k,v only": (t, d, 2 * d)}
    rng = np.random.default_rng(0)
    mm = jax.jit(lambda x, y: x @ y)
    secs = {}
    print(f"batch {b} x length {length}, {layers} layers, D={d}, F={f}, heads={h}")
    for name, (m, k, n) in dense.items():
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        y = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        secs[name] = best_seconds(lambda x=x, y=y: mm(x, y).block_until_ready())
        print(f"  jax   {name:20s} [{m}, {k}] x [{k}, {n}]: {secs[name] * 1e3:7.1f} ms, "
              f"{2 * m * k * n / secs[name] / 1e9:6.0f} GFLOP/s")
    q = jnp.asarray(rng.standard_normal((b, h, length, d // h), dtype=np.float32))
    p = jnp.asarray(rng.standard_normal((b, h, length, length), dtype=np.float32))
    qk = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
    pv = jax.jit(lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v))
    secs["attention"] = (best_seconds(lambda: qk(q, q).block_until_ready())
                         + best_seconds(lambda: pv(p, q).block_until_ready()))
    print(f"  jax   {'QK^T + PV':20s} {secs['attention'] * 1e3:7.1f} ms, "
          f"{2 * 2 * b * h * length * length * (d // h) / secs['attention'] / 1e9:6.0f} GFLOP/s")
    layer = sum(secs[k] for k in ("qkv (fused)", "attention output", "ffn in", "ffn out", "attention"))
    full = layers * layer
    cls_only = (layers - 1) * layer + secs["last layer k,v only"]
    print(f"matmul-only time per batch: {full:.2f} s full-length -> at most {b / full:.1f} seq/s; "
          f"with the [CLS]-only last layer {cls_only:.2f} s -> at most {b / cls_only:.1f} seq/s")
    try:
        import torch
    except ImportError:
        return
    for name, (m, k, n) in dense.items():
        x, y = torch.randn(m, k), torch.randn(k, n)
        s = best_seconds(lambda x=x, y=y: x @ y)
        print(f"  torch {name:20s} {2 * m * k * n / s / 1e9:6.0f} GFLOP/s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
