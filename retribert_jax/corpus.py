"""Corpus readers: plain text, JSONL, TSV, CSV and parquet as a stream of (line, id, text) records.

Every reader streams (a corpus need not fit in memory) and reports a bad record as `BadRecord` with the file and the
1-based line (or parquet row) number. Blank lines hold no record in JSONL (whitespace only) and TSV (empty), as
pyarrow reads those formats; in plain text a line is a passage, so a blank one is an empty passage.
`read_corpus(..., skip_bad_lines=True)` logs bad records and goes on; record numbers (the default ids) count only
the records kept, so they are the row numbers of the output.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import lzma
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

from retribert_jax.embedding_dir import id_string

FORMATS = ("text", "jsonl", "tsv", "csv", "parquet")
_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".tsv": "tsv",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Whole-file compressions read as a stream, told by the file's first bytes (so `--format jsonl` works on any name):
# name -> magic bytes. The suffixes are only stripped to find the format beneath ("corpus.jsonl.gz" is JSONL).
COMPRESSIONS = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst", ".zstd")


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


def compression(path: str) -> str | None:
    """ "gzip", "bz2", "xz" or "zstd" when the file starts with that format's magic bytes, else None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for name, magic in COMPRESSIONS.items() if head.startswith(magic)), None)


def open_input(path: str) -> BinaryIO:
    """`path` opened for binary reading, decompressed on the fly when it is compressed (see `compression`): gzip,
    bz2 and xz by the standard library, zstd by pyarrow.

    Raises:
      ValueError: a zstd file without pyarrow installed.
    """
    kind = compression(path)
    if kind is None:
        return open(path, "rb")
    if kind == "zstd":
        try:
            import pyarrow as pa
        except ImportError:
            raise ValueError(
                f"{path}: zstd-compressed; reading it needs pyarrow (pip install 'retribert_jax[data]'), "
                f"or decompress it (zstd -d)"
            ) from None
        return io.BufferedReader(pa.input_stream(path, compression="zstd"))
    return {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind](path, "rb")


def format_extension(path: str) -> str:
    """The lowercased extension that names the format, beneath a compression suffix: "c.jsonl.gz" -> ".jsonl"."""
    root, ext = os.path.splitext(path)
    if ext.lower() in _COMPRESSED_SUFFIXES:
        ext = os.path.splitext(root)[1]
    return ext.lower()


class RepeatedIds:
    """Finds an id that came earlier in a stream, keeping 64-bit hashes rather than the ids (a corpus of millions).

    A hash seen before is confirmed by reading the stream again up to that point, so a hash collision is never
    reported as a repeat.

    Args:
      reread: gives the stream again from its start, as (position, id) pairs in increasing position.
    """

    def __init__(self, reread: Callable[[], Iterable[tuple[int, Any]]]):
        self._reread = reread
        self._hashes: set[int] = set()

    def first_position(self, position: int, value: Any) -> int | None:
        """Where an id equal to `value` (as `id_string`s) came first, before `position`; None if it did not (then it
        is recorded)."""
        key = id_string(value)
        h = hash(key)
        if h not in self._hashes:
            self._hashes.add(h)
            return None
        for p, v in self._reread():
            if p >= position:
                break
            if id_string(v) == key:
                return p
        return None


def detect_format(path: str) -> str:
    """The input format from the file extension (`.txt`, `.jsonl`, `.tsv`, `.parquet`, each also with `.gz`, `.bz2`,
    `.xz` or `.zst` after it); ValueError otherwise."""
    ext = format_extension(path)
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"{path}: cannot tell the input format from the extension {ext!r}; pass --format ({', '.join(FORMATS)})"
        )
    return _EXTENSIONS[ext]


