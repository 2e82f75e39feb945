"""`retribert-jax mine`: every filter against brute force over the stored shards, positives, resuming, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from retribert_jax import RetriBertModel, RetriBertTokenizer, cli, mining
from retribert_jax.encode import Encoder
from retribert_jax.mining import MiningConfig, mine_file, mine_hard_negatives
from retribert_jax.pairs import read_pairs
from retribert_jax.search import Index
from tests.embed_helpers import random_texts, tiny_model_dir

SHARD = 20


def spread_model_dir(directory: str) -> str:
    """The tiny random model with its matrices scaled by 20: at the default init every text embeds almost alike
    (cosines within 1e-6 of each other), here adjacent scores differ by >= 1e-5, far above float32 rounding, so the
    brute force below ranks as the index does."""
    from safetensors.numpy import load_file, save_file

    tiny_model_dir(directory)
    path = os.path.join(directory, "model.safetensors")
    weights = load_file(path)
    save_file({k: v * 20 if v.ndim == 2 and "embeddings" not in k else v for k, v in weights.items()}, path)
    return directory


def norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, index dir, encoder, corpus texts, pair rows)."""
    root = tmp_path_factory.mktemp("mine")
    model_dir = spread_model_dir(str(root / "model"))
    texts = [f"{t} passage {i}" for i, t in enumerate(random_texts(44, seed=5))]
    # p44 repeats a positive (p2), p45 and p46 repeat another passage, p47 is p5 with other spacing.
    texts += [texts[2], texts[10], texts[10], "  " + texts[5].replace(" ", " \n ", 2) + "\t"]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    index_dir = str(root / "index")
    assert (
        cli.main(
            [
                "embed",
                model_dir,
                str(corpus),
                index_dir,
                "--kind",
                "passages",
                "--id-field",
                "id",
                "--store-text",
                "--normalize",
                "--shard-size",
                str(SHARD),
                "--no-progress",
            ]
        )
        == 0
    )
    encoder = Encoder(RetriBertModel.from_pretrained(model_dir), RetriBertTokenizer.from_pretrained(model_dir))
    rows = [
        {"question": " ".join(texts[i].split()[:5]), "answer": texts[i], "pid": f"p{i}", "meta": {"i": i}}
        for i in (0, 2, 5, 10, 17, 23, 31)
    ]
    del rows[4]["pid"]  # recognised by text alone
    rows.append({"question": "why does bread rise", "answer": "not a passage of the corpus", "source": "extra"})
    return model_dir, index_dir, encoder, texts, rows


