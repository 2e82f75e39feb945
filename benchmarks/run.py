"""RetriBERT embedding throughput: retribert_jax against HF PyTorch, HF Flax and sentence-transformers, same weights.

    python benchmarks/run.py [--quick] [--out DIR]

Prints one table (fixed-shape throughput, achieved FLOP/s and its share of the matmul peak this script measures,
compile/warm-up time, end-to-end `encode` throughput on real text, peak memory), the ratios of retribert_jax to each
peer, and writes `results.json` and `benchmark.png` under DIR. Each framework runs in its own subprocess. On a GPU
(jax's default backend "gpu") the same command switches to bfloat16, batch 1024 and cuDNN attention, sized to finish
within about five minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.data import FLOPS_FORMULA, bench_config, build_model_dirs, real_texts  # noqa: E402
from benchmarks.peers import FRAMEWORKS, available, run_worker  # noqa: E402

PLAN_DTYPES = {  # which compute dtypes each framework runs in, by device
    "cpu": {
        "retribert_jax": ["float32", "bfloat16"],
        "hf_torch": ["float32", "bfloat16"],
        "hf_flax": ["float32"],
        "sentence_transformers": ["float32"],
    },
    "gpu": {
        "retribert_jax": ["bfloat16", "float32"],
        "hf_torch": ["bfloat16"],
        "hf_flax": ["bfloat16"],
        "sentence_transformers": ["bfloat16"],
    },
}
SCALED = ("retribert_jax", "hf_torch")  # the frameworks whose throughput is swept over batch and length


def sizes(quick: bool, gpu: bool) -> dict[str, Any]:
    """How much work each measurement does: small for --quick, about five minutes in all on a GPU."""
    if quick:
        return dict(
            batch=8,
            length=32,
            min_time=0.0,
            max_iters=2,
            n_texts=16,
            e2e_batch=8,
            max_length=64,
            scale_batches=[1, 8],
            scale_lengths=[16, 32],
            scale_length_batch=4,
            scale_length=32,
            scale_min_time=0.0,
            scale_max_iters=1,
            timeout=300,
        )
    if gpu:
        return dict(
            batch=1024,
            length=128,
            min_time=2.0,
            max_iters=50,
            n_texts=8192,
            e2e_batch=256,
            max_length=128,
            scale_batches=[1, 4, 16, 64, 256, 512],
            scale_lengths=[32, 64, 128, 256, 512],
            scale_length_batch=256,
            scale_length=128,
            scale_min_time=0.5,
            scale_max_iters=20,
            timeout=600,
        )
    return dict(
        batch=32,
        length=128,
        min_time=5.0,
        max_iters=10,
        n_texts=256,
        e2e_batch=32,
        max_length=128,
        scale_batches=[1, 4, 16, 64, 256, 512],
        scale_lengths=[32, 64, 128, 256, 512],
        scale_length_batch=16,
        scale_length=128,
        scale_min_time=1.0,
        scale_max_iters=3,
        timeout=3600,
    )


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one worker in a fresh Python process; returns its result, or {"error": ...} naming what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        env = {
            **os.environ,
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "TOKENIZERS_PARALLELISM": "false",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path, "--worker-out", result_path]
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.isfile(result_path):
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return {
                "error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}",
                "stderr_tail": "\n".join(lines[-15:]),
            }
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "sentence-transformers", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def corpus_stats(model_dir: str, n: int, max_length: int) -> dict[str, Any]:
    import numpy as np

    from retribert_jax.tokenizer import RetriBertTokenizer

    tok = RetriBertTokenizer.from_pretrained(model_dir)
    texts = real_texts(n, seed=0)
    full = tok.encode_lengths(texts, 100_000)
    return {
        "texts": n,
        "source": "docstrings of the Python standard library (benchmarks/data.py)",
        "tokens_mean": float(np.minimum(full, max_length).mean()),
        "tokens_min": int(full.min()),
        "tokens_max_untruncated": int(full.max()),
        "truncated_fraction": float((full > max_length).mean()),
        "chars_mean": float(np.mean([len(t) for t in texts])),
    }


def fmt(x: float | None, spec: str) -> str:
    """`x` formatted by `spec`, or "-" right-aligned to the same width when there is no value."""
    width = int(spec.split(".")[0] or 0) if spec[0].isdigit() else 0
    return "-".rjust(width) if x is None else format(x, spec)


def label(row: dict[str, Any]) -> str:
    return f"{row['framework']} {row['dtype']}"


def table(results: dict[str, Any]) -> str:
    """The printed report: one row per (framework, dtype), then retribert_jax's ratios to each peer."""
    s, peak = results["sizes"], results["peak"]
    head = (
        f"{'framework':<22} {'dtype':<9} {'seq/s':>9} {'TFLOP/s':>8} {'%peak':>6} {'compile s':>9} "
        f"{'e2e text/s':>10} {'e2e cold s':>10} {'peak MB':>8}"
    )
    lines = [
        f"fixed shape: batch {s['batch']} x length {s['length']} (all tokens real); end to end: "
        f"{s['n_texts']} real texts, max_length {s['max_length']}, batch {s['e2e_batch']}, tokenize + encode",
        f"device: {results['meta']['device']}; matmul peak measured here: "
        f"{peak['peak_flops_float32'] / 1e12:.3f} TFLOP/s fp32, {peak['peak_flops_bfloat16'] / 1e12:.3f} "
        f"TFLOP/s bf16 (best jitted matmul of {peak['matmul_n']}^3 and BERT-base's GEMM shapes)",
        head,
        "-" * len(head),
    ]
    for r in results["rows"]:
        tf = r.get("flops_per_s")
        frac = tf / peak[f"peak_flops_{r['dtype']}"] if tf else None
        comp = r.get("compile_s", r.get("warmup_s"))
        lines.append(
            f"{r['framework']:<22} {r['dtype']:<9} {fmt(r.get('throughput'), '9.1f')} "
            f"{fmt(tf and tf / 1e12, '8.3f')} {fmt(frac and 100 * frac, '5.1f')}{'%' if frac else ' '} "
            f"{fmt(comp, '9.2f')} "
            f"{fmt(r.get('e2e_throughput'), '10.1f')} {fmt(r.get('e2e_cold_s'), '10.2f')} "
            f"{fmt(r['peak_memory_bytes'] / 2**20, '8.0f')}"
        )
    lines.append("compile s: XLA compile time for the jax frameworks (count below), first-call overhead otherwise")
    for r in results["rows"]:
        if "compile_count" in r:
            lines.append(
                f"  {label(r)}: {r['compile_count']} compilation(s) for the fixed shape, "
                f"{r.get('e2e_compile_count', 0)} ({r.get('e2e_compile_s', 0.0):.2f} s) for the real-text run"
            )
    lines.append(FLOPS_FORMULA)
    ours = [r for r in results["rows"] if r["framework"] == "retribert_jax"]
    peers = [r for r in results["rows"] if r["framework"] != "retribert_jax"]
    if ours and peers:
        lines.append("retribert_jax throughput / peer throughput (fixed shape; end to end):")
        for o in ours:
            cells = []
            for p in peers:
                fixed = o["throughput"] / p["throughput"] if p.get("throughput") else None
                e2e = o["e2e_throughput"] / p["e2e_throughput"]
                cells.append(f"vs {label(p)} {f'{fixed:.2f}x' if fixed else 'n/a'}; {e2e:.2f}x")
            lines.append(f"  {label(o)}: " + " | ".join(cells))
    for name, why in results["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Headline and end-to-end bars, and throughput against batch size and sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    rows = results["rows"]
    names = [label(r).replace(" ", "\n") for r in rows]
    s = results["sizes"]
    ax = axes[0, 0]
    bars = ax.bar(names, [r.get("throughput") or 0 for r in rows], color="tab:blue")
    # sentence-transformers has only the end-to-end figure.
    ax.bar_label(bars, labels=[f"{r['throughput']:.1f}" if r.get("throughput") else "n/a" for r in rows], fontsize=7)
    ax.set_title(f"fixed shape {s['batch']} x {s['length']}: sequences/s")
    ax = axes[0, 1]
    ax.bar_label(ax.bar(names, [r["e2e_throughput"] for r in rows], color="tab:orange"), fmt="%.1f", fontsize=7)
    ax.set_title(f"end to end, {s['n_texts']} real texts (max_length {s['max_length']}): texts/s")
    for ax in axes[0]:
        ax.tick_params(axis="x", labelsize=7)
    for ax, key, other in ((axes[1, 0], "batch", "length"), (axes[1, 1], "length", "batch")):
        for name, curves in results["scaling"].items():
            pts = curves.get(f"by_{key}") or []
            if pts:
                ax.plot([p[key] for p in pts], [p["throughput"] for p in pts], marker="o", label=name)
        fixed = s["scale_length"] if key == "batch" else s["scale_length_batch"]
        ax.set_title(f"throughput vs {key} ({other} {fixed})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("sequences/s")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"RetriBERT ({results['meta']['model']}) on {results['meta']['device']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_results(results: dict[str, Any], out: str) -> str:
    """Writes results.json, results.txt and benchmark.png (each atomically) under `out`; returns the report."""
    from retribert_jax.io import atomic_file

    with atomic_file(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report = table(results) if results["rows"] else "no framework ran"
    with atomic_file(os.path.join(out, "results.txt"), "w") as f:
        f.write(report + "\n")
    if results["rows"]:
        # matplotlib's savefig takes a path or a binary file; write beside the target, then rename.
        tmp = os.path.join(out, ".benchmark.png.tmp")
        plot(results, tmp)
        os.replace(tmp, os.path.join(out, "benchmark.png"))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations: a smoke run (under a minute)")
    p.add_argument("--out", default=os.path.join(REPO, "bench_out"), help="where results go (default: bench_out/)")
    p.add_argument(
        "--model-dir",
        default=None,
        help="where the shared random weights are saved (reused when complete); default under --out",
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated subset of {FRAMEWORKS}")
    p.add_argument("--no-scaling", action="store_true", help="skip the batch/length sweep")
    p.add_argument(
        "--device-check",
        action="store_true",
        help="the accelerator run instead (benchmarks/device_check.py): ours beside PyTorch, torch.compile, "
        "sentence-transformers and PyTorch AMP, and fp32 parity against the CPU; ~6 min on an H200",
    )
    p.add_argument("--parts", help="--device-check: a comma-separated subset of its parts (default: all)")
    p.add_argument("--weights", help="--device-check: real weights for the parity check (see --prepare-weights)")
    p.add_argument(
        "--prepare-weights",
        metavar="DIR",
        help="write the real-weights model (MiniLM, float16 Flax safetensors, ~45 MB) to DIR and exit",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.worker, encoding="utf-8") as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(args.worker_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    if args.prepare_weights:
        from benchmarks.device_check import prepare_weights

        print(f"wrote {prepare_weights(args.prepare_weights)}")
        return 0
    if args.device_check:
        from benchmarks.device_check import report, run

        parts = [s.strip() for s in args.parts.split(",")] if args.parts else None
        print(report(run(args.out, quick=args.quick, weights=args.weights, parts=parts)))
        print(f"wrote {args.out}/device_check.json and device_check.png")
        return 0
    wanted = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(wanted) - set(FRAMEWORKS))
    if unknown:
        print(f"error: unknown framework(s) {unknown}; choose from {FRAMEWORKS}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    # --quick is a smoke run: everything in this process (memory figures then cover all frameworks together).
    # A full run gives each measurement a fresh process, so that its peak memory and threads are its own.
    isolate = not args.quick

    def execute(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        if isolate:
            return spawn(spec, timeout)
        try:
            return run_worker(spec)
        except Exception as e:  # one broken peer must not stop the others; the report names it
            return {"error": f"{type(e).__name__}: {e}"}

    probe = execute({"task": "probe", "gpu": False, "quick": args.quick}, 600)
    if "error" in probe:
        print(f"error: could not measure the device's matmul peak: {probe['error']}", file=sys.stderr)
        return 1
    gpu = probe["backend"] == "gpu"
    if gpu and not args.quick:  # re-measure with the GPU-sized matmul
        probe = execute({"task": "probe", "gpu": True, "quick": False}, 600)
    device = "gpu" if gpu else "cpu"
    sz = sizes(args.quick, gpu)
    cfg = bench_config(args.quick)
    model_root = args.model_dir or os.path.join(args.out, "models", "tiny" if args.quick else "base")
    print(f"saving the shared random weights under {model_root} ...", flush=True)
    dirs = build_model_dirs(model_root, cfg)
    skipped = {f: why for f in wanted if (why := available(f))}
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for f in ("hf_torch", "sentence_transformers"):
                skipped.setdefault(f, "torch has no CUDA here; a CPU run at GPU batch sizes would not be a peer")
    rows, scaling = [], {}
    results = {
        "meta": {
            "command": "python benchmarks/run.py" + (" --quick" if args.quick else ""),
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "device": probe["device"] if gpu else f"CPU: {cpu_name()} ({os.cpu_count()} cores)",
            "backend": probe["backend"],
            "quick": args.quick,
            "gpu": gpu,
            "isolated_processes": isolate,
            "model": "tiny random" if args.quick else "RetriBERT-base shape, random weights",
            "config": cfg.to_hf_dict(),
            "flops_formula": FLOPS_FORMULA,
            "versions": versions(),
            "platform": platform.platform(),
            "corpus": corpus_stats(dirs.retribert, sz["n_texts"], sz["max_length"]),
        },
        "sizes": sz,
        "peak": probe,
        "rows": rows,
        "scaling": scaling,
        "skipped": skipped,
        "complete": False,
    }

    def save() -> str:
        # After every measurement, so that an interrupted run keeps what it measured.
        results["meta"]["wall_s"] = time.perf_counter() - start
        return write_results(results, args.out)

    # Every headline first, the (longer) scaling sweep after: a run cut short still has the whole table.
    headline_specs = []
    for framework in wanted:
        if framework not in skipped:
            for dtype in PLAN_DTYPES[device][framework]:
                headline_specs.append(
                    {
                        "task": "headline",
                        "framework": framework,
                        "dtype": dtype,
                        "gpu": gpu,
                        "quick": args.quick,
                        "dirs": vars(dirs),
                        **{
                            k: sz[k]
                            for k in ("batch", "length", "min_time", "max_iters", "n_texts", "e2e_batch", "max_length")
                        },
                    }
                )
    for spec in headline_specs:
        name = f"{spec['framework']} {spec['dtype']}"
        print(f"[{time.perf_counter() - start:6.1f} s] {name} ...", flush=True)
        r = execute(spec, sz["timeout"])
        if "error" in r:
            skipped[name] = r["error"]
            print(r.get("stderr_tail", r["error"]), file=sys.stderr)
        else:
            rows.append(r)
        save()
    by_batch = [[b, sz["scale_length"]] for b in sz["scale_batches"]]
    by_length = [[sz["scale_length_batch"], n] for n in sz["scale_lengths"]]
    for framework in [] if args.no_scaling else SCALED:
        ran = [r for r in rows if r["framework"] == framework]
        if not ran:
            continue
        spec = next(s for s in headline_specs if s["framework"] == framework)  # its first dtype
        name = f"{framework} {spec['dtype']}"
        print(f"[{time.perf_counter() - start:6.1f} s] {name} scaling ...", flush=True)
        r = execute(
            {
                **spec,
                "task": "scaling",
                "points": by_batch + by_length,
                "min_time": sz["scale_min_time"],
                "max_iters": sz["scale_max_iters"],
            },
            sz["timeout"],
        )
        if "error" in r:
            skipped[f"{name} scaling"] = r["error"]
        else:
            pts = r["points"]
            scaling[name] = {"by_batch": pts[: len(by_batch)], "by_length": pts[len(by_batch) :]}
        save()
    results["complete"] = True
    report = save()
    print(report)
    print(f"wrote {args.out}/results.json, results.txt, benchmark.png in {results['meta']['wall_s']:.0f} s")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
