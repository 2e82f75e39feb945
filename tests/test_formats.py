"""The formats users come from: corpora as CSV, headerless TSV and BEIR (title joined to the text), and training
pairs in Tevatron's and sentence-transformers' shapes, from JSONL, CSV, TSV and parquet, or by named fields."""

from __future__ import annotations

import csv
import json

import pytest

from retribert_jax.corpus import read_corpus, with_title
from retribert_jax.pairs import Pair, PairFields, read_pair_rows, read_pairs

ROWS = [
    {"_id": "d1", "title": "Sky", "text": "Air scatters blue light, more than red."},
    {"_id": "d2", "title": "", "text": '  Yeast makes "bread" rise.\n(Ferments sugars.)'},
    {"_id": "d3", "title": "Ice", "text": "Ice floats, being less dense."},
]


def beir_text(row: dict) -> str:
    """BEIR's `SentenceBERT.encode_corpus` (sep " ") and sentence-transformers' BEIR evaluator: title + sep + text,
    stripped."""
    return (row["title"] + " " + row["text"]).strip()


def test_beir_jsonl_joins_the_title_as_beir_does(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    got = [(r.id, r.text) for r in read_corpus(str(path), id_field="_id", title_field="title")]
    assert got == [(r["_id"], beir_text(r)) for r in ROWS]
    untitled = [r.text for r in read_corpus(str(path), id_field="_id")]
    assert untitled == [r["text"] for r in ROWS], "without a title field the text is as stored"
    assert with_title(None, " x ") == " x " and with_title(3, " x") == " x", "only a string title joins"


def test_csv_reads_as_pythons_csv_module_does(tmp_path):
    """Quoted fields with commas, quotes and line ends, a byte-order mark; a record's number is its first line."""
    path = tmp_path / "corpus.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, ["_id", "title", "text"])
        w.writeheader()
        w.writerows(ROWS)
    got = list(read_corpus(str(path), id_field="_id", title_field="title"))
    assert [(r.id, r.text) for r in got] == [(r["_id"], beir_text(r)) for r in ROWS]
    assert [r.line for r in got] == [2, 3, 5], "record numbers are the lines they start on"
    with pytest.raises(ValueError, match=r"corpus.csv:1: the header has no column 'body'"):
        list(read_corpus(str(path), text_field="body"))


def test_tsv_without_header_reads_as_evaluate_reads_queries(tmp_path):
    """MS MARCO's collection.tsv and `evaluate`'s queries: id<TAB>text, no header; ids from the first column."""
    path = tmp_path / "collection.tsv"
    path.write_text("0\tThe sky is blue.\n7\tBread rises.\n", encoding="utf-8")
    assert [(r.id, r.text) for r in read_corpus(str(path))] == [("0", "The sky is blue."), ("7", "Bread rises.")]
    from retribert_jax.evaluation import read_queries

    assert read_queries(str(path)) == {"0": "The sky is blue.", "7": "Bread rises."}
    headed = tmp_path / "headed.tsv"
    headed.write_text("id\ttitle\ttext\n1\tSky\tblue\n", encoding="utf-8")
    assert [(r.id, r.text) for r in read_corpus(str(headed), id_field="id", title_field="title")] == [("1", "Sky blue")]


def test_embed_reads_csv_and_beir_titles(tmp_path):
    """The command line: a BEIR corpus embedded with its titles, as the reader joins them."""
    import numpy as np

    from retribert_jax import cli
    from tests.embed_helpers import tiny_model_dir

    model = tiny_model_dir(str(tmp_path / "model"))
    rows = [{"_id": f"d{i}", "title": "why" if i % 2 else "", "text": f"the sky is blue {i}"} for i in range(6)]
    path = tmp_path / "corpus.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["_id", "title", "text"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "idx"
    assert (
        cli.main(
            [
                "embed",
                model,
                str(path),
                str(out),
                "--kind",
                "passages",
                "--id-field",
                "_id",
                "--store-text",
                "--no-progress",
            ]
        )
        == 0
    )
    texts = [json.loads(line) for line in open(out / "texts-00000.jsonl", encoding="utf-8")]
    assert texts == [beir_text(r) for r in rows]
    assert np.load(out / "embeddings-00000.npy").shape[0] == 6


TEVATRON = [
    {
        "query_id": "1",
        "query": "why is the sky blue",
        "positive_passages": [{"docid": "d1", "title": "Sky", "text": "air scatters blue"}],
        "negative_passages": [
            {"docid": "d2", "title": "", "text": "bread rises"},
            {"docid": "d3", "title": "Ice", "text": "ice floats"},
        ],
    }
]
SENTENCE_TRANSFORMERS = [
    {
        "anchor": "why is the sky blue",
        "positive": "air scatters blue",
        "negative_1": "bread rises",
        "negative_2": "ice floats",
    }
]
WANT = [Pair("why is the sky blue", "Sky air scatters blue", ("bread rises", "Ice ice floats"))]


def _write(path, rows, fmt: str) -> str:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]), **({"delimiter": "\t"} if fmt == "tsv" else {}))
            w.writeheader()
            w.writerows(rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_tevatron_pairs(tmp_path):
    for fmt in ("jsonl", "parquet"):
        path = _write(tmp_path / f"train.{fmt}", TEVATRON, fmt)
        assert read_pairs(path) == WANT, fmt
    rows = list(read_pair_rows(str(tmp_path / "train.jsonl")))
    assert rows[0][1] == {
        "query_id": "1",
        "question": WANT[0].question,
        "answer": WANT[0].passage,
        "negatives": list(WANT[0].negatives),
    }, "other keys kept, the shape's own ones replaced"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_sentence_transformers_pairs(tmp_path, fmt):
    rows = [{**SENTENCE_TRANSFORMERS[0], "positive": "Sky air scatters blue", "negative_2": "Ice ice floats"}]
    assert read_pairs(_write(tmp_path / f"train.{fmt}", rows, fmt)) == WANT
    single = [{"anchor": "q", "positive": "p", "negative": "n"}]
    assert read_pairs(_write(tmp_path / f"one.{fmt}", single, fmt)) == [Pair("q", "p", ("n",))]


def test_pairs_by_named_fields(tmp_path):
    path = _write(tmp_path / "qa.csv", [{"title": "why is the sky blue", "body": "air scatters blue"}], "csv")
    with pytest.raises(ValueError, match=r"qa.csv:2: no question and positive passage among the fields"):
        read_pairs(path)
    assert read_pairs(path, PairFields(question="title", positive="body")) == [
        Pair("why is the sky blue", "air scatters blue")
    ]


def test_mine_and_train_take_the_field_options(tmp_path):
    """The command line: `--question-field` and `--positive-field` on both commands that read pairs."""
    from retribert_jax import cli

    parser = cli.build_parser()
    for command in ("train", "mine"):
        args = parser.parse_args(
            [
                command,
                "a",
                "b",
                "c",
                *(["d"] if command == "mine" else []),
                "--question-field",
                "title",
                "--positive-field",
                "body",
            ]
        )
        assert (args.question_field, args.positive_field) == ("title", "body"), command
