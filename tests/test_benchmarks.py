"""The benchmark suite: its FLOP count, corpus and shared weights, and a --quick smoke run (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.data import bench_config, build_model_dirs, real_texts
from benchmarks.peers import FRAMEWORKS, available
from retribert_jax.config import RetriBertConfig
from retribert_jax.modeling import flops_per_sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_formula_matches_the_models_matmuls():
    """The analytic count equals a count built from the model's own Linear shapes plus attention's two einsums."""
    from retribert_jax.modeling import init_model
    from retribert_jax.params import flat_params, path_str

    cfg = RetriBertConfig.tiny(num_hidden_layers=3, intermediate_size=48, projection_dim=8)
    length = 20
    total = 0
    for path, value in flat_params(init_model(cfg)).items():
        name = path_str(path)
        if not name.endswith("kernel"):
            continue
        din, dout = value.shape
        if name.startswith("bert_query.encoder."):
            total += 2 * length * din * dout  # every token
        elif name.startswith(("bert_query.pooler.", "project_doc.")):
            total += 2 * din * dout  # the [CLS] row only
    total += cfg.num_hidden_layers * 2 * (2 * length * length * cfg.hidden_size)  # QK^T and PV
    assert flops_per_sequence(cfg, length) == total, f"formula {flops_per_sequence(cfg, length)} vs count {total}"


def test_real_texts_are_deterministic_and_vary_in_length():
    a, b = real_texts(64, seed=0), real_texts(64, seed=0)
    assert a == b, "the corpus changed between two calls with one seed"
    words = np.array([len(t.split()) for t in a])
    assert words.min() < 30 and words.max() > 150, f"word counts span only {words.min()}..{words.max()}"


def test_model_dirs_hold_the_same_encoder_weights(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    dirs = build_model_dirs(str(tmp_path), bench_config(quick=True))
    retri = load_file(os.path.join(dirs.retribert, "model.safetensors"))
    bert = load_file(os.path.join(dirs.bert, "model.safetensors"))
    enc = {k.removeprefix("bert_query."): v for k, v in retri.items() if k.startswith("bert_query.")}
    assert sorted(enc) == sorted(bert), f"names differ: {sorted(set(enc) ^ set(bert))[:5]}"
    for k, v in bert.items():
        assert np.array_equal(enc[k], v), f"{k}: BERT dir differs from RetriBERT's bert_query"
    np.testing.assert_array_equal(np.load(dirs.projection), retri["project_doc.weight"])
    assert build_model_dirs(str(tmp_path), bench_config(quick=True)) == dirs  # reused, not rebuilt


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"run.py --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f), proc.stdout


@pytest.mark.slow
def test_quick_run_measures_every_installed_peer(quick_run):
    out, results, stdout = quick_run
    installed = [f for f in FRAMEWORKS if available(f) is None]
    assert "retribert_jax" in installed
    ran = {r["framework"] for r in results["rows"]}
    assert ran == set(installed), f"rows for {sorted(ran)}, installed {installed}; skipped: {results['skipped']}"
    for r in results["rows"]:
        who = f"{r['framework']} {r['dtype']}"
        assert r["e2e_throughput"] > 0 and r["e2e_shape"] == [results["sizes"]["n_texts"], 16], who
        assert r["peak_memory_bytes"] > 0, who
        if r["framework"] != "sentence_transformers":
            assert r["throughput"] > 0 and r["flops_per_s"] > 0, who
    dtypes = {(r["framework"], r["dtype"]) for r in results["rows"]}
    assert ("retribert_jax", "float32") in dtypes and ("retribert_jax", "bfloat16") in dtypes
    assert results["peak"]["peak_flops_float32"] > 0 and results["peak"]["peak_flops_bfloat16"] > 0
    curve = results["scaling"]["retribert_jax float32"]
    assert [p["batch"] for p in curve["by_batch"]] == results["sizes"]["scale_batches"]
    assert all(p["throughput"] > 0 for p in curve["by_batch"] + curve["by_length"])
    assert (out / "benchmark.png").stat().st_size > 10_000, "the plot is missing or empty"
    assert "retribert_jax throughput / peer throughput" in stdout and "FLOPs/sequence" in stdout


def test_no_script_stands_in_for_a_standard_library_module():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like a standard library module
    (profile.py: flax imports IPython, which imports cProfile, which imports profile) breaks every other script."""
    names = {f[:-3] for f in os.listdir(os.path.join(REPO, "benchmarks")) if f.endswith(".py")}
    assert not names & sys.stdlib_module_names, f"benchmarks/ shadows {sorted(names & sys.stdlib_module_names)}"


@pytest.mark.slow
def test_worker_subprocess_reports_the_matmul_peak():
    """The isolated-process path a full run takes for every measurement, on its cheapest job."""
    from benchmarks.run import spawn

    r = spawn({"task": "probe", "gpu": False, "quick": True}, timeout=300)
    assert "error" not in r, r
    assert r["backend"] == "cpu" and r["peak_flops_float32"] > 0, r


@pytest.mark.slow
def test_convert_benchmark_quick_run():
    """bench_convert.py end to end on a tiny checkpoint: every row measured, ratios and load times present."""
    pytest.importorskip("transformers")
    from benchmarks.bench_convert import format_table, run

    res = run(quick=True, repeat=1)
    names = [r["name"] for r in res["rows"]]
    assert len(names) == 3 and any("HF" in n for n in names), names
    for r in res["rows"]:
        assert r["wall_s"] > 0 and r["peak_rss_bytes"] > 0, r
    assert set(res["load"]) == {"orbax", "safetensors"}
    assert all(ld["load_s"] > 0 and ld["jax_start_s"] > 0 for ld in res["load"].values()), res["load"]
    assert all(abs(ld["import_s"] + ld["from_pretrained_s"] - ld["load_s"]) < 1e-6 for ld in res["load"].values())
    assert all(v > 0 for v in res["ratios"].values()), res["ratios"]
    assert "ratios vs HF" in format_table(res)


