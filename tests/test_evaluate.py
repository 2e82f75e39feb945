"""`retribert-jax evaluate`: measures against trec_eval's definitions, the input formats, the run file, the CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest

from retribert_jax import cli
from retribert_jax.evaluation import (
    compute_metrics,
    parse_metrics,
    read_qrels,
    read_queries,
    write_trec_run,
)
from retribert_jax.search import Hit
from tests.embed_helpers import random_texts, tiny_model_dir

irm = pytest.importorskip("ir_measures")

# ----------------------------------------------------------------------------------------------------------------
# The definitions, written out (trec_eval's for R@k and nDCG@k; MS MARCO's for RR@k, which ir-measures uses)


def trec_eval_order(hits: list[Hit]) -> list[str]:
    """trec_eval ranks by score, descending, and breaks ties by doc id, descending (it ignores the run's ranks)."""
    by_id = sorted(hits, key=lambda h: str(h.id), reverse=True)
    return [str(h.id) for h in sorted(by_id, key=lambda h: -h.score)]


def msmarco_order(hits: list[Hit]) -> list[str]:
    """MS MARCO's evaluation script ranks by score, descending, and breaks ties by doc id, ascending."""
    return [str(h.id) for h in sorted(hits, key=lambda h: (-h.score, str(h.id)))]


def recall_at(ranking: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r >= 1}
    return len(set(ranking[:k]) & relevant) / len(relevant) if relevant else 0.0


def rr_at(ranking: list[str], rels: dict[str, int], k: int) -> float:
    return next((1.0 / rank for rank, d in enumerate(ranking[:k], 1) if rels.get(d, 0) >= 1), 0.0)


def ndcg_at(ranking: list[str], rels: dict[str, int], k: int) -> float:
    """trec_eval's ndcg_cut: gain = relevance, discount log2(rank + 1), ideal = the qrels' gains sorted."""
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(rank + 1) for rank, d in enumerate(ranking[:k], 1))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def expected(hits: list[Hit], rels: dict[str, int]) -> dict[str, float]:
    trec, ms = trec_eval_order(hits), msmarco_order(hits)
    out = {f"R@{k}": recall_at(trec, rels, k) for k in (1, 3, 5, 10, 100)}
    out["RR@10"] = rr_at(ms, rels, 10)
    out["nDCG@3"] = ndcg_at(trec, rels, 3)
    out["nDCG@10"] = ndcg_at(trec, rels, 10)
    return out


def hits_of(*pairs) -> list[Hit]:
    return [Hit(id=d, score=s) for d, s in pairs]


def test_measures_equal_trec_eval_definitions():
    filler = [(f"f{i:02d}", 0.8 - 0.01 * i) for i in range(9)]
    run = {
        # graded relevance; an int id (7) matched by the qrels' "7"; one relevant doc ("d4") never retrieved
        "graded": hits_of(("d1", 0.9), *filler[:2], (7, 0.7), ("d3", 0.6), ("d2", 0.5), *filler[2:]),
        # the only relevant passage at rank 12: RR@10 = R@10 = 0, R@100 = 1
        "late": hits_of(*filler, ("x1", 0.05), ("x2", 0.04), ("rel", 0.03)),
        # ties: trec_eval reads c, b, a after x; MS MARCO's RR reads a, b, c
        "ties": hits_of(("x", 0.9), ("a", 0.5), ("b", 0.5), ("c", 0.5)),
        # judged, nothing relevant: 0 everywhere, and counted
        "nonrel": hits_of(("n1", 0.3), ("n2", 0.2)),
        # no qrels: not counted
        "unjudged": hits_of(("d1", 1.0)),
    }
    qrels = {
        "graded": {"d1": 2, "d2": 1, "d3": 0, "7": 3, "d4": 1},
        "late": {"rel": 1, "x1": 0},
        "ties": {"a": 1, "c": 0},
        "nonrel": {"n1": 0},
        "absent": {"d1": 1},
    }
    names = ["R@1", "R@3", "R@5", "R@10", "R@100", "RR@10", "nDCG@3", "nDCG@10"]
    aggregate, per_query = compute_metrics(run, qrels, names)
    judged = ["graded", "late", "ties", "nonrel"]
    assert list(per_query) == judged, "only queries in both the run and the qrels count (trec_eval's default)"
    want = {q: expected(run[q], qrels[q]) for q in judged}
    # The cases must bite: a tie order, a late relevant, graded gains.
    assert want["ties"]["RR@10"] == 0.5 and want["ties"]["R@3"] == 0.0
    assert want["late"]["RR@10"] == 0.0 and want["late"]["R@100"] == 1.0
    assert 0 < want["graded"]["nDCG@10"] < 1
    for q in judged:
        for name in names:
            got = per_query[q][name]
            assert abs(got - want[q][name]) < 1e-9, (
                f"query {q!r} {name}: ir-measures {got} != definition {want[q][name]}"
            )
    for name in names:
        mean = sum(want[q][name] for q in judged) / len(judged)
        assert abs(aggregate[name] - mean) < 1e-9, f"{name}: aggregate {aggregate[name]} != mean {mean}"


