"""Conversion and load cost: `retribert-jax convert` vs HF transformers' `FlaxBertModel.from_pretrained(from_pt=True)`.

    python benchmarks/bench_convert.py [--quick] [--out results.json] [--workdir DIR]

Builds a random RetriBERT-base-size `pytorch_model.bin` (8 x 768, 12 heads, 3072 FFN, 128-d projection: ~325 MB)
and the equivalent HF BERT directory (its `bert_query`), then runs each measurement in its own subprocess and
reports the subprocess's wall time and peak RSS (`getrusage(RUSAGE_CHILDREN)` in a one-child launcher, so no
other process's memory is mixed in):
  - ours: `python -m retribert_jax.cli convert model.bin OUT` end to end (interpreter start, imports, read, write);
  - HF Flax: `FlaxBertModel.from_pretrained(bert_dir, from_pt=True)` end to end (its load-and-convert; it writes
    nothing, which favours it);
  - load: `import retribert_jax` + `RetriBertModel.from_pretrained(OUT)` for the orbax and the safetensors layout,
    timed beyond `import jax` + the first device op, i.e. the cost a user pays on top of starting JAX; its two parts
    (importing the package, which is mostly importing flax.nnx, and the call itself) are reported too.
`run()` returns the same dict the script writes, so `benchmarks/run.py` can include it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One child, so RUSAGE_CHILDREN is exactly that child's peak RSS (ru_maxrss: KiB on Linux).
_LAUNCHER = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    wall = time.perf_counter() - start
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = ru.ru_maxrss * 1024
    print(json.dumps({"rc": proc.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": rss,
                      "stdout": proc.stdout[-2000:],
                      "stderr": proc.stderr[-2000:]}))
""")

_BUILD = textwrap.dedent("""
    import json, os, sys, torch, transformers
    out, quick = sys.argv[1], sys.argv[2] == "1"
    kw = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=128) if quick else {}
    from retribert_jax.config import RetriBertConfig
    from retribert_jax.verify import hf_torch_config

    cfg = hf_torch_config(RetriBertConfig(**kw))
    torch.manual_seed(0)
    model = transformers.RetriBertModel(cfg).eval()
    retri = os.path.join(out, "retribert")
    model.save_pretrained(retri, safe_serialization=False)
    bert_cfg = transformers.BertConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")})
    bert = transformers.BertModel(bert_cfg).eval()
    bert.load_state_dict(model.bert_query.state_dict())
    bert.save_pretrained(os.path.join(out, "bert"), safe_serialization=False)
""")

_HF_FLAX = textwrap.dedent("""
    import sys, jax
    from transformers import FlaxBertModel
    model = FlaxBertModel.from_pretrained(sys.argv[1], from_pt=True)
    jax.block_until_ready(model.params)
""")

_LOAD = textwrap.dedent("""
    import json, os, sys, time
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    import jax, jax.numpy as jnp
    jnp.zeros(1).block_until_ready()
    t1 = time.perf_counter()
    from retribert_jax import RetriBertModel
    from retribert_jax.params import flat_params
    t2 = time.perf_counter()
    model = RetriBertModel.from_pretrained(sys.argv[1])
    jax.block_until_ready([a for _, a in flat_params(model).items()])
    t3 = time.perf_counter()
    print(json.dumps({"jax_start_s": t1 - t0, "load_s": t3 - t1, "import_s": t2 - t1, "from_pretrained_s": t3 - t2}))
""")


