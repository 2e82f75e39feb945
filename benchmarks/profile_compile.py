"""Where a program's compile seconds go: tracing, lowering, XLA's compilation, and the kernels it generates.

    python benchmarks/profile_compile.py [--rows 32] [--length 128] [--rounds 3] [--minilm]

RetriBERT-base's passage program at (--rows, --length) in the forms the Encoder compiles (the last layer trimmed to
the [CLS] rows or not; XLA's defaults or `config.COMPILER_OPTIONS['cpu']`), next to the smallest program XLA can
compile (one elementwise op) as the floor. Rounds interleaved, caches cleared before each compilation, medians.
"Loop kernels" counts the fusions XLA:CPU generates code for (identical ones are generated once), "library" those it
hands to YNNPACK/oneDNN, which cost little to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from retribert_jax import RetriBertConfig  # noqa: E402
from retribert_jax.config import COMPILER_OPTIONS, RunConfig  # noqa: E402
from retribert_jax.modeling import abstract_model, embed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2's shape instead of RetriBERT-base")
    args = ap.parse_args()
    cfg = RetriBertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536) \
        if args.minilm else RetriBertConfig.retribert_base_uncased()
    spec = jax.ShapeDtypeStruct((args.rows, args.length), jnp.int32)

    def model_program(trim: bool):
        graphdef, state = nnx.split(abstract_model(cfg, run_config=RunConfig(trim_last_layer=trim)))
        return lambda: embed.trace(graphdef, state, spec, spec, kind="passages")

    def one_op():
        return jax.jit(lambda x: x + 1.0).trace(jax.ShapeDtypeStruct((args.rows, args.length), jnp.float32))

    forms = {  # name: (trace, compiler options)
        "one elementwise op (floor)": (one_op, {}),
        "last layer trimmed, XLA defaults": (model_program(True), {}),
        "last layer trimmed, ours": (model_program(True), COMPILER_OPTIONS["cpu"]),
        "last layer untrimmed, ours": (model_program(False), COMPILER_OPTIONS["cpu"]),
    }
    for trace, options in forms.values():  # warm-up: the process's first compilation pays one-time set-up
        trace().lower().compile(compiler_options=options)
    seconds: dict[str, list[tuple[float, float, float]]] = {name: [] for name in forms}
    kernels: dict[str, tuple[int, int]] = {}
    for _ in range(args.rounds):
        for name, (trace, options) in forms.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            traced = trace()
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            compiled = lowered.compile(compiler_options=options)
            t3 = time.perf_counter()
            seconds[name].append((t1 - t0, t2 - t1, t3 - t2))
            hlo = compiled.as_text()
            kernels[name] = (len(re.findall(r"\bfusion\(.*kind=k(?:Loop|Input|Output)", hlo)),
                             len(re.findall(r"\bfusion\(.*kind=kCustom", hlo)))
    print(f"{cfg.num_hidden_layers} x {cfg.hidden_size} at ({args.rows}, {args.length}), jax {jax.__version__}, "
          f"median of {args.rounds}:")
    print(f"{'':>34} {'trace s':>8} {'lower s':>8} {'compile s':>9} {'total s':>8} {'loop kernels':>12} "
          f"{'library':>8}")
    for name, runs in seconds.items():
        t, lo, c = (statistics.median(r[i] for r in runs) for i in range(3))
        loop, lib = kernels[name]
        print(f"{name:>34} {t:8.3f} {lo:8.3f} {c:9.3f} {t + lo + c:8.3f} {loop:12d} {lib:8d}")


if __name__ == "__main__":
    main()