def test_empty_judgment_sets_are_skipped_as_pytrec_eval_does():
    """A query mapped to no judgments (what dropping relevance-0 lines leaves) is not scored; one whose judgments are
    all 0 is scored 0. Expected values: pytrec_eval averaged over the queries it returns, as BEIR averages."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run = {
        "q1": hits_of(("d1", 0.9), ("x", 0.5)),
        "q2": hits_of(("d2", 0.9)),
        "q3": hits_of(("x", 0.9), ("d3", 0.5)),
        "q4": hits_of(("n", 0.9)),
    }
    qrels = {"q1": {"d1": 1}, "q2": {}, "q3": {"d3": 1, "d9": 1}, "q4": {"n": 0}}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"recall.5", "ndcg_cut.10"}).evaluate(
        {q: {str(h.id): h.score for h in hits} for q, hits in run.items()}
    )
    aggregate, per_query = compute_metrics(run, qrels, ["R@5", "nDCG@10"])
    assert sorted(per_query) == sorted(theirs) == ["q1", "q3", "q4"], "q2 is skipped, q4 (all zeros) is judged"
    for ours, key in (("R@5", "recall_5"), ("nDCG@10", "ndcg_cut_10")):
        want = sum(v[key] for v in theirs.values()) / len(theirs)
        assert abs(aggregate[ours] - want) < 1e-12, f"{ours}: ours {aggregate[ours]}, pytrec_eval's mean {want}"
    with pytest.raises(ValueError, match="no query of the run has judgments"):
        compute_metrics({"q2": run["q2"]}, qrels, ["R@5"])


def test_duplicate_doc_in_a_query_is_refused():
    with pytest.raises(ValueError, match="retrieved twice"):
        compute_metrics({"q": hits_of((7, 0.9), ("7", 0.8))}, {"q": {"7": 1}}, ["R@10"])


def test_parse_metrics():
    assert [str(m) for m in parse_metrics(None, 100)] == ["R@1", "R@5", "R@10", "R@100", "RR@10", "nDCG@10"]
    assert "R@100" not in [str(m) for m in parse_metrics(None, 10)], "defaults above the depth are left out"
    assert [str(m) for m in parse_metrics(["MRR@10", "RR@10", "AP"], 10)] == ["RR@10", "AP"]
    with pytest.raises(ValueError, match="depth is 10"):
        parse_metrics(["R@100"], 10)
    with pytest.raises(ValueError, match="unknown measure 'Recall_at_ten'"):
        parse_metrics(["Recall_at_ten"], 10)


# ----------------------------------------------------------------------------------------------------------------
# Input formats


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_qrels_trec_and_beir_read_the_same(tmp_path):
    trec = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2 2\n\nq2\tQ0\td1\t0\n")
    beir = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td1\t0\n")
    want = {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}}
    assert read_qrels(trec) == want
    assert read_qrels(beir) == want


def test_byte_order_mark_and_crlf_are_not_data(tmp_path):
    """Files saved by Excel or Notepad: a UTF-8 BOM and CRLF line ends. The qrels must read as ir-measures reads the
    same judgments without them; the queries as without them."""
    bom = "\ufeff"
    trec = "q1 0 d1 1\r\nq1 0 d2 2\r\nq2 0 d1 0\r\n"
    clean = write(tmp_path / "clean.txt", trec.replace("\r", ""))
    want = {}
    for q in irm.read_trec_qrels(clean):
        want.setdefault(q.query_id, {})[q.doc_id] = q.relevance
    assert read_qrels(write(tmp_path / "bom.txt", bom + trec)) == want
    beir = (
        bom
        + "query-id\tcorpus-id\tscore\r\n"
        + "".join("\t".join(ln.split()[i] for i in (0, 2, 3)) + "\r\n" for ln in trec.splitlines())
    )
    assert read_qrels(write(tmp_path / "bom.tsv", beir)) == want
    queries = {"q1": "why is the sky blue", "q2": "does ice float"}
    files = {
        "beir.jsonl": "".join(json.dumps({"_id": q, "text": t}) + "\r\n" for q, t in queries.items()),
        "header.tsv": "qid\tquery\r\n" + "".join(f"{q}\t{t}\r\n" for q, t in queries.items()),
        "plain.tsv": "".join(f"{q}\t{t}\r\n" for q, t in queries.items()),
    }
    for name, text in files.items():
        assert read_queries(write(tmp_path / name, bom + text)) == queries, name


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("qrels.txt", "q1 0 d1 1\nq1 d2 1\n", r"qrels.txt:2: 3 fields, expected 4"),
        ("qrels.txt", "q1 0 d1 yes\n", r"qrels.txt:1: relevance 'yes' is not an integer"),
        ("qrels.txt", "q1 0 d1 1\nq2 0 d1 1\nq1 0 d1 2\n", r"qrels.txt:3: .*judged again \(first on line 1\)"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", r"qrels.tsv:2: 2 tab-separated fields, expected 3"),
        ("qrels.txt", "\n\n", r"no judgments"),
    ],
)
def test_qrels_errors_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        read_qrels(write(tmp_path / name, text))


def test_queries_formats(tmp_path):
    want = {"1": "why is the sky blue", "q2": "does ice float"}
    files = {
        "id.jsonl": '{"id": 1, "text": "why is the sky blue"}\n{"id": "q2", "text": "does ice float"}\n',
        "beir.jsonl": '{"_id": "1", "text": "why is the sky blue", "metadata": {}}\n'
        '{"_id": "q2", "text": "does ice float"}\n',
        "header.tsv": "qid\tquery\n1\twhy is the sky blue\nq2\tdoes ice float\n",
        "plain.tsv": "1\twhy is the sky blue\nq2\tdoes ice float\n\n",
        "sniffed.queries": '{"id": 1, "text": "why is the sky blue"}\n{"id": "q2", "text": "does ice float"}\n',
    }
    for name, text in files.items():
        assert read_queries(write(tmp_path / name, text)) == want, name


@pytest.mark.parametrize(
    "name,text,message",
    [
        (
            "q.jsonl",
            '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n',
            r"q.jsonl:3: query id 'a' again \(first on line 1\)",
        ),
        ("q.tsv", "a\tx\nb y\n", r"q.tsv:2: expected 'id<TAB>text', got no tab"),
        ("q.jsonl", '{"id": "a", "text": "x"}\n{"id": "b"}\n', r"q.jsonl:2: missing text field 'text'"),
    ],
)
def test_queries_errors_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        read_queries(write(tmp_path / name, text))


def test_run_file_round_trips(tmp_path):
    run = {"q1": hits_of(("d1", 0.1 + 0.2), (3, -1.5e-7)), "q2": hits_of(("d2", 1 / 3))}
    path = str(tmp_path / "run.txt")
    write_trec_run(path, run, tag="mine")
    back = list(irm.read_trec_run(path))
    assert back == [
        irm.ScoredDoc("q1", "d1", 0.1 + 0.2),
        irm.ScoredDoc("q1", "3", -1.5e-7),
        irm.ScoredDoc("q2", "d2", 1 / 3),
    ], "scores are written so that they read back exactly"
    assert [ln.split()[3] for ln in open(path)] == ["1", "2", "1"]
    with pytest.raises(ValueError, match="holds whitespace"):
        write_trec_run(path, {"q1": hits_of(("doc one", 1.0))})


# ----------------------------------------------------------------------------------------------------------------
# End to end: embed a tiny corpus, evaluate through the CLI, check against ir-measures on the written run


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = tiny_model_dir(str(root / "model"))
    texts = [f"{t} passage {i}" for i, t in enumerate(random_texts(48, seed=11))]
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
                "--no-progress",
            ]
        )
        == 0
    )
    return model_dir, index_dir, texts


def test_end_to_end_equals_ir_measures_on_the_run_file(tiny_index, tmp_path, capsys):
    model_dir, index_dir, texts = tiny_index
    queries = write(
        tmp_path / "queries.jsonl",
        "".join(json.dumps({"_id": f"q{i}", "text": " ".join(texts[3 * i].split()[:6])}) + "\n" for i in range(8)),
    )
    # Graded judgments for q0..q6; q7 has none and is skipped.
    lines = [f"q{i} 0 p{(3 * i + j) % 48} {rel}" for i in range(7) for j, rel in enumerate((2, 1, 0, 1))]
    qrels = write(tmp_path / "qrels.txt", "\n".join(lines) + "\n")
    out, run_file = str(tmp_path / "metrics.json"), str(tmp_path / "run.txt")
    rc = cli.main(
        [
            "evaluate",
            index_dir,
            model_dir,
            queries,
            qrels,
            "-k",
            "20",
            "--metrics",
            "R@1",
            "R@5",
            "R@10",
            "RR@10",
            "nDCG@10",
            "AP",
            "--output",
            out,
            "--run-file",
            run_file,
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "7 queries with qrels evaluated" in printed and "1 queries without qrels skipped" in printed
    report = json.loads(open(out).read())

    run = list(irm.read_trec_run(run_file))
    assert sorted({d.query_id for d in run}) == [f"q{i}" for i in range(7)], "the run holds the judged queries"
    assert all(sum(d.query_id == f"q{i}" for d in run) == 20 for i in range(7)), "depth 20 per query"
    measures = [irm.parse_measure(m) for m in report["metrics"]]
    theirs = irm.calc_aggregate(measures, irm.read_trec_qrels(qrels), run)
    for m in measures:
        assert abs(report["metrics"][str(m)] - theirs[m]) < 1e-12, (
            f"{m}: ours {report['metrics'][str(m)]} != ir-measures on the run file {theirs[m]}"
        )
    assert report["num_queries"] == 7 and report["skipped_queries"] == 1 and report["depth"] == 20

    # The same qrels as BEIR's TSV give the same numbers.
    beir = write(
        tmp_path / "qrels.tsv",
        "query-id\tcorpus-id\tscore\n" + "".join("\t".join(ln.split()[i] for i in (0, 2, 3)) + "\n" for ln in lines),
    )
    rc = cli.main(
        [
            "evaluate",
            index_dir,
            model_dir,
            queries,
            beir,
            "-k",
            "20",
            "--metrics",
            *report["metrics"],
            "--output",
            str(tmp_path / "beir.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert json.loads(open(tmp_path / "beir.json").read())["metrics"] == report["metrics"]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_index):
    from retribert_jax import Encoder, Index, RetriBertModel, RetriBertTokenizer

    model_dir, index_dir, _ = tiny_index
    return Index(index_dir), Encoder(
        RetriBertModel.from_pretrained(model_dir), RetriBertTokenizer.from_pretrained(model_dir)
    )


def test_evaluate_skips_queries_with_empty_judgments(tiny_index, tiny_encoder):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from retribert_jax.evaluation import evaluate

    _, _, texts = tiny_index
    index, encoder = tiny_encoder
    queries = {f"q{i}": texts[i] for i in range(4)}
    qrels = {"q0": {"p0": 1, "p9": 1}, "q1": {}, "q2": {"p2": 0}, "q3": {"p3": 2}}
    result = evaluate(index, encoder, queries, qrels, depth=10, metrics=["R@5", "nDCG@10"])
    assert result.skipped_queries == ["q1"] and list(result.run) == ["q0", "q2", "q3"]
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"recall.5", "ndcg_cut.10"}).evaluate(
        {q: {str(h.id): h.score for h in hits} for q, hits in result.run.items()}
    )
    assert sorted(theirs) == ["q0", "q2", "q3"]
    for ours, key in (("R@5", "recall_5"), ("nDCG@10", "ndcg_cut_10")):
        want = sum(v[key] for v in theirs.values()) / len(theirs)
        assert abs(result.metrics[ours] - want) < 1e-12, f"{ours}: ours {result.metrics[ours]}, pytrec_eval {want}"


def test_qrels_ids_not_in_the_index_are_counted_and_none_is_refused(tiny_index, tmp_path, capsys):
    """A BEIR corpus embedded without --id-field _id has ids 0, 1, ... that no qrels line names: every measure is 0.
    evaluate reports how many judged documents the index holds, and refuses when it holds none."""
    model_dir, index_dir, texts = tiny_index
    queries = write(tmp_path / "q.tsv", "".join(f"q{i}\t{texts[i]}\n" for i in range(3)))
    none = write(tmp_path / "none.txt", "q0 0 doc-0 1\nq1 0 doc-1 1\nq2 0 doc-2 0\n")
    rc = cli.main(["evaluate", index_dir, model_dir, queries, none, "-k", "5", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{index_dir}: none of the 3 documents judged for the 3 queries is in the index" in err, err
    some = write(tmp_path / "some.txt", "q0 0 p0 1\nq0 0 doc-0 1\nq1 0 p1 1\nq2 0 doc-2 0\n")
    assert cli.main(["evaluate", index_dir, model_dir, queries, some, "-k", "5", "--no-progress"]) == 0
    assert "3 queries with qrels evaluated" in capsys.readouterr().out
    out = tmp_path / "m.json"
    assert (
        cli.main(["evaluate", index_dir, model_dir, queries, some, "-k", "5", "--no-progress", "--output", str(out)])
        == 0
    )
    assert "2 of their 4 judged documents in the index" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["judged_documents"], report["judged_documents_in_index"]) == (4, 2)


def test_an_index_with_a_repeated_id_is_refused_at_every_depth(tiny_encoder, tmp_path):
    """An index written before embed refused repeated ids: evaluate passed at -k 1 and failed at -k 5."""
    import numpy as np

    from retribert_jax import Index
    from retribert_jax.evaluation import evaluate
    from tests.test_search import write_index

    _, encoder = tiny_encoder
    cfg = encoder.config
    emb = np.random.default_rng(0).standard_normal((6, cfg.projection_dim)).astype(np.float32)
    d = write_index(tmp_path / "dup", emb, 4, ids=["d0", 1, "d2", "1", "d4", "d5"], config_hash=cfg.architecture_hash())
    for depth in (1, 5):
        with pytest.raises(ValueError, match=r"dup: id '1' is on rows 1 and 3"):
            evaluate(Index(d), encoder, {"q": "why"}, {"q": {"d0": 1}}, depth=depth, metrics=["R@1"])


def test_ignore_identical_ids_follows_beir(tiny_index, tiny_encoder, tmp_path, capsys):
    """BEIR's rule, from its source: `DenseRetrievalExactSearch.search` takes the top `top_k + 1` by score, skips a
    hit whose corpus id equals the query id and keeps `top_k`; `EvaluateRetrieval.evaluate(ignore_identical_ids=
    True)` pops any left, leaves the qrels alone, and averages pytrec_eval's values over the queries it returns."""
    import numpy as np

    pytrec_eval = pytest.importorskip("pytrec_eval")
    from retribert_jax.evaluation import evaluate

    model_dir, index_dir, texts = tiny_index
    index, encoder = tiny_encoder
    # Queries that are also documents under the same id (Quora, ArguAna).
    queries = {f"p{i}": texts[i] for i in range(6)}
    qrels = {f"p{i}": {f"p{(i + 1) % 48}": 1, f"p{(i + 7) % 48}": 2, f"p{i}": 1} for i in range(6)}
    depth = 10
    q = encoder.encode_questions(list(queries.values()))
    docs = np.concatenate([np.asarray(s, np.float32) for s in index.shards])
    ids = list(index.iter_ids())
    scores = q @ docs.T
    beir, identical = {}, 0
    for qid, row in zip(queries, scores, strict=True):
        top = np.argsort(-row, kind="stable")[: depth + 1]
        identical += qid in [ids[r] for r in top[:depth]]
        beir[qid] = {ids[r]: float(row[r]) for r in top if ids[r] != qid}
        beir[qid] = dict(sorted(beir[qid].items(), key=lambda kv: -kv[1])[:depth])
    assert all(qid not in beir[qid] for qid in beir) and all(len(v) == depth for v in beir.values())
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"recall.5", "ndcg_cut.10"}).evaluate(beir)

    ours = evaluate(index, encoder, queries, qrels, depth=depth, metrics=["R@5", "nDCG@10"], ignore_identical_ids=True)
    assert {qid: [str(h.id) for h in hits] for qid, hits in ours.run.items()} == {
        qid: list(v) for qid, v in beir.items()
    }, "the run differs from BEIR's"
    for name, key in (("R@5", "recall_5"), ("nDCG@10", "ndcg_cut_10")):
        want = sum(v[key] for v in theirs.values()) / len(theirs)
        assert abs(ours.metrics[name] - want) < 1e-12, f"{name}: ours {ours.metrics[name]}, BEIR's rule {want}"
    assert identical >= 1, "the case must bite: some query retrieves itself within the depth"
    assert ours.identical_ids == identical
    kept = evaluate(index, encoder, queries, qrels, depth=depth, metrics=["R@5", "nDCG@10"])
    assert sum(qid in [str(h.id) for h in hits] for qid, hits in kept.run.items()) == identical, (
        "by default (trec_eval's rule) the hit is kept"
    )
    assert kept.identical_ids == identical and kept.metrics["nDCG@10"] != ours.metrics["nDCG@10"]

    qfile = write(tmp_path / "q.tsv", "".join(f"{k}\t{v}\n" for k, v in queries.items()))
    qrels_file = write(
        tmp_path / "qrels.txt", "".join(f"{k} 0 {d} {r}\n" for k, v in qrels.items() for d, r in v.items())
    )
    for flag, word in (([], "kept; BEIR drops them"), (["--ignore-identical-ids"], "dropped")):
        assert cli.main(["evaluate", index_dir, model_dir, qfile, qrels_file, "-k", "10", "--no-progress", *flag]) == 0
        assert f"{identical} queries retrieved a document under their own id: {word}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# The CLI's errors: one line, exit status 2, before any model is loaded


def one_line_error(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit status {rc}, stderr: {err}"
    assert err.startswith("retribert-jax evaluate: error: ") and "\n" not in err, f"not one line: {err!r}"
    return err


def test_cli_errors(tmp_path, capsys):
    queries = write(tmp_path / "q.tsv", "q1\twhy\n")
    qrels = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2\n")
    err = one_line_error(capsys, ["evaluate", "idx", "model", queries, qrels])
    assert f"{qrels}:2: 3 fields, expected 4" in err
    err = one_line_error(capsys, ["evaluate", "idx", "model", str(tmp_path / "nope.jsonl"), qrels])
    assert "nope.jsonl: no such queries file" in err
    err = one_line_error(capsys, ["evaluate", "idx", "model", queries, str(tmp_path / "nope.txt")])
    assert "nope.txt: no such qrels file" in err


def test_cli_without_ir_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ir_measures", None)  # makes `import ir_measures` raise ImportError
    err = one_line_error(capsys, ["evaluate", "idx", "model", "q.tsv", "qrels.txt"])
    assert "pip install 'retribert_jax[eval]'" in err