def read_lines(path: str, file: BinaryIO | None = None) -> Iterator[tuple[int, str | BadRecord]]:
    """The lines of a UTF-8 text file, one item a line, as `wc -l` counts them.

    Lines end at b"\n" only: not at \f, \v, \x1c-\x1e, \x85, U+2028 or U+2029, where `str.splitlines` ends them
    too, nor at a lone \r, where Python's text mode does. One trailing \r (CRLF files) is dropped, and so is a
    byte-order mark at the start of the file (Excel and Notepad write one; pyarrow and pandas skip it). A compressed
    file is read decompressed (`open_input`).

    Args:
      path: the file; with `file`, only its name for messages.
      file: an open binary file to read instead (`sys.stdin.buffer` for stdin).

    Yields:
      (1-based line number, the line's text), or (line number, BadRecord) for a line that is not valid UTF-8: one
      invalid byte costs one line, reported with its number.

    Raises:
      ValueError: a file that cannot be read to its end, e.g. compressed data that is damaged or cut short (naming
        the file and the last line read).
    """
    with open_input(path) if file is None else contextlib.nullcontext(file) as f:
        for n, raw in _damage_named(path, enumerate(f, start=1)):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadRecord(f"{path}:{n}: invalid UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r})")


def _damage_named(path: str, lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """`lines`, with a read error (a compressed file damaged or cut short) turned into one line naming the file."""
    n = 0
    while True:
        try:
            n, raw = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:  # pyarrow's errors are ValueErrors
            raise ValueError(f"{path}: cannot be read past line {n} ({type(e).__name__}: {e})") from None
        yield n, raw


def with_title(title: Any, text: str) -> str:
    """A record's text with its title in front, as BEIR and sentence-transformers join them: `(title + " " +
    text).strip()` wherever the record has a string title (an empty one too, as in BEIR); the text as it is where it
    has none."""
    return (title + " " + text).strip() if isinstance(title, str) else text


def _text(path: str, **_) -> Iterator[Record | BadRecord]:
    for n, line in read_lines(path):
        yield line if isinstance(line, BadRecord) else Record(n, None, line)


def _jsonl(
    path: str, text_field: str, id_field: str | None, title_field: str | None = None
) -> Iterator[Record | BadRecord]:
    for n, line in read_lines(path):
        if isinstance(line, BadRecord):
            yield line
            continue
        if not line.strip():
            continue  # as pyarrow, pandas and HF datasets read JSONL: a blank line holds no record
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # A .json file holding one array of records is a common near miss of JSONL.
            hint = "; JSONL holds one JSON object per line, not one array" if line.lstrip().startswith("[") else ""
            yield BadRecord(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}){hint}")
            continue
        if not isinstance(obj, dict):
            hint = "; JSONL holds one JSON object per line, not one array" if isinstance(obj, list) else ""
            yield BadRecord(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}{hint}")
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


