"""A roofline on paper: RetriBERT's embedding programs, costed by XLA itself, against devices' published peaks.

    python benchmarks/roofline.py [--quick] [--out roofline.json]

For each program (kind "passages", one bucket shape each) the script compiles the jitted forward here, with the
layer scan unrolled (XLA's `cost_analysis()` counts a loop body once), and reads XLA's FLOPs and bytes accessed.
A program's time is predicted as FLOPs / (peak * MFU) + bytes / (bandwidth * efficiency): its kernels run one after
another, the GEMMs bound by compute and the elementwise kernels (LayerNorm, softmax, GELU) by memory, so the two
terms add rather than overlap; the larger one is the one that binds.

The model is checked here first: this CPU's matmul peak and copy bandwidth are measured, the same programs are run
with random weights, and the measured seq/s is compared with the prediction at MFU 1 (the check: within 25%).
Then the same arithmetic with published peaks (dense bf16 FLOP/s, HBM bandwidth) predicts named accelerators at
batch 1024 x 128 in bf16. Those are predictions, not measurements, and pessimistic on memory: the bytes come from
the CPU compilation, which writes the [B, H, L, L] attention scores to memory, where cuDNN's fused attention (the
GPU path) keeps them on chip; the compute term alone is printed as the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# name: (dense bf16 FLOP/s, memory bandwidth B/s), from the vendors' data sheets.
ACCELERATORS = {
    "NVIDIA H200 SXM": (989e12, 4.8e12),
    "NVIDIA A100 SXM": (312e12, 2.0e12),
    "TPU v5e": (197e12, 0.82e12),
    "TPU v5p": (459e12, 2.76e12),
}
MFU = 0.5  # stated, not measured: half of dense peak is what well-tuned transformer inference reaches on these chips
BANDWIDTH_EFFICIENCY = 0.8
ACCELERATOR_SHAPE = (1024, 128)


def cost(cfg, dtype, rows: int, length: int) -> dict[str, float]:
    """XLA's FLOPs and bytes accessed of the embedding program at (rows, length), the layer stack unrolled."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from retribert_jax.config import RunConfig
    from retribert_jax.modeling import abstract_model, embed

    # Unrolled: XLA's cost analysis counts a loop body once.
    run = RunConfig(dtype=dtype, scan_unroll=cfg.num_hidden_layers)
    graphdef, state = nnx.split(abstract_model(cfg, run_config=run))
    spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    analysis = embed.lower(graphdef, state, spec, spec, kind="passages").compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {"flops": float(analysis["flops"]), "bytes": float(analysis["bytes accessed"])}


def copy_bandwidth(quick: bool) -> float:
    """This device's bytes/s for reading and writing a large array in place (a jitted scale with the input donated,
    so that no call pays for fresh memory), best of a few."""
    import jax
    import jax.numpy as jnp

    n = (1 << 22) if quick else (1 << 25)  # 16 MiB / 128 MiB of float32
    f = jax.jit(lambda a: a * 1.0000001, donate_argnums=0)
    x = f(jnp.ones((n,), jnp.float32))
    best = float("inf")
    for _ in range(3 if quick else 10):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * 4 * n / best


def measured_seq_per_s(cfg, rows: int, length: int, quick: bool) -> float:
    """seq/s of the real (scanned) program with random weights, best of a few calls."""
    import jax
    import numpy as np
    from flax import nnx

    from retribert_jax.modeling import embed, init_model

    graphdef, state = nnx.split(init_model(cfg))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, size=(rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    compiled = embed.lower(graphdef, state, ids, mask, kind="passages").compile()
    jax.block_until_ready(compiled(state, ids, mask))
    best = float("inf")
    for _ in range(2 if quick else 3):
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, ids, mask))
        best = min(best, time.perf_counter() - t)
    return rows / best


