"""Corpus readers: plain text, JSONL, TSV, CSV and parquet as a stream of (line, id, text) records.

Every reader streams (a corpus need not fit in memory) and reports a bad record as `BadRecord` with the file and the
1-based line (or parquet row) number. `read_corpus(..., skip_bad_lines=True)` logs bad records and goes on; record
numbers (the default ids) count only the records kept, so they are the row numbers of the output.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

FORMATS = ("text", "jsonl", "tsv", "csv", "parquet")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".tsv": "tsv", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class BadRecord(ValueError):
    """One unreadable input record; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Record:
    """One input record: its 1-based line (or parquet row), its id and its text.

    The id is None exactly when no id field was asked for (the record number is the id then); a record whose id
    field is null, absent or empty is a BadRecord, never a Record.
    """

    line: int
    id: Any
    text: str


def detect_format(path: str) -> str:
    """The input format from the file extension (`.txt`, `.jsonl`, `.tsv`, `.parquet`); ValueError otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{path}: cannot tell the input format from the extension {ext!r}; pass --format "
                         f"({', '.join(FORMATS)})")
    return _EXTENSIONS[ext]


def read_lines(path: str, file: BinaryIO | None = None) -> Iterator[tuple[int, str | BadRecord]]:
    """The lines of a UTF-8 text file, one item a line, as `wc -l` counts them.

    Lines end at b"\n" only: not at \f, \v, \x1c-\x1e, \x85, U+2028 or U+2029, where `str.splitlines` ends them
    too, nor at a lone \r, where Python's text mode does. One trailing \r (CRLF files) is dropped, and so is a
    byte-order mark at the start of the file (Excel and Notepad write one; pyarrow and pandas skip it).

    Args:
      path: the file; with `file`, only its name for messages.
      file: an open binary file to read instead (`sys.stdin.buffer` for stdin).

    Yields:
      (1-based line number, the line's text), or (line number, BadRecord) for a line that is not valid UTF-8: one
      invalid byte costs one line, reported with its number.
    """
    with open(path, "rb") if file is None else contextlib.nullcontext(file) as f:
        for n, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadRecord(f"{path}:{n}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r})")


def with_title(title: Any, text: str) -> str:
    """A record's text with its title in front, as BEIR and sentence-transformers join them: `(title + " " +
    text).strip()` wherever the record has a string title (an empty one too, as in BEIR); the text as it is where it
    has none."""
    return (title + " " + text).strip() if isinstance(title, str) else text


def _text(path: str, **_) -> Iterator[Record | BadRecord]:
    for n, line in read_lines(path):
        yield line if isinstance(line, BadRecord) else Record(n, None, line)


def _jsonl(path: str, text_field: str, id_field: str | None, title_field: str | None = None
           ) -> Iterator[Record | BadRecord]:
    for n, line in read_lines(path):
        if isinstance(line, BadRecord):
            yield line
            continue
        if not line.strip():
            yield BadRecord(f"{path}:{n}: empty line, expected a JSON object")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRecord(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield BadRecord(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            continue
        if text_field not in obj:
            yield BadRecord(f"{path}:{n}: missing text field {text_field!r}")
            continue
        text = obj[text_field]
        if not isinstance(text, str):
            yield BadRecord(f"{path}:{n}: text field {text_field!r} is a {type(text).__name__}, not a string")
            continue
        if id_field is not None and id_field not in obj:
            yield BadRecord(f"{path}:{n}: missing id field {id_field!r}")
            continue
        if id_field is not None and obj[id_field] is None:
            yield BadRecord(f"{path}:{n}: id field {id_field!r} is null")
            continue
        yield Record(n, obj[id_field] if id_field is not None else None, with_title(obj.get(title_field), text))


def _tsv(path: str, text_field: str, id_field: str | None, title_field: str | None = None
         ) -> Iterator[Record | BadRecord]:
    # Fields are split on tabs with no quoting (passages may contain quotes). The first line is a header when it
    # names the text column; a first line of two fields that does not is the first record of a headerless
    # `id<TAB>text` file, as `evaluate` reads queries and MS MARCO ships its collection.
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        return
    n, header = first
    if isinstance(header, BadRecord):
        raise header
    columns = header.split("\t")
    if text_field not in columns and len(columns) == 2 and id_field is None:
        yield from _headerless_tsv(path, itertools.chain([first], lines))
        return
    if text_field not in columns:
        raise ValueError(f"{path}:1: the header has no column {text_field!r} (columns: {columns})")
    if id_field is not None and id_field not in columns:
        raise ValueError(f"{path}:1: the header has no column {id_field!r} (columns: {columns})")
    ti = columns.index(text_field)
    ii = columns.index(id_field) if id_field is not None else None
    hi = columns.index(title_field) if title_field in columns else None
    for n, line in lines:
        if isinstance(line, BadRecord):
            yield line
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            yield BadRecord(f"{path}:{n}: {len(fields)} tab-separated fields, the header has {len(columns)}")
            continue
        if ii is not None and not fields[ii]:
            # An empty field is how TSV writes a missing value (pandas reads it as NaN).
            yield BadRecord(f"{path}:{n}: id field {id_field!r} is empty")
            continue
        yield Record(n, fields[ii] if ii is not None else None,
                     with_title(fields[hi] if hi is not None else None, fields[ti]))


def _headerless_tsv(path: str, lines: Iterator[tuple[int, str | BadRecord]]) -> Iterator[Record | BadRecord]:
    for n, line in lines:
        if isinstance(line, BadRecord):
            yield line
            continue
        fields = line.split("\t", 1)
        if len(fields) != 2 or not fields[0]:
            yield BadRecord(f"{path}:{n}: expected 'id<TAB>text' (the file has no header naming a text column)")
            continue
        yield Record(n, fields[0], fields[1])


def _csv(path: str, text_field: str, id_field: str | None, title_field: str | None = None
         ) -> Iterator[Record | BadRecord]:
    # RFC 4180 as Python's csv module and pandas read it: a header line, quoted fields may hold commas and line
    # ends (so a record's number is the line it starts on).
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            columns = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:1: not a readable CSV header ({e})") from None
        if columns is None:
            return
        for col in (text_field, id_field):
            if col is not None and col not in columns:
                raise ValueError(f"{path}:1: the header has no column {col!r} (columns: {columns})")
        ti = columns.index(text_field)
        ii = columns.index(id_field) if id_field is not None else None
        hi = columns.index(title_field) if title_field in columns else None
        while True:
            n = reader.line_num + 1
            try:
                fields = next(reader, None)
            except csv.Error as e:
                yield BadRecord(f"{path}:{n}: {e}")
                continue
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: invalid UTF-8 near line {n} ({e.reason})") from None
            if fields is None:
                return
            if len(fields) != len(columns):
                yield BadRecord(f"{path}:{n}: {len(fields)} fields, the header has {len(columns)}")
                continue
            if ii is not None and not fields[ii]:
                yield BadRecord(f"{path}:{n}: id field {id_field!r} is empty")
                continue
            yield Record(n, fields[ii] if ii is not None else None,
                         with_title(fields[hi] if hi is not None else None, fields[ti]))


def _parquet(path: str, text_field: str, id_field: str | None, title_field: str | None = None
             ) -> Iterator[Record | BadRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'retribert_jax[data]')") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for non-parquet files
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = f.schema_arrow.names
    for col in (text_field, id_field):
        if col is not None and col not in names:
            raise ValueError(f"{path}: no column {col!r} (columns: {names})")
    columns = [text_field] + ([id_field] if id_field is not None else [])
    titled = title_field in names
    row = 0
    for batch in f.iter_batches(columns=columns + ([title_field] if titled else []), batch_size=8192):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_field is not None else [None] * len(texts)
        titles = batch.column(len(columns)).to_pylist() if titled else [None] * len(texts)
        for text, id_, title in zip(texts, ids, titles, strict=True):
            row += 1
            if not isinstance(text, str):
                yield BadRecord(f"{path}:row {row}: text column {text_field!r} is "
                                f"{'null' if text is None else type(text).__name__}, not a string")
                continue
            if id_field is not None and id_ is None:
                yield BadRecord(f"{path}:row {row}: id column {id_field!r} is null")
                continue
            yield Record(row, id_, with_title(title, text))


_READERS: dict[str, Callable[..., Iterator[Record | BadRecord]]] = {
    "text": _text, "jsonl": _jsonl, "tsv": _tsv, "csv": _csv, "parquet": _parquet}


def count_records(path: str, fmt: str) -> int | None:
    """An upper bound on the record count for a progress bar, cheaply: lines, or parquet rows; None if unknown."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open(path, "rb") as f:
            n, last = 0, b"\n"
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        n += last != b"\n"
        return n - (fmt == "tsv")
    except Exception:  # only for the progress bar: a failure here is reported by the reader itself
        return None


def read_corpus(path: str, fmt: str | None = None, *, text_field: str = "text", id_field: str | None = None,
                title_field: str | None = None, skip_bad_lines: bool = False, log: TextIO | None = None
                ) -> Iterator[Record]:
    """Streams the records of `path`.

    Args:
      path: the input file.
      fmt: "text" (one passage a line), "jsonl", "tsv" (a header line naming the columns, or none and two columns,
        id and text), "csv" (with a header line) or "parquet"; default from the extension.
      text_field: the JSON key / column holding the text.
      id_field: the JSON key / column holding the id; None: ids are 0-based record numbers (a headerless TSV's ids
        are its first column).
      title_field: the JSON key / column of a title joined in front of the text where a record has one (BEIR's
        "title"; see `with_title`); None: none.
      skip_bad_lines: log bad records to `log` (stderr by default) and go on, instead of raising BadRecord.

    Yields:
      Records, in file order.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such input file")
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {FORMATS}")
    if fmt == "text" and id_field is not None:
        raise ValueError(f"{path}: plain text input has no id field; drop --id-field or use JSONL/TSV/parquet")
    log = log or sys.stderr
    kwargs = {} if fmt == "text" else {"title_field": title_field}
    for rec in _READERS[fmt](path, text_field=text_field, id_field=id_field, **kwargs):
        if isinstance(rec, BadRecord):
            if not skip_bad_lines:
                raise BadRecord(f"{rec} (pass --skip-bad-lines to skip bad lines)")
            print(f"skipping bad line: {rec}", file=log)
            continue
        yield rec