def _tsv(
    path: str, text_field: str, id_field: str | None, title_field: str | None = None
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
        if not line:
            continue  # pyarrow's CSV reader (ignore_empty_lines) and pandas skip an empty line
        yield _row_record(path, n, line.split("\t"), len(columns), (ti, ii, hi), id_field, "tab-separated fields")


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


def _csv(
    path: str, text_field: str, id_field: str | None, title_field: str | None = None
) -> Iterator[Record | BadRecord]:
    # RFC 4180 as Python's csv module and pandas read it: a header line, quoted fields may hold commas and line
    # ends (so a record's number is the line it starts on).
    with io.TextIOWrapper(open_input(path), encoding="utf-8-sig", newline="") as f:
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
            yield _row_record(path, n, fields, len(columns), (ti, ii, hi), id_field, "fields")


def _row_record(
    path: str,
    n: int,
    fields: list[str],
    width: int,
    at: tuple[int, int | None, int | None],
    id_field: str | None,
    what: str,
) -> Record | BadRecord:
    """The record of one TSV or CSV row: its text (titled), at column `at[0]`, and its id at `at[1]` (title at
    `at[2]`); a row of another width or an empty id is bad. An empty field is how both formats write a missing
    value (pandas reads it as NaN)."""
    ti, ii, hi = at
    if len(fields) != width:
        return BadRecord(f"{path}:{n}: {len(fields)} {what}, the header has {width}")
    if ii is not None and not fields[ii]:
        return BadRecord(f"{path}:{n}: id field {id_field!r} is empty")
    return Record(
        n, fields[ii] if ii is not None else None, with_title(fields[hi] if hi is not None else None, fields[ti])
    )


def _parquet(
    path: str, text_field: str, id_field: str | None, title_field: str | None = None
) -> Iterator[Record | BadRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'retribert_jax[data]')") from None
    kind = compression(path)
    if kind is not None:
        raise ValueError(
            f"{path}: a {kind}-compressed parquet file; parquet compresses its columns itself, so "
            f"decompress the file first"
        )
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
                yield BadRecord(
                    f"{path}:row {row}: text column {text_field!r} is "
                    f"{'null' if text is None else type(text).__name__}, not a string"
                )
                continue
            if id_field is not None and id_ is None:
                yield BadRecord(f"{path}:row {row}: id column {id_field!r} is null")
                continue
            yield Record(row, id_, with_title(title, text))


_READERS: dict[str, Callable[..., Iterator[Record | BadRecord]]] = {
    "text": _text,
    "jsonl": _jsonl,
    "tsv": _tsv,
    "csv": _csv,
    "parquet": _parquet,
}


def count_records(path: str, fmt: str) -> int | None:
    """An upper bound on the record count for a progress bar, cheaply: lines, or parquet rows; None if unknown."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open_input(path) as f:
            n, last = 0, b"\n"
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        n += last != b"\n"
        return n - (fmt == "tsv")
    except Exception:  # only for the progress bar: a failure here is reported by the reader itself
        return None


def read_corpus(
    path: str,
    fmt: str | None = None,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    skip_bad_lines: bool = False,
    log: TextIO | None = None,
    unique_ids: bool = True,
) -> Iterator[Record]:
    """Streams the records of `path`.

    Args:
      path: the input file.
      fmt: "text" (one passage a line), "jsonl", "tsv" (a header line naming the columns, or none and two columns,
        id and text), "csv" (with a header line) or "parquet"; default from the extension. Text, JSONL, TSV and CSV
        may be gzip, bz2, xz or zstd files (told by their first bytes, whatever their name).
      text_field: the JSON key / column holding the text.
      id_field: the JSON key / column holding the id; None: ids are 0-based record numbers (a headerless TSV's ids
        are its first column).
      title_field: the JSON key / column of a title joined in front of the text where a record has one (BEIR's
        "title"; see `with_title`); None: none.
      skip_bad_lines: log bad records to `log` (stderr by default) and go on, instead of raising BadRecord.
      unique_ids: refuse an id given to an earlier record, compared as `id_string`s (7 and "7" are one id). Not a
        bad line that --skip-bad-lines skips: which of the two records the id names is not ours to guess.

    Yields:
      Records, in file order.

    Raises:
      BadRecord: a bad record (without skip_bad_lines).
      ValueError: an id repeated (naming both lines), or an unreadable file.
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

    def records():
        return (
            r for r in _READERS[fmt](path, text_field=text_field, id_field=id_field, **kwargs) if isinstance(r, Record)
        )

    repeats = RepeatedIds(lambda: ((r.line, r.id) for r in records()))
    for rec in _READERS[fmt](path, text_field=text_field, id_field=id_field, **kwargs):
        if isinstance(rec, BadRecord):
            if not skip_bad_lines:
                raise BadRecord(f"{rec} (pass --skip-bad-lines to skip bad lines)")
            print(f"skipping bad line: {rec}", file=log)
            continue
        if unique_ids and id_field is not None:
            first = repeats.first_position(rec.line, rec.id)
            if first is not None:
                unit = "row" if fmt == "parquet" else "line"
                where = f"row {rec.line}" if fmt == "parquet" else str(rec.line)
                raise ValueError(
                    f"{path}:{where}: id {id_string(rec.id)!r} again (first on {unit} {first}); ids "
                    f'must be unique, and are compared as text (7 and "7" are one id)'
                )
        yield rec
