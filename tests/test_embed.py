"""`retribert-jax embed`: shards, manifest, input formats, bad lines, and resuming after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from tests.embed_helpers import random_texts, tiny_model_dir

SHARD = 100


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "embed", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files(directory: str) -> dict[str, bytes]:
    """Every visible file's bytes (hidden ones are temporary files, not output)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("."):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


def load_all(directory: str) -> tuple[dict, np.ndarray, list]:
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    embs, ids = [], []
    for i in range(manifest["num_shards"]):
        embs.append(np.load(os.path.join(directory, f"embeddings-{i:05d}.npy"), mmap_mode="r"))
        with open(os.path.join(directory, f"ids-{i:05d}.jsonl")) as f:
            ids += [json.loads(line) for line in f]
    return manifest, np.concatenate(embs), ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], str]:
    texts = random_texts(250, seed=7)
    path = str(tmp_path_factory.mktemp("corpus") / "c.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"pid": f"p{i}", "body": t}) + "\n" for i, t in enumerate(texts))
    return texts, path


def test_jsonl_to_shards(model_dir, corpus, tmp_path):
    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.encode import Encoder

    texts, path = corpus
    out = str(tmp_path / "out")
    r = run_cli(
        model_dir,
        path,
        out,
        "--kind",
        "passages",
        "--text-field",
        "body",
        "--id-field",
        "pid",
        "--shard-size",
        str(SHARD),
        "--store-text",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    manifest, emb, ids = load_all(out)
    want = {
        "format": "retribert_jax.embeddings",
        "version": 1,
        "model": model_dir,
        "kind": "passages",
        "dtype": "float32",
        "max_length": 128,
        "projection_dim": 16,
        "normalized": False,
        "shard_size": SHARD,
        "num_shards": 3,
        "count": 250,
        "has_text": True,
    }
    assert {k: manifest[k] for k in want} == want
    assert [np.load(f"{out}/embeddings-{i:05d}.npy").shape for i in range(3)] == [(100, 16), (100, 16), (50, 16)]
    assert ids == [f"p{i}" for i in range(250)]
    with open(f"{out}/texts-00001.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == texts[100:200]
    model = RetriBertModel.from_pretrained(model_dir)
    assert manifest["config_hash"] == model.config.architecture_hash()
    ref = Encoder(model, RetriBertTokenizer.from_pretrained(model_dir)).encode_passages(texts[:SHARD])
    diff = np.abs(emb[:SHARD] - ref).max()
    assert diff <= 1e-6, f"CLI shard 0 differs from Encoder.encode_passages by {diff:.3g}"


@pytest.mark.slow
def test_formats_agree_and_float16(model_dir, corpus, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts, _ = corpus
    texts = [t for t in texts[:120]]
    inputs = {"txt": tmp_path / "c.txt", "tsv": tmp_path / "c.tsv", "parquet": tmp_path / "c.parquet"}
    inputs["txt"].write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    inputs["tsv"].write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    pq.write_table(pa.table({"text": texts}), str(inputs["parquet"]))
    results = {}
    for name, path in inputs.items():
        out = str(tmp_path / f"out-{name}")
        r = run_cli(model_dir, str(path), out, "--kind", "questions", "--shard-size", "50", "--no-progress")
        assert r.returncode == 0, f"{name}: {r.stderr}"
        manifest, emb, ids = load_all(out)
        assert manifest["count"] == 120 and manifest["kind"] == "questions", f"{name}: {manifest}"
        assert ids == list(range(120)), f"{name}: default ids are not the record numbers"
        results[name] = emb
    for name in ("tsv", "parquet"):
        assert np.array_equal(results[name], results["txt"]), f"{name} embeddings differ from the plain-text run's"
    out = str(tmp_path / "out-f16")
    cache = tmp_path / "jax-cache"
    r = run_cli(
        model_dir,
        str(inputs["txt"]),
        out,
        "--kind",
        "questions",
        "--shard-size",
        "50",
        "--embedding-dtype",
        "float16",
        "--no-progress",
        "--compilation-cache",
        str(cache),
    )
    assert r.returncode == 0, r.stderr
    assert cache.is_dir() and any(cache.iterdir()), "--compilation-cache wrote nothing to the cache directory"
    manifest, emb, _ = load_all(out)
    assert manifest["dtype"] == "float16" and emb.dtype == np.float16
    assert np.array_equal(emb, results["txt"].astype(np.float16))
    # The same OUT with other settings is refused, naming what differs.
    r = run_cli(model_dir, str(inputs["txt"]), out, "--kind", "questions", "--shard-size", "50", "--no-progress")
    assert r.returncode == 2 and "dtype" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # So is an input that changed since: its records would no longer be the ones numbered into the shards.
    inputs["txt"].write_text("".join(t + "\n" for t in texts[1:]), encoding="utf-8")
    r = run_cli(
        model_dir,
        str(inputs["txt"]),
        out,
        "--kind",
        "questions",
        "--shard-size",
        "50",
        "--embedding-dtype",
        "float16",
        "--no-progress",
    )
    assert r.returncode == 2 and "input_sha256" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_lines(model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "why is the sky blue"})
    path.write_bytes(
        b"\n".join(
            [
                good.encode(),
                b'{"text": "unterminated',
                b'{"body": "no text field"}',
                b'{"text": "caf\xe9"}',
                good.encode(),
                b"",
            ]
        )
    )
    r = run_cli(model_dir, str(path), str(tmp_path / "o1"), "--kind", "passages", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert f"{path}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli(model_dir, str(path), str(tmp_path / "o2"), "--kind", "passages", "--no-progress", "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    for line, why in ((2, "invalid JSON"), (3, "missing text field 'text'"), (4, "invalid UTF-8")):
        assert f"{path}:{line}: {why}" in r.stderr, f"line {line} ({why}) not reported in:\n{r.stderr}"
    manifest, emb, ids = load_all(str(tmp_path / "o2"))
    assert manifest["count"] == 2 and ids == [0, 1]
    # Packed at different offsets of one row, identical texts agree to float32 rounding (measured ~4e-9), not bit
    # for bit: the attention's sums over keys group their terms by position.
    diff = np.abs(emb[0] - emb[1]).max()
    assert diff <= 1e-6, f"the two identical good lines got embeddings {diff:.3g} apart"


@pytest.mark.slow
def test_resume_after_kill9(model_dir, tmp_path):
    texts = random_texts(3000, seed=8)
    path = tmp_path / "big.txt"
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    args = [model_dir, str(path)]
    opts = ["--kind", "passages", "--shard-size", "200", "--batch-size", "16", "--no-progress"]
    killed = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retribert_jax.cli", "embed", *args, killed, *opts],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not os.path.exists(os.path.join(killed, "embeddings-00001.npy")):
        assert proc.poll() is None, "the embed run ended before it could be killed"
        assert time.monotonic() < deadline, "no shard appeared within 240 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "manifest.json")), "the run finished before the kill"
    shards = sorted(n for n in os.listdir(killed) if n.startswith("embeddings-"))
    assert 0 < len(shards) < 15, f"{len(shards)} shards after the kill; expected a partial run"
    for name in shards:  # every visible shard is whole
        assert np.load(os.path.join(killed, name)).shape == (200, 16), f"{name} is not a whole shard"
    r = run_cli(*args, killed, *opts)
    assert r.returncode == 0, r.stderr
    assert f"{200 * len(shards)} kept from an earlier run" in r.stderr, r.stderr
    fresh = str(tmp_path / "fresh")
    r = run_cli(*args, fresh, *opts)
    assert r.returncode == 0, r.stderr
    a, b = files(killed), files(fresh)
    assert a.keys() == b.keys(), f"files differ: {sorted(a.keys() ^ b.keys())}"
    differing = [n for n in a if a[n] != b[n]]
    assert not differing, f"resumed output differs from an uninterrupted run in {differing}"
    assert not [n for n in os.listdir(killed) if n.startswith(".")], "temporary files left behind"


@pytest.mark.slow
def test_byte_order_mark_and_null_ids(model_dir, tmp_path):
    """An Excel/Notepad JSONL file (byte-order mark, CRLF) with a null id: line 1 is a record, the null id is a bad
    line, and no id is invented for it (pyarrow reads the same records and ids)."""
    pa_json = pytest.importorskip("pyarrow.json")
    path = tmp_path / "excel.jsonl"
    rows = [
        {"id": 7, "text": "why is the sky blue"},
        {"id": None, "text": "why does ice float"},
        {"id": 1, "text": "why does bread rise"},
    ]
    path.write_bytes("\ufeff".encode() + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    want = pa_json.read_json(str(path)).to_pylist()
    assert want == rows
    r = run_cli(model_dir, str(path), str(tmp_path / "o1"), "--kind", "passages", "--id-field", "id", "--no-progress")
    assert r.returncode == 2 and f"{path}:2: id field 'id' is null" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = run_cli(
        model_dir,
        str(path),
        str(tmp_path / "o2"),
        "--kind",
        "passages",
        "--id-field",
        "id",
        "--skip-bad-lines",
        "--store-text",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert f"{path}:2: id field 'id' is null" in r.stderr and f"{path}:1:" not in r.stderr, r.stderr
    manifest, _, ids = load_all(str(tmp_path / "o2"))
    kept = [w for w in want if w["id"] is not None]
    assert manifest["count"] == len(kept) and ids == [w["id"] for w in kept]
    with open(tmp_path / "o2" / "texts-00000.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == [w["text"] for w in kept]


def test_compressed_corpus_embeds_as_the_plain_one(model_dir, corpus, tmp_path):
    """pyserini's encoder reads a corpus.jsonl.gz; so does embed, to the same shards as the plain file."""
    import gzip

    from retribert_jax import cli

    _, path = corpus
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(open(path, "rb").read()))
    outs = []
    for source in (path, str(packed)):
        outs.append(str(tmp_path / ("out-" + os.path.basename(source))))
        assert (
            cli.main(
                [
                    "embed",
                    model_dir,
                    source,
                    outs[-1],
                    "--kind",
                    "passages",
                    "--text-field",
                    "body",
                    "--id-field",
                    "pid",
                    "--shard-size",
                    str(SHARD),
                    "--no-progress",
                ]
            )
            == 0
        )
    (m1, e1, i1), (m2, e2, i2) = load_all(outs[0]), load_all(outs[1])
    assert m2["count"] == m1["count"] == 250 and i2 == i1
    np.testing.assert_array_equal(e2, e1)


def test_an_empty_input_is_refused(model_dir, tmp_path, capsys):
    """An empty input (or one whose every line was skipped) made an index of 0 passages with exit 0."""
    from retribert_jax import cli

    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text('{"body": "no text field"}\n')
    for path, extra, why in (
        (empty, [], "no passages to embed"),
        (bad, ["--skip-bad-lines"], "no passages to embed that could be read"),
    ):
        out = str(tmp_path / ("out-" + path.stem))
        assert cli.main(["embed", model_dir, str(path), out, "--kind", "passages", "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"retribert-jax embed: error: {path}: {why}" + (" (see the skipped lines above)" if extra else "")
        assert not os.path.exists(out), "a refused run left its output directory behind"


def test_repeated_ids_are_refused(model_dir, tmp_path, capsys):
    """Duplicate ids (7 and "7" too) were accepted without a word, and evaluate then passed at -k 1 and failed at
    -k 5 on the same inputs; embed refuses them, naming both lines, before writing a manifest."""
    from retribert_jax import cli

    path = tmp_path / "dup.jsonl"
    path.write_text(
        '{"id": 7, "text": "why is the sky blue"}\n{"id": "d1", "text": "why does ice float"}\n'
        '{"id": "7", "text": "why does bread rise"}\n'
    )
    for n, extra in enumerate(([], ["--skip-bad-lines"])):
        out = str(tmp_path / f"out{n}")
        assert (
            cli.main(
                ["embed", model_dir, str(path), out, "--kind", "passages", "--id-field", "id", "--no-progress", *extra]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"retribert-jax embed: error: {path}:3: id '7' again (first on line 1)"), err
        assert not os.path.isfile(os.path.join(out, "manifest.json"))


def test_nan_embeddings_are_refused_naming_the_ids(tmp_path, capsys):
    """A checkpoint with one corrupted (NaN) word-embedding row: embed exited 0 with NaN rows in the index. It
    refuses now, naming the ids of the passages that hold the word."""
    from safetensors.numpy import load_file, save_file

    from retribert_jax import cli
    from tests.embed_helpers import tiny_vocab

    model = tiny_model_dir(str(tmp_path / "model"))
    path = os.path.join(model, "model.safetensors")
    tensors = load_file(path)
    for name in ("bert_doc.embeddings.word_embeddings.weight", "bert_query.embeddings.word_embeddings.weight"):
        tensors[name][tiny_vocab().index("blue")] = np.nan
    save_file(tensors, path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": i, "text": t}) + "\n"
            for i, t in (
                ("p-ice", "why does ice float"),
                ("p-blue", "why is the sky blue"),
                ("p-cat", "the cat and bread"),
            )
        )
    )
    out = str(tmp_path / "out")
    assert cli.main(["embed", model, str(corpus), out, "--kind", "passages", "--id-field", "id", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"retribert-jax embed: error: {out}: the model gave "), err
    assert "NaN or infinite embeddings" in err and '"p-blue"' in err, err
    assert not os.path.exists(os.path.join(out, "embeddings-00000.npy"))


def test_embeddings_past_float16s_range_are_refused_in_one_line(tmp_path, capsys):
    """Embeddings too large for float16 storage printed numpy's overflow RuntimeWarning (with a source line) before
    the error; the cast is quiet now, and the inf rows are refused by name."""
    import warnings

    from safetensors.numpy import load_file, save_file

    from retribert_jax import cli

    model = tiny_model_dir(str(tmp_path / "model"))
    path = os.path.join(model, "model.safetensors")
    tensors = load_file(path)
    tensors["project_doc.weight"] = tensors["project_doc.weight"] * 1e7
    save_file(tensors, path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("why does ice float\nthe cat and bread\n")
    out = str(tmp_path / "out")
    argv = ["embed", model, str(corpus), out, "--kind", "passages", "--embedding-dtype", "float16", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or infinite embeddings (in the stored dtype float16)" in err[0], err


@pytest.mark.slow
def test_rerun_after_a_failed_run_and_overwrite(model_dir, tmp_path):
    """A typo in a field name leaves a run that finished nothing: the corrected command is not refused. A finished
    directory with other settings is refused, naming --overwrite, which replaces it."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(30, seed=9)), encoding="utf-8")
    out = str(tmp_path / "out")
    r = run_cli(model_dir, str(path), out, "--kind", "passages", "--text-field", "body", "--no-progress")
    assert r.returncode == 2 and "missing text field 'body'" in r.stderr, r.stderr
    r = run_cli(model_dir, str(path), out, "--kind", "passages", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli(model_dir, str(path), out, "--kind", "passages", "--no-progress")
    assert r.returncode == 0 and "already complete (30 passages in 1 shards); nothing to do" in r.stderr, r.stderr
    r = run_cli(model_dir, str(path), out, "--kind", "passages", "--normalize", "--no-progress")
    assert r.returncode == 2 and "normalized: False there, True now" in r.stderr and "--overwrite" in r.stderr
    r = run_cli(model_dir, str(path), out, "--kind", "passages", "--normalize", "--overwrite", "--no-progress")
    assert r.returncode == 0, r.stderr
    manifest, emb, _ = load_all(out)
    assert manifest["normalized"] and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert "process 0/1" not in r.stderr and "skipped" not in r.stderr, r.stderr


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_a_rerun_resumes(model_dir, tmp_path):
    texts = random_texts(3000, seed=10)
    path = tmp_path / "big.txt"
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = str(tmp_path / "out")
    argv = [
        sys.executable,
        "-m",
        "retribert_jax.cli",
        "embed",
        model_dir,
        str(path),
        out,
        "--kind",
        "passages",
        "--shard-size",
        "3000",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (os.path.isdir(out) and any(n.startswith(".piece-") for n in os.listdir(out))):
        assert proc.poll() is None, "the embed run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no piece appeared within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    pieces = sorted(n for n in os.listdir(out) if n.startswith(".piece-"))
    kept = sum(int(n[:-4].split("-")[3]) - int(n[:-4].split("-")[2]) for n in pieces)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"retribert-jax embed: interrupted; {out} keeps {kept} passages embedded"
        + (f" ({kept} in pieces of up to 1024)" if kept else "")
        + "; rerunning the same job resumes from there"
    ), err
    r = run_cli(
        model_dir, str(path), out, "--kind", "passages", "--shard-size", "3000", "--batch-size", "16", "--no-progress"
    )
    assert r.returncode == 0 and f"embedded {3000 - kept} passages" in r.stderr, r.stderr
    assert f"{kept} kept from an earlier run" in r.stderr, r.stderr
    assert load_all(out)[0]["count"] == 3000 and not [n for n in os.listdir(out) if n.startswith(".")]


def test_errors_are_not_drawn_into_the_progress_bar(model_dir, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in random_texts(20, seed=2)) + "{oops\n", encoding="utf-8"
    )
    r = run_cli(model_dir, str(path), str(tmp_path / "out"), "--kind", "passages", "--shard-size", "10")
    assert r.returncode == 2, r.stderr
    last = r.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"retribert-jax embed: error: {path}:21: invalid JSON"), repr(r.stderr[-500:])


@pytest.mark.slow
def test_compute_settings_are_recorded_and_the_weights_checked(model_dir, corpus, tmp_path):
    """--dtype and --precision go to the model at load time and into the manifest; `search` with a model of the same
    architecture but other weights is refused."""
    _, path = corpus
    out = str(tmp_path / "out")
    r = run_cli(
        model_dir,
        path,
        out,
        "--kind",
        "passages",
        "--text-field",
        "body",
        "--id-field",
        "pid",
        "--dtype",
        "bfloat16",
        "--precision",
        "highest",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    manifest = load_all(out)[0]
    assert (manifest["compute_dtype"], manifest["precision"]) == ("bfloat16", "highest"), manifest
    r = run_cli(
        model_dir,
        path,
        out,
        "--kind",
        "passages",
        "--text-field",
        "body",
        "--id-field",
        "pid",
        "--compute-dtype",
        "float32",
        "--precision",
        "highest",
        "--no-progress",
    )
    assert r.returncode == 2 and "compute_dtype: 'bfloat16' there, 'float32' now" in r.stderr, r.stderr
    other = tiny_model_dir(str(tmp_path / "tuned"), seed=1)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "search", out, other, "why"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "this model's weights differ" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "search", out, model_dir, "why", "-k", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "  p" in r.stdout and '"p' not in r.stdout, r.stdout + r.stderr