def predict(c: dict[str, float], rows: int, flops_per_s: float, bytes_per_s: float) -> dict[str, Any]:
    compute, memory = c["flops"] / flops_per_s, c["bytes"] / bytes_per_s
    return {
        "seq_per_s": rows / (compute + memory),
        "compute_bound_seq_per_s": rows / compute,
        "binds": "compute" if compute >= memory else "memory",
        "compute_s": compute,
        "memory_s": memory,
        "arithmetic_intensity": c["flops"] / c["bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and few repetitions (a smoke run)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from benchmarks.data import bench_config
    from benchmarks.peers import measure_peak
    from retribert_jax.modeling import flops_per_sequence

    cfg = bench_config(args.quick)
    peak = measure_peak(gpu=False, quick=args.quick)["peak_flops_float32"]
    bandwidth = copy_bandwidth(args.quick)
    rows = 8 if args.quick else 32
    out: dict[str, Any] = {
        "model": "tiny" if args.quick else "RetriBERT-base",
        "cpu_matmul_peak_flops": peak,
        "cpu_copy_bandwidth": bandwidth,
        "mfu": MFU,
        "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
        "cpu": [],
        "accelerators": [],
    }
    print(f"this CPU: matmul peak {peak / 1e12:.3f} TFLOP/s fp32, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'program':>16} {'XLA GFLOP':>10} {'XLA GB':>8} {'predicted':>10} {'measured':>9} {'meas/pred':>9} binds")
    for length in (16, 32) if args.quick else (32, 64, 128):
        c = cost(cfg, jnp.float32, rows, length)
        pred = predict(c, rows, peak, bandwidth)
        seen = measured_seq_per_s(cfg, rows, length, args.quick)
        ratio = seen / pred["seq_per_s"]
        out["cpu"].append({"rows": rows, "length": length, **c, **pred, "measured_seq_per_s": seen, "ratio": ratio})
        print(
            f"{f'{rows} x {length} fp32':>16} {c['flops'] / 1e9:10.1f} {c['bytes'] / 1e9:8.2f} "
            f"{pred['seq_per_s']:10.1f} {seen:9.1f} {ratio:9.2f} {pred['binds']}"
        )
    worst = min(r["ratio"] for r in out["cpu"])
    out["cpu_check"] = {"worst_ratio": worst, "within_25_percent": all(0.75 <= r["ratio"] <= 1.25 for r in out["cpu"])}
    print(
        f"check: measured / predicted in [{worst:.2f}, {max(r['ratio'] for r in out['cpu']):.2f}] "
        f"({'within' if out['cpu_check']['within_25_percent'] else 'NOT within'} 25%)"
    )

    b, length = (8, 32) if args.quick else ACCELERATOR_SHAPE
    c = cost(cfg, jnp.bfloat16, b, length)
    nominal = b * flops_per_sequence(cfg, length)
    print(
        f"\npredictions (not measurements), {b} x {length} bf16, MFU {MFU:.0%}, bandwidth at "
        f"{BANDWIDTH_EFFICIENCY:.0%}; XLA counts {c['flops'] / 1e12:.2f} TFLOP, {c['bytes'] / 1e9:.2f} GB a batch"
    )
    print(
        f"{'device':>18} {'peak TF':>8} {'TB/s':>6} {'seq/s':>9} {'binds':>8} {'% of peak (nominal)':>20} "
        f"{'compute-bound seq/s':>20}"
    )
    for name, (flops_s, bytes_s) in ACCELERATORS.items():
        pred = predict(c, b, flops_s * MFU, bytes_s * BANDWIDTH_EFFICIENCY)
        share = pred["seq_per_s"] / b * nominal / flops_s
        out["accelerators"].append(
            {
                "device": name,
                "peak_flops": flops_s,
                "bandwidth": bytes_s,
                "rows": b,
                "length": length,
                **c,
                **pred,
                "nominal_share_of_peak": share,
            }
        )
        print(
            f"{name:>18} {flops_s / 1e12:8.0f} {bytes_s / 1e12:6.2f} {pred['seq_per_s']:9.0f} {pred['binds']:>8} "
            f"{share:20.0%} {pred['compute_bound_seq_per_s']:20.0f}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
