"""The one-item-a-line readers (corpus text/JSONL/TSV/parquet, train's pairs, search's queries file) against the
references: `wc -l` for where lines end, pyarrow for what the records are (byte-order mark, null ids)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest

from retribert_jax.commands.search import _questions
from retribert_jax.corpus import BadRecord, read_corpus, read_lines
from retribert_jax.pairs import read_pairs

BOM = "\ufeff".encode()
# Characters that str.splitlines (and, for \r, Python's text mode) take for line ends; none ends a line here.
NOT_LINE_ENDS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


def wc_l(path) -> int:
    return int(subprocess.run(["wc", "-l", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def pyarrow_jsonl(path) -> list[dict]:
    pa_json = pytest.importorskip("pyarrow.json")
    return pa_json.read_json(str(path)).to_pylist()


def pyarrow_tsv(path) -> list[dict]:
    csv = pytest.importorskip("pyarrow.csv")
    import pyarrow as pa

    table = csv.read_csv(
        str(path),
        parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=csv.ConvertOptions(column_types={"id": pa.string()}),
    )
    return table.to_pylist()


def questions_from(path=None, stdin: bytes | None = None, monkeypatch=None) -> list[str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return _questions(argparse.Namespace(questions=[], queries_file="-" if stdin is not None else str(path)))


def records(path, fmt=None, **kw) -> list[tuple]:
    return [(r.line, r.id, r.text) for r in read_corpus(str(path), fmt, **kw)]


# ---------------------------------------------------------------------------------------------------------------
# One line is one item (item 6)


def test_lines_end_at_newline_only_in_every_reader(tmp_path, monkeypatch):
    texts = [f"item {i} with{c}inside" for i, c in enumerate(NOT_LINE_ENDS)]
    data = "".join(t + "\r\n" for t in texts).encode()
    plain = tmp_path / "q.txt"
    plain.write_bytes(data)
    n = wc_l(plain)
    assert n == len(texts)
    assert [line for _, line in read_lines(str(plain))] == texts
    assert records(plain, "text") == [(i + 1, None, t) for i, t in enumerate(texts)]
    # Questions are stripped (so a trailing \r or \f goes), but never split.
    assert questions_from(plain) == [t.strip() for t in texts]
    assert questions_from(stdin=data, monkeypatch=monkeypatch) == [t.strip() for t in texts]
    # JSON allows only \x85, U+2028 and U+2029 raw inside strings, and \r as whitespace between tokens.
    objs = [{"id": f"d{i}", "text": f"a{c}b"} for i, c in enumerate(["\x85", "\u2028", "\u2029"])]
    lines = [json.dumps(o, ensure_ascii=False) for o in objs] + ['{"id": "d3",\r"text": "cr as whitespace"}']
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes("".join(line + "\n" for line in lines).encode())
    want = pyarrow_jsonl(jsonl)
    assert len(want) == wc_l(jsonl) == 4
    assert [(i, t) for _, i, t in records(jsonl, id_field="id")] == [(o["id"], o["text"]) for o in want]
    pairs = tmp_path / "pairs.jsonl"
    # \r as JSON whitespace between the fields: Python's text mode would cut each record in two.
    pairs.write_bytes(
        "".join(
            f'{{"question": {json.dumps(o["text"], ensure_ascii=False)},\r"answer": "{o["id"]}"}}\n' for o in want
        ).encode()
    )
    want_pairs = pyarrow_jsonl(pairs)
    assert len(want_pairs) == wc_l(pairs) == 4
    assert [p[:2] for p in read_pairs(str(pairs))] == [(o["question"], o["answer"]) for o in want_pairs]
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(("id\ttext\n" + "".join(f"d{i}\t{t}\n" for i, t in enumerate(texts[:-1]))).encode())
    want = pyarrow_tsv(tsv)  # pyarrow's CSV reader ends lines at a lone \r too, so texts[-1] is left out
    assert len(want) == wc_l(tsv) - 1
    assert [(i, t) for _, i, t in records(tsv, id_field="id")] == [(r["id"], r["text"]) for r in want]


def test_crlf_and_blank_lines(tmp_path, monkeypatch):
    data = b"first\r\n\r\nthird\r\n"
    plain = tmp_path / "c.txt"
    plain.write_bytes(data)
    assert wc_l(plain) == 3
    # A blank line is an empty passage (its record number is its row), a skipped question, a skipped pair.
    assert records(plain) == [(1, None, "first"), (2, None, ""), (3, None, "third")]
    assert questions_from(plain) == ["first", "third"]
    assert questions_from(stdin=data, monkeypatch=monkeypatch) == ["first", "third"]
    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(b'{"question": "q1", "answer": "a1"}\r\n\r\n{"question": "q2", "answer": "a2"}\r\n')
    assert [p[:2] for p in read_pairs(str(pairs))] == [("q1", "a1"), ("q2", "a2")]
    # In JSONL and TSV a blank line holds no record, as pyarrow reads them; the others keep their line numbers.
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'\n{"text": "a", "id": 1}\r\n\r\n  \t \n{"text": "b", "id": 2}\r\n\n')
    want = pyarrow_jsonl(jsonl)
    assert [(i, t) for _, i, t in records(jsonl, id_field="id")] == [(r["id"], r["text"]) for r in want]
    assert [n for n, _, _ in records(jsonl)] == [2, 5]
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(b"id\ttext\r\nd1\ta\r\n\r\n\nd2\tb\n\n")
    want = pyarrow_tsv(tsv)
    assert [(i, t) for _, i, t in records(tsv, id_field="id")] == [(r["id"], r["text"]) for r in want]
    assert [n for n, _, _ in records(tsv)] == [2, 5]
    # Only one \r goes with the \n: a second one is data.
    plain.write_bytes(b"two cr\r\r\n")
    assert records(plain) == [(1, None, "two cr\r")]


def test_invalid_utf8_names_file_and_line(tmp_path, monkeypatch):
    bad = b'{"question": "q1", "answer": "a1"}\n{"question": "caf\xe9", "answer": "a2"}\n'
    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(bad)
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid UTF-8 at byte 17"):
        read_pairs(str(pairs))
    queries = tmp_path / "q.txt"
    queries.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"q.txt:2: invalid UTF-8 at byte 3"):
        questions_from(queries)
    with pytest.raises(ValueError, match=r"<stdin>:2: invalid UTF-8 at byte 3"):
        questions_from(stdin=b"fine\ncaf\xe9\n", monkeypatch=monkeypatch)
    with pytest.raises(FileNotFoundError, match="nope.txt: no such queries file"):
        questions_from(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------------------------
# A byte-order mark is not data (item 4)


def test_byte_order_mark_is_not_data(tmp_path, monkeypatch):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(BOM + b'{"id": "d1", "text": "first"}\r\n{"id": "d2", "text": "second"}\r\n')
    want = [(r["id"], r["text"]) for r in pyarrow_jsonl(jsonl)]
    assert want == [("d1", "first"), ("d2", "second")]
    log = io.StringIO()
    got = records(jsonl, id_field="id", skip_bad_lines=True, log=log)
    assert [(i, t) for _, i, t in got] == want and log.getvalue() == "", log.getvalue()

    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(BOM + b"id\ttext\r\nd1\tfirst\r\nd2\tsecond\r\n")
    assert [(i, t) for _, i, t in records(tsv, id_field="id")] == [(r["id"], r["text"]) for r in pyarrow_tsv(tsv)]

    plain = tmp_path / "c.txt"
    data = BOM + b"first\r\n" + BOM + b"second keeps its U+FEFF: only the file's first is a mark\r\n"
    plain.write_bytes(data)
    want = data.decode("utf-8-sig").split("\r\n")[:-1]  # the codec made for files with a mark
    assert [t for _, _, t in records(plain)] == want and want[1].startswith("\ufeff")
    assert questions_from(plain) == [t.strip() for t in want]
    assert questions_from(stdin=data, monkeypatch=monkeypatch) == [t.strip() for t in want]
    assert not questions_from(plain)[0].startswith("\ufeff")

    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(BOM + b'{"question": "q1", "answer": "a1"}\r\n')
    assert [p[:2] for p in read_pairs(str(pairs))] == [(r["question"], r["answer"]) for r in pyarrow_jsonl(pairs)]


# ---------------------------------------------------------------------------------------------------------------
# Ids are never invented (item 5)


def test_null_ids_are_bad_records(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": 7, "text": "a"}\n{"id": null, "text": "b"}\n{"id": 1, "text": "c"}\n')
    ids = [r["id"] for r in pyarrow_jsonl(jsonl)]
    assert ids == [7, None, 1]
    with pytest.raises(BadRecord, match=r"c.jsonl:2: id field 'id' is null"):
        records(jsonl, id_field="id")
    log = io.StringIO()
    assert [i for _, i, _ in records(jsonl, id_field="id", skip_bad_lines=True, log=log)] == [
        i for i in ids if i is not None
    ]
    assert "c.jsonl:2: id field 'id' is null" in log.getvalue()
    # Without --id-field the id key is not read at all, null or not.
    assert [i for _, i, _ in records(jsonl)] == [None, None, None]

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [7, None, 1], "text": ["a", "b", "c"]}), str(parquet))
    ids = pq.read_table(str(parquet)).column("id").to_pylist()
    with pytest.raises(BadRecord, match=r"c.parquet:row 2: id column 'id' is null"):
        records(parquet, id_field="id")
    assert [i for _, i, _ in records(parquet, id_field="id", skip_bad_lines=True, log=io.StringIO())] == [
        i for i in ids if i is not None
    ]

    tsv = tmp_path / "c.tsv"
    tsv.write_text("id\ttext\n7\ta\n\tb\n1\tc\n")
    with pytest.raises(BadRecord, match=r"c.tsv:3: id field 'id' is empty"):
        records(tsv, id_field="id")
    assert [i for _, i, _ in records(tsv, id_field="id", skip_bad_lines=True, log=io.StringIO())] == ["7", "1"]


# ---------------------------------------------------------------------------------------------------------------
# Compressed inputs are read, as pyarrow and pyserini read them (issue 23, item 6)


def _compress(data: bytes, kind: str) -> bytes:
    import bz2
    import gzip
    import lzma

    if kind == "zstd":
        pa = pytest.importorskip("pyarrow")
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as f:
            f.write(data)
        return sink.getvalue().to_pybytes()
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind](data)


@pytest.mark.parametrize("kind,suffix", [("gz", ".gz"), ("bz2", ".bz2"), ("xz", ".xz"), ("zstd", ".zst")])
def test_compressed_inputs_read_as_their_content(tmp_path, monkeypatch, kind, suffix):
    from retribert_jax.evaluation import read_qrels, read_queries
    from retribert_jax.mining import _count_rows

    jsonl = BOM + b'{"id": "d1", "text": "first"}\r\n\n{"id": "d2", "text": "second"}\n'
    tsv = b"id\ttext\nd1\tfirst\nd2\tsecond\n"
    text = b"first\nsecond\n"
    for name, data, fmt in (("c.jsonl", jsonl, "jsonl"), ("c.tsv", tsv, "tsv"), ("c.txt", text, "text")):
        plain, packed = tmp_path / name, tmp_path / (name + suffix)
        plain.write_bytes(data)
        packed.write_bytes(_compress(data, kind))
        id_field = None if fmt == "text" else "id"
        want = records(plain, id_field=id_field)
        assert records(packed, id_field=id_field) == want, f"{packed.name}: the records differ from the plain file's"
        # The format comes from the name beneath the suffix, or from --format whatever the name; the content is
        # recognised by its first bytes.
        anonymous = tmp_path / f"{name}.data"
        anonymous.write_bytes(packed.read_bytes())
        assert records(anonymous, fmt, id_field=id_field) == want
        if kind in ("gz", "bz2", "zstd") and fmt != "text":  # pyarrow's readers take these by their extension
            reference = pyarrow_jsonl(packed) if fmt == "jsonl" else pyarrow_tsv(packed)
            assert [(i, t) for _, i, t in want] == [(r["id"], r["text"]) for r in reference]
    assert questions_from(tmp_path / f"c.txt{suffix}") == ["first", "second"]
    pairs = tmp_path / f"p.jsonl{suffix}"
    pairs.write_bytes(_compress(b'{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": "a2"}\n', kind))
    assert [p[:2] for p in read_pairs(str(pairs))] == [("q1", "a1"), ("q2", "a2")]
    assert _count_rows(str(pairs)) == 2
    queries = tmp_path / f"q.jsonl{suffix}"
    queries.write_bytes(_compress(b'{"_id": "q1", "text": "why"}\n', kind))
    assert read_queries(str(queries)) == {"q1": "why"}
    queries = tmp_path / f"q.tsv{suffix}"
    queries.write_bytes(_compress(b"q1\twhy\n", kind))
    assert read_queries(str(queries)) == {"q1": "why"}
    qrels = tmp_path / f"qrels.tsv{suffix}"
    qrels.write_bytes(_compress(b"query-id\tcorpus-id\tscore\nq1\td1\t1\n", kind))
    assert read_qrels(str(qrels)) == {"q1": {"d1": 1}}


def test_damaged_compressed_input_is_one_line(tmp_path):
    import gzip

    data = gzip.compress(b"".join(b'{"text": "passage %d"}\n' % i for i in range(20000)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: cannot be read past line \d+ \(EOFError"):
        records(cut)
    pa = pytest.importorskip("pyarrow")
    parquet = tmp_path / "c.parquet.gz"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), str(tmp_path / "c.parquet"))
    parquet.write_bytes(gzip.compress((tmp_path / "c.parquet").read_bytes()))
    with pytest.raises(ValueError, match="c.parquet.gz: a gzip-compressed parquet file"):
        records(parquet)


# ---------------------------------------------------------------------------------------------------------------
# An id names one record (issue 23, item 8): as text, as qrels and TREC runs carry ids, so 7 and "7" are one id


def test_repeated_ids_are_refused_naming_both_lines(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": 7, "text": "a"}\n{"id": "d", "text": "b"}\n\n{"id": "7", "text": "c"}\n')
    for kw in ({}, {"skip_bad_lines": True, "log": io.StringIO()}):
        with pytest.raises(ValueError, match=r"c.jsonl:4: id '7' again \(first on line 1\)"):
            records(jsonl, id_field="id", **kw)
    assert [i for _, i, _ in records(jsonl)] == [None, None, None], "record numbers are ids that cannot repeat"
    tsv = tmp_path / "c.tsv"
    tsv.write_text("id\ttext\nd1\ta\nd2\tb\nd1\tc\n")
    with pytest.raises(ValueError, match=r"c.tsv:4: id 'd1' again \(first on line 2\)"):
        records(tsv, id_field="id")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2, 1], "text": ["a", "b", "c"]}), str(parquet))
    with pytest.raises(ValueError, match=r"c.parquet:row 3: id '1' again \(first on row 1\)"):
        records(parquet, id_field="id")


def test_a_hash_collision_is_not_a_repeat(monkeypatch):
    """Only hashes are kept; one seen before is confirmed against the ids themselves."""
    import retribert_jax.corpus as corpus

    monkeypatch.setattr(corpus, "hash", lambda key: 0, raising=False)  # every id collides
    ids = ["a", "b", "c", "b"]
    repeats = corpus.RepeatedIds(lambda: enumerate(ids))
    assert [repeats.first_position(i, v) for i, v in enumerate(ids)] == [None, None, None, 1]


@pytest.mark.parametrize("layout", ["one line", "indented"])
def test_a_json_array_given_as_jsonl_says_what_jsonl_is(tmp_path, layout):
    """`corpus.json` holding one array of records said only "invalid JSON" (or "got list")."""
    rows = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(rows, indent=2 if layout == "indented" else None) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: .*; JSONL holds one JSON object per line, not one array"):
        records(path, "jsonl")