def _measure_once(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    # Every run starts with the previous runs' output on disk: a conversion writes 311 MB, which the kernel would
    # otherwise flush while the next run is being timed.
    os.sync()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed (exit {res['rc']}): {res['stderr'][-1000:]}")
    return res


def _measure(argv: list[str], env: dict[str, str], repeat: int) -> dict[str, Any]:
    """The run with the median wall time of `repeat` (single runs of a few seconds vary by ~30% on a small VM,
    mostly with the kernel's write-back of earlier runs' output)."""
    runs = sorted((_measure_once(argv, env) for _ in range(repeat)), key=lambda r: r["wall_s"])
    return {**runs[len(runs) // 2], "wall_s_all": [r["wall_s"] for r in runs]}


def run(workdir: str | None = None, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    """Builds the checkpoints, measures, and returns {"rows": [...], "ratios": {...}, ...}.

    Args:
      workdir: where to build the checkpoints (a temporary directory by default, removed afterwards).
      quick: a tiny config instead of RetriBERT-base (smoke runs; the figures then mean nothing).
      repeat: runs of each measurement; the median (by wall time) is reported.
    """
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    own_tmp = workdir is None
    work = tempfile.mkdtemp(prefix="bench-convert-") if own_tmp else workdir
    try:
        subprocess.run(
            [sys.executable, "-c", _BUILD, work, "1" if quick else "0"],
            check=True,
            env=env,
            cwd=REPO,
            capture_output=True,
        )
        os.sync()  # the build's 650 MB of writes must not be flushed during the first measurement
        bin_path = os.path.join(work, "retribert", "pytorch_model.bin")
        size = os.path.getsize(bin_path)
        rows = []
        ours = _measure(
            [
                sys.executable,
                "-m",
                "retribert_jax.cli",
                "convert",
                os.path.join(work, "retribert"),
                os.path.join(work, "flax-orbax"),
                "--overwrite",
            ],
            env,
            repeat,
        )
        rows.append({"name": "retribert_jax convert (orbax)", **ours})
        ours_st = _measure(
            [
                sys.executable,
                "-m",
                "retribert_jax.cli",
                "convert",
                os.path.join(work, "retribert"),
                os.path.join(work, "flax-st"),
                "--format",
                "safetensors",
                "--overwrite",
            ],
            env,
            repeat,
        )
        rows.append({"name": "retribert_jax convert (safetensors)", **ours_st})
        hf = _measure([sys.executable, "-c", _HF_FLAX, os.path.join(work, "bert")], env, repeat)
        rows.append({"name": "HF FlaxBertModel.from_pretrained(from_pt=True)", **hf})
        loads = {}
        for fmt, d in (("orbax", "flax-orbax"), ("safetensors", "flax-st")):
            runs = [_measure_once([sys.executable, "-c", _LOAD, os.path.join(work, d)], env) for _ in range(repeat)]
            times = sorted(
                (
                    {**json.loads(r["stdout"].strip().splitlines()[-1]), "peak_rss_bytes": r["peak_rss_bytes"]}
                    for r in runs
                ),
                key=lambda t: t["load_s"],
            )
            loads[fmt] = {**times[len(times) // 2], "load_s_all": [t["load_s"] for t in times]}
        for r in rows:
            r.pop("stdout", None)
            r.pop("stderr", None)
            r.pop("rc", None)
        ratios = {
            "convert_orbax_wall_vs_hf": ours["wall_s"] / hf["wall_s"],
            "convert_orbax_rss_vs_hf": ours["peak_rss_bytes"] / hf["peak_rss_bytes"],
            "convert_safetensors_wall_vs_hf": ours_st["wall_s"] / hf["wall_s"],
            "convert_safetensors_rss_vs_hf": ours_st["peak_rss_bytes"] / hf["peak_rss_bytes"],
            "convert_orbax_cpu_vs_hf": ours["cpu_s"] / hf["cpu_s"],
        }
        return {
            "benchmark": "convert",
            "quick": quick,
            "repeat": repeat,
            "checkpoint_bytes": size,
            "cpu_count": os.cpu_count(),
            "rows": rows,
            "load": loads,
            "ratios": ratios,
            "targets": {"wall_ratio_max": 1 / 3, "rss_ratio_max": 1 / 2, "load_s_max": 1.0},
        }
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {res['checkpoint_bytes'] / 1e6:.0f} MB pytorch_model.bin, {res['cpu_count']} CPUs, "
        f"median of {res['repeat']} runs each",
        f"{'':50s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s}",
    ]
    for r in res["rows"]:
        lines.append(f"{r['name']:50s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_rss_bytes'] / 1e6:12.0f}")
    for fmt, ld in res["load"].items():
        lines.append(
            f"{'load converted (' + fmt + '), beyond JAX start':50s} {ld['load_s']:8.2f} {'':8s} "
            f"{ld['peak_rss_bytes'] / 1e6:12.0f}   (JAX start {ld['jax_start_s']:.2f} s; import "
            f"{ld['import_s']:.2f} s + from_pretrained {ld['from_pretrained_s']:.2f} s)"
        )
    r = res["ratios"]
    lines.append(
        f"ratios vs HF (target wall <= 0.33, RSS <= 0.50): orbax wall {r['convert_orbax_wall_vs_hf']:.2f}, "
        f"RSS {r['convert_orbax_rss_vs_hf']:.2f}; safetensors wall {r['convert_safetensors_wall_vs_hf']:.2f}, "
        f"RSS {r['convert_safetensors_rss_vs_hf']:.2f}; orbax CPU time {r['convert_orbax_cpu_vs_hf']:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny config (a smoke run; figures mean nothing)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is reported")
    p.add_argument("--workdir", help="build the checkpoints here and keep them (default: a temporary directory)")
    args = p.parse_args(argv)
    res = run(args.workdir, quick=args.quick, repeat=args.repeat)
    print(format_table(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