@pytest.mark.slow
def test_roofline_quick_run(tmp_path):
    """roofline.py end to end on the tiny model: CPU predictions beside measurements, accelerator predictions."""
    from benchmarks.roofline import ACCELERATORS, main

    out = tmp_path / "roofline.json"
    assert main(["--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["cpu_matmul_peak_flops"] > 0 and r["cpu_copy_bandwidth"] > 0
    assert r["cpu"] and all(row["flops"] > 0 and row["measured_seq_per_s"] > 0 and row["ratio"] > 0 for row in r["cpu"])
    assert [a["device"] for a in r["accelerators"]] == list(ACCELERATORS)
    assert all(a["binds"] in ("compute", "memory") and a["seq_per_s"] > 0 for a in r["accelerators"])


@pytest.mark.slow
def test_device_check_quick_run_on_cpu(tmp_path):
    """The device run's parts at toy sizes on this CPU, the PyTorch peers included: every row measured (none
    failed), JSON and PNG written, the ratios printed, fp32 parity between the default device and the CPU exact
    here (they are the same device), through the Encoder, the command line and the train step."""
    pytest.importorskip("sentence_transformers")
    from benchmarks.device_check import report, run

    r = run(str(tmp_path), quick=True)
    for part in ("peak", "forward", "real_text", "train", "parity_fp32", "search"):
        assert "error" not in r[part], (part, r[part].get("traceback"))
    for part, key in (("forward", "seq_per_s"), ("train", "pairs_per_s")):
        failed = {name: row.get("error") for name, row in r[part]["rows"].items() if not row.get(key, 0) > 0}
        assert not failed, (part, failed)
    assert {"ours", "PyTorch eager (HF BertModel, sdpa, bf16)", "torch.compile"} <= set(r["forward"]["rows"])
    assert "PyTorch AMP (bf16 autocast, fused AdamW)" in r["train"]["rows"]
    text = r["real_text"]
    assert [e["rows_per_call"] for e in text["encoder"]][1:] == [4] and all(
        e["texts_per_s"] > 0 for e in text["encoder"]
    )
    assert text["host"]["tokenizer_texts_per_s"] > 0 and text["sentence_transformers"][0]["texts_per_s"] > 0
    assert text["host"]["pretokenized_texts_per_s"] > 0 and np.isfinite(text["host"]["overlap"])
    p = r["parity_fp32"]
    assert "cli_error" not in p, p["cli_error"]
    assert max(p["encoder_max_abs_diff"], p["cli_max_abs_diff"], p["train_grad_max_abs_diff"]) <= 1e-6, p
    se = r["search"]
    assert se["ours_s"] > 0 and se["torch_s"] > 0 and se["screen_proven_exact"] == 1.0 and se["ids_equal"] == 1.0, se
    assert (tmp_path / "device_check.json").is_file() and (tmp_path / "device_check.png").stat().st_size > 5_000
    shown = report(r)
    assert "ours / torch.compile" in shown and "/ PyTorch AMP" in shown and "fp32 parity" in shown
    assert "PyTorch matmul + topk" in shown


@pytest.mark.slow
def test_research_loop_example_runs_end_to_end(tmp_path):
    """examples/research_loop.py at tiny size: train, embed, evaluate, mine, train with negatives, evaluate."""
    pytest.importorskip("ir_measures")
    from examples.research_loop import METRICS, run

    results = run(str(tmp_path), quick=True)
    assert list(results) == ["start", "in-batch negatives", "+ mined hard negatives"]
    for name, metrics in results.items():
        assert set(METRICS) <= set(metrics) and all(0.0 <= metrics[m] <= 1.0 for m in METRICS), (name, metrics)
    mined = [json.loads(line) for line in open(tmp_path / "mined.jsonl", encoding="utf-8")]
    assert mined and all("negatives" in r and r["answer"] not in r["negatives"] for r in mined)


def test_job_benchmark_reads_what_the_commands_print():
    """bench_jobs parses the --verbose timings line and embed's summary line as the command line writes them."""
    import io

    from benchmarks.bench_jobs import phases, programs
    from retribert_jax.cli import Timings

    timings, out = Timings(verbose=True), io.StringIO()
    for name in ("import jax and flax", "import retribert_jax", "place parameters"):
        with timings.phase(name):
            pass
    timings.report(file=out)
    assert list(phases(out.getvalue())) == ["import jax and flax", "import retribert_jax", "place parameters"]
    assert phases("no timings here") == {}
    line = (
        "process 0/1: embedded 500 passages (140.0/s), skipped 0 (finished earlier or another process's); "
        "1 programs (1 from the compilation cache), compiled in 0.2s"
    )
    assert programs(line) == {"programs": 1, "from_cache": 1, "compile_s": 0.2}


@pytest.mark.slow
def test_compile_profile_quick_run():
    """`profiling.py compile` on MiniLM's shape at a small program: every form measured, and the untrimmed last layer
    leaves XLA fewer loop kernels to generate than the [CLS]-only one (what makes it compile sooner)."""
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/profiling.py",
            "compile",
            "--minilm",
            "--rows",
            "2",
            "--length",
            "16",
            "--rounds",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr
    rows = {line[:34].strip(): line[34:].split() for line in r.stdout.splitlines()[2:]}
    assert len(rows) == 4 and all(len(v) == 6 and float(v[3]) > 0 for v in rows.values()), r.stdout
    loop = {name: int(v[4]) for name, v in rows.items()}
    assert loop["last layer untrimmed, ours"] < loop["last layer trimmed, ours"], r.stdout