def load_index(index_dir: str) -> tuple[np.ndarray, list, list[str], dict]:
    """Embeddings, ids and texts over all shards, read as files (not through Index)."""
    with open(os.path.join(index_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["num_shards"] > 1, "the test wants rows from several shards"
    embs, ids, texts = [], [], []
    for i in range(manifest["num_shards"]):
        embs.append(np.load(os.path.join(index_dir, f"embeddings-{i:05d}.npy")))
        with open(os.path.join(index_dir, f"ids-{i:05d}.jsonl")) as f:
            ids += [json.loads(line) for line in f]
        with open(os.path.join(index_dir, f"texts-{i:05d}.jsonl")) as f:
            texts += [json.loads(line) for line in f]
    return np.concatenate(embs), ids, texts, manifest


def brute_force(setup, cfg: MiningConfig) -> list[list[int]]:
    """The expected negatives (corpus rows) of each pair, from float64 inner products over the stored shards and the
    module docstring's rules written out again."""
    _, index_dir, encoder, _, rows = setup
    emb, ids, texts, manifest = load_index(index_dir)
    q = encoder.encode_questions([r["question"] for r in rows], normalize=True).astype(np.float64)
    p = encoder.encode_passages([r["answer"] for r in rows], max_length=manifest["max_length"], normalize=True).astype(
        np.float64
    )
    scores = q @ emb.astype(np.float64).T  # pairs x corpus
    out = []
    for i, row in enumerate(rows):
        pos = float(q[i] @ p[i])
        pid = row.get(cfg.positive_id_field) if cfg.positive_id_field else None
        seen, cands = {norm(row["answer"])}, []
        for r in np.argsort(-scores[i], kind="stable"):
            if norm(texts[r]) in seen or (pid is not None and ids[r] == pid):
                continue
            seen.add(norm(texts[r]))
            cands.append(int(r))

        window = cands[cfg.range_min : cfg.window_end]
        out.append([r for r in window if passes(cfg, scores[i, r], pos)][: cfg.num_negatives])
    return out


def passes(cfg: MiningConfig, score: float, positive: float) -> bool:
    """sentence-transformers' inequalities: a candidate goes when any of them holds."""
    return not (
        (cfg.absolute_margin is not None and score + cfg.absolute_margin > positive)
        or (cfg.relative_margin is not None and score > positive * (1 - cfg.relative_margin))
        or (cfg.max_score is not None and score > cfg.max_score)
        or (cfg.min_score is not None and score < cfg.min_score)
    )


def check_against_brute_force(setup, cfg: MiningConfig, mined) -> None:
    _, index_dir, _, _, rows = setup
    _, ids, texts, _ = load_index(index_dir)
    want = brute_force(setup, cfg)
    for i, (row, got) in enumerate(zip(rows, mined.rows, strict=True)):
        assert {k: got[k] for k in row} == row, f"pair {i}: input keys changed"
        want_texts = [texts[r] for r in want[i]]
        assert [norm(t) for t in got["negatives"]] == [norm(t) for t in want_texts], (
            f"pair {i}: negatives {got['negative_ids']} != brute force {[ids[r] for r in want[i]]}"
        )
        for t, id_ in zip(got["negatives"], got["negative_ids"], strict=True):
            # A passage stored twice (p10, p45, p46) is one negative, under whichever copy ranks first.
            assert texts[ids.index(id_)] == t and norm(t) != norm(row["answer"]), f"pair {i}: {id_} {t!r}"
    assert mined.stats.negatives == sum(len(w) for w in want)
    assert mined.stats.incomplete == sum(len(w) < cfg.num_negatives for w in want)


def between(values: list[float], lo: float, hi: float) -> float:
    """The midpoint of the widest gap between consecutive `values` inside (lo, hi): a threshold no score sits near."""
    v = sorted(x for x in values if lo < x < hi)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(v, v[1:], strict=False)]
    width, mid = max(gaps)
    assert width > 1e-5, f"no clear threshold in ({lo}, {hi})"
    return mid


def thresholds(setup) -> dict[str, float]:
    """Per filter, a value that cuts inside the default window of most pairs and lies far from every boundary."""
    _, index_dir, encoder, _, rows = setup
    emb, _, _, manifest = load_index(index_dir)
    q = encoder.encode_questions([r["question"] for r in rows], normalize=True).astype(np.float64)
    p = encoder.encode_passages([r["answer"] for r in rows], max_length=manifest["max_length"], normalize=True).astype(
        np.float64
    )
    scores = q @ emb.astype(np.float64).T
    pos = np.einsum("np,np->n", q, p)
    top = np.sort(scores, axis=1)[:, ::-1][:, :12]
    flat = sorted(top.ravel())
    median = flat[len(flat) // 2]
    return {
        "max_score": between(list(top.ravel()), median - 0.05, median + 0.05),
        "min_score": between(list(top.ravel()), median - 0.05, median + 0.05),
        "absolute_margin": between(list((pos[:, None] - top).ravel()), -0.1, 0.1),
        "relative_margin": between(list((1 - top / pos[:, None]).ravel()), 0.0, 0.5),
    }


@pytest.mark.parametrize(
    "case",
    [
        "default",
        "window",
        "window-short",
        "one",
        "max_score",
        "min_score",
        "absolute_margin",
        "relative_margin",
        "by-text-only",
        "deeper-search",
    ],
)
def test_filters_equal_brute_force(setup, case, monkeypatch):
    model_dir, index_dir, encoder, texts, rows = setup
    kwargs = {"positive_id_field": "pid"}
    if case == "window":
        kwargs.update(range_min=2, range_max=7, num_negatives=3)
    elif case == "window-short":
        kwargs.update(range_min=1, range_max=4, num_negatives=5)  # 3 in the window: every pair incomplete
    elif case == "one":
        kwargs.update(num_negatives=1)
    elif case in mining.FILTERS:
        kwargs.update({case: thresholds(setup)[case], "num_negatives": 4})
    elif case == "by-text-only":
        kwargs.update(positive_id_field=None)
    elif case == "deeper-search":
        monkeypatch.setattr(mining, "SLACK", 0)  # any positive or duplicate in the window forces a deeper search
        kwargs.update(range_max=12, num_negatives=12)
    cfg = MiningConfig(**kwargs)
    index = Index(index_dir, block_size=16)
    mined = mine_hard_negatives(index, encoder, rows, **kwargs)
    check_against_brute_force(setup, cfg, mined)
    if case in mining.FILTERS:
        unfiltered = mine_hard_negatives(
            index, encoder, rows, positive_id_field="pid", num_negatives=4, range_max=cfg.window_end
        )
        assert mined.stats.skipped.get(case, 0) > 0, f"{case} dropped nothing: the test would prove nothing"
        assert [r["negative_ids"] for r in mined.rows] != [r["negative_ids"] for r in unfiltered.rows]
    if case == "window-short":
        assert all(len(r["negatives"]) == 3 for r in mined.rows) and mined.stats.incomplete == len(rows)


def test_positives_and_duplicates_never_become_negatives(setup):
    _, index_dir, encoder, texts, rows = setup
    index = Index(index_dir)
    # Every passage is a candidate: what is missing was removed as a positive or as a repeated text.
    mined = mine_hard_negatives(
        index, encoder, rows, positive_id_field="pid", num_negatives=len(texts), range_max=len(texts)
    )
    distinct = {norm(t) for t in texts}
    for row, out in zip(rows, mined.rows, strict=True):
        got = [norm(t) for t in out["negatives"]]
        assert len(got) == len(set(got)), "a passage stored twice is one negative"
        assert norm(row["answer"]) not in got
        assert len(got) == len(distinct - {norm(row["answer"])})
    by_pid = {r.get("pid"): out for r, out in zip(rows, mined.rows, strict=True)}
    assert not {"p2", "p44"} & set(by_pid["p2"]["negative_ids"]), "p2 by id, its copy p44 by text"
    assert not {"p5", "p47"} & set(by_pid["p5"]["negative_ids"]), "p47 differs from the answer only in spacing"
    assert len([i for i in by_pid["p0"]["negative_ids"] if i in ("p10", "p45", "p46")]) == 1


def test_pair_with_an_id_but_another_text(setup):
    """The id alone removes a positive whose stored text differs from the row's answer (say, re-cleaned)."""
    _, index_dir, encoder, texts, _ = setup
    row = {"question": "why is the sky blue", "answer": "an older wording of passage 7", "pid": "p7"}
    mined = mine_hard_negatives(
        Index(index_dir), encoder, [row], positive_id_field="pid", num_negatives=len(texts), range_max=len(texts)
    )
    assert "p7" not in mined.rows[0]["negative_ids"]
    plain = mine_hard_negatives(Index(index_dir), encoder, [row], num_negatives=len(texts), range_max=len(texts))
    assert "p7" in plain.rows[0]["negative_ids"]


def write_pairs(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n\n")  # blank lines are skipped, as `train` skips them
    return str(path)


def test_mine_file_resumes_and_feeds_train(setup, tmp_path, monkeypatch):
    _, index_dir, encoder, _, rows = setup
    index = Index(index_dir)
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    cfg = MiningConfig(num_negatives=2, positive_id_field="pid", include_scores=True)
    whole = str(tmp_path / "whole.jsonl")
    stats = mine_file(index, encoder, pairs, whole, cfg, chunk_size=3, show_progress=False)
    assert not os.path.exists(whole + ".parts"), "the parts are removed once joined"
    assert stats.pairs == len(rows) and stats.with_positive_id == 6

    back = [json.loads(line) for line in open(whole)]
    assert [{k: r[k] for k in row} for r, row in zip(back, rows, strict=True)] == rows
    assert all(
        set(r) - set(row) == {"negatives", "negative_ids", "negative_scores", "positive_score"}
        for r, row in zip(back, rows, strict=True)
    )
    assert read_pairs(whole) == [
        (r["question"], r["answer"], tuple(m["negatives"])) for r, m in zip(rows, back, strict=True)
    ]
    direct = mine_hard_negatives(index, encoder, rows, num_negatives=2, positive_id_field="pid", include_scores=True)
    assert [r["negative_ids"] for r in back] == [r["negative_ids"] for r in direct.rows]

    # Killed after two of three parts: the rerun mines only the third, and writes the same bytes.
    written = []
    real_write = mining._write_part

    def write_then_die(parts, i, part_rows, part_stats):
        real_write(parts, i, part_rows, part_stats)
        written.append(i)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(mining, "_write_part", write_then_die)
    out = str(tmp_path / "resumed.jsonl")
    with pytest.raises(KeyboardInterrupt):
        mine_file(index, encoder, pairs, out, cfg, chunk_size=3, show_progress=False)
    assert not os.path.exists(out) and sorted(os.listdir(out + ".parts")) == [
        "part-00000.jsonl",
        "part-00000.stats.json",
        "part-00001.jsonl",
        "part-00001.stats.json",
        "settings.json",
    ]
    with pytest.raises(ValueError, match="other settings .*num_negatives"):
        mine_file(index, encoder, pairs, out, MiningConfig(num_negatives=3), chunk_size=3, show_progress=False)
    written.clear()
    resumed = mine_file(index, encoder, pairs, out, cfg, chunk_size=3, show_progress=False)
    assert written == [2], f"parts rewritten: {written}"
    assert open(out, "rb").read() == open(whole, "rb").read()
    assert resumed == stats
    # The same job again finds itself done (issue 22: a finished job's rerun answers alike in every command); another
    # job is refused the existing output.
    again = mine_file(index, encoder, pairs, out, cfg, chunk_size=3, show_progress=False)
    assert again.already_complete and dataclasses.replace(again, already_complete=False) == stats
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        mine_file(index, encoder, pairs, out, cfg, chunk_size=4, show_progress=False)


def test_incomplete_pairs_kept_or_dropped(setup, tmp_path):
    _, index_dir, encoder, _, rows = setup
    index = Index(index_dir)
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    cfg = MiningConfig(num_negatives=3, max_score=thresholds(setup)["max_score"], range_max=5)
    kept = mine_file(index, encoder, pairs, str(tmp_path / "kept.jsonl"), cfg, show_progress=False)
    full = [json.loads(line) for line in open(tmp_path / "kept.jsonl")]
    short = [len(r["negatives"]) < 3 for r in full]
    assert len(full) == len(rows) and kept.incomplete == sum(short) and 0 < sum(short) < len(rows)
    dropped = mine_file(
        index, encoder, pairs, str(tmp_path / "dropped.jsonl"), cfg, drop_incomplete=True, show_progress=False
    )
    assert dropped.dropped == sum(short)
    assert [json.loads(line) for line in open(tmp_path / "dropped.jsonl")] == [
        r for r, s in zip(full, short, strict=True) if not s
    ]


def test_index_without_texts_is_refused(setup, tmp_path, capsys):
    model_dir, index_dir, encoder, _, rows = setup
    bare = str(tmp_path / "bare")
    shutil.copytree(index_dir, bare)
    with open(os.path.join(bare, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["has_text"] = False
    with open(os.path.join(bare, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    for name in os.listdir(bare):
        if name.startswith("texts-"):
            os.remove(os.path.join(bare, name))
    with pytest.raises(ValueError, match="--store-text"):
        mine_hard_negatives(Index(bare), encoder, rows)
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    assert cli.main(["mine", bare, model_dir, pairs, str(tmp_path / "out.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retribert-jax mine: error: ") and "--store-text" in err and "\n" not in err


def test_cli(setup, tmp_path, capsys):
    model_dir, index_dir, encoder, _, rows = setup
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    out = str(tmp_path / "mined.jsonl")
    argv = [
        "mine",
        index_dir,
        model_dir,
        pairs,
        out,
        "--positive-id-field",
        "pid",
        "-n",
        "2",
        "--range-min",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"wrote {out}: {len(rows)} pairs" in capsys.readouterr().err
    direct = mine_hard_negatives(Index(index_dir), encoder, rows, num_negatives=2, range_min=1, positive_id_field="pid")
    assert [json.loads(line) for line in open(out)] == direct.rows
    # A rerun of the same job finds it done, as `embed` and `train` do; another job is refused the existing OUT.
    assert cli.main(argv) == 0
    assert f"{out}: already complete ({len(rows)} pairs, " in capsys.readouterr().err
    assert cli.main([*argv, "--range-max", "9"]) == 2
    assert "already exists (pass --overwrite, or overwrite=True, to replace it)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    assert cli.main(["mine", index_dir, model_dir, str(bad), str(tmp_path / "x.jsonl"), "--no-progress"]) == 2
    assert f"{bad}:2: field 'answer' must be a string (missing)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# A question written on several rows, one per positive (sentence-transformers' format for multiple positives)


def multi_positive_rows(texts: list[str]) -> list[dict]:
    """Two questions on three rows each (one row of each without its id, one spelled with other spacing), and a
    question asked once."""
    q1, q2 = " ".join(texts[3].split()[:4]), " ".join(texts[20].split()[:4])
    return [
        {"question": q1, "answer": texts[3], "pid": "p3"},
        {"question": q2, "answer": texts[20], "pid": "p20"},
        {"question": "  " + q1.replace(" ", "\n", 1), "answer": texts[8], "pid": "p8"},
        {"question": "why does bread rise", "answer": texts[30], "pid": "p30"},
        {"question": q1, "answer": texts[12]},
        {"question": q2, "answer": texts[25], "pid": "p25"},
        {"question": q2, "answer": texts[33]},
    ]


def brute_force_grouped(setup, rows: list[dict], cfg: MiningConfig, *, grouped: bool = True) -> list[list[int]]:
    """sentence-transformers' rules for several positives, written out: the rows of one question (whitespace aside)
    share its positives, none of which is a negative, and the margins compare with the lowest positive score."""
    _, index_dir, encoder, _, _ = setup
    emb, ids, texts, manifest = load_index(index_dir)
    q = encoder.encode_questions([r["question"] for r in rows], normalize=True).astype(np.float64)
    p = encoder.encode_passages([r["answer"] for r in rows], max_length=manifest["max_length"], normalize=True).astype(
        np.float64
    )
    scores = q @ emb.astype(np.float64).T
    out = []
    for i, row in enumerate(rows):
        group = [j for j, r in enumerate(rows) if norm(r["question"]) == norm(row["question"])] if grouped else [i]
        pos = min(float(q[i] @ p[j]) for j in group)
        pids = {rows[j]["pid"] for j in group if "pid" in rows[j]}
        seen, cands = {norm(rows[j]["answer"]) for j in group}, []
        for r in np.argsort(-scores[i], kind="stable"):
            if norm(texts[r]) in seen or ids[r] in pids:
                continue
            seen.add(norm(texts[r]))
            cands.append(int(r))
        window = cands[cfg.range_min : cfg.window_end]
        out.append([r for r in window if passes(cfg, scores[i, r], pos)][: cfg.num_negatives])
    return out


def test_a_questions_other_positives_are_never_its_negatives(setup, tmp_path):
    _, index_dir, encoder, texts, _ = setup
    _, ids, stored, _ = load_index(index_dir)
    rows = multi_positive_rows(texts)
    index = Index(index_dir)
    everything = {"num_negatives": len(texts), "range_max": len(texts), "positive_id_field": "pid"}
    mined = mine_hard_negatives(index, encoder, rows, **everything)
    want = brute_force_grouped(setup, rows, MiningConfig(**everything))
    for i, (row, got) in enumerate(zip(rows, mined.rows, strict=True)):
        assert [norm(t) for t in got["negatives"]] == [norm(stored[r]) for r in want[i]], f"row {i}"
        group = [r for r in rows if norm(r["question"]) == norm(row["question"])]
        assert not {norm(r["answer"]) for r in group} & {norm(t) for t in got["negatives"]}, (
            f"row {i}: a positive of its own question mined as a negative"
        )
    assert mined.rows[0]["negative_ids"] == mined.rows[2]["negative_ids"] == mined.rows[4]["negative_ids"]

    # The margins compare with the question's lowest positive score: a threshold that makes a difference.
    emb, _, _, manifest = load_index(index_dir)
    q = encoder.encode_questions([r["question"] for r in rows], normalize=True).astype(np.float64)
    p = encoder.encode_passages([r["answer"] for r in rows], max_length=manifest["max_length"], normalize=True).astype(
        np.float64
    )
    lowest = np.array(
        [
            min(q[i] @ p[j] for j, s in enumerate(rows) if norm(s["question"]) == norm(r["question"]))
            for i, r in enumerate(rows)
        ]
    )
    top = np.sort(q @ emb.astype(np.float64).T, axis=1)[:, ::-1][:, :12]
    cfg = MiningConfig(
        num_negatives=4,
        positive_id_field="pid",
        absolute_margin=between(list((lowest[:, None] - top).ravel()), -0.1, 0.1),
    )
    want = brute_force_grouped(setup, rows, cfg)
    assert want != brute_force_grouped(setup, rows, cfg, grouped=False), "the case must bite"
    mined = mine_hard_negatives(
        index,
        encoder,
        rows,
        num_negatives=4,
        positive_id_field="pid",
        absolute_margin=cfg.absolute_margin,
        include_scores=True,
    )
    assert [[norm(t) for t in r["negatives"]] for r in mined.rows] == [[norm(stored[r]) for r in w] for w in want]
    assert [round(r["positive_score"], 5) for r in mined.rows] == [
        round(float(q[i] @ p[i]), 5) for i in range(len(rows))
    ]

    # A file mined in chunks that split the questions' rows gives the same rows.
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    out = str(tmp_path / "mined.jsonl")
    mine_file(index, encoder, pairs, out, cfg, chunk_size=2, show_progress=False)
    assert [json.loads(line)["negative_ids"] for line in open(out)] == [r["negative_ids"] for r in mined.rows]


@pytest.mark.parametrize("field", ["min_score", "max_score", "absolute_margin", "relative_margin"])
def test_non_finite_filter_bounds_are_refused(field):
    """`--min-score nan` passed every check and then filtered nothing."""
    from retribert_jax.mining import MiningConfig

    with pytest.raises(ValueError, match=rf"{field} must be a finite number, got nan"):
        MiningConfig(**{field: float("nan")})


def test_an_empty_pairs_file_is_refused_and_leaves_nothing_behind(setup, tmp_path):
    """`mine` of an empty pairs file was refused, but left OUT.parts/ (its settings alone) beside OUT."""
    _, index_dir, encoder, _, _ = setup
    pairs = tmp_path / "empty.jsonl"
    pairs.write_text("\n")
    out = tmp_path / "mined.jsonl"
    with pytest.raises(ValueError, match=r"empty\.jsonl: no question/answer pairs"):
        mine_file(Index(index_dir), encoder, str(pairs), str(out), MiningConfig(num_negatives=2), show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]
