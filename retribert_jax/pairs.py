"""Training pairs: the files `train` and `mine` read, in the shapes users bring them.

A pair is a question, its positive passage and optionally hard negatives. Rows are read from JSONL, CSV, TSV (both
with a header line) or parquet, and their fields are found by the shape of the first row:

- ours (ELI5's words; what `mine` writes): `question`, `answer`, optionally `negatives` (a list of strings);
- Tevatron / DPR: `query`, `positive_passages` (a list of {`docid`, `title`, `text`}; the first is the positive),
  optionally `negative_passages` (the same);
- sentence-transformers (anchor, positive, negative): `anchor`, `positive`, optionally `negative` or `negative_1`,
  `negative_2`, ... (the columns of its triplet and n-tuple data sets).

A Tevatron passage's text is its title and text joined as Tevatron and BEIR join them (`corpus.with_title`).
`PairFields` names the fields of any other shape (`--question-field`, `--positive-field`, `--negatives-field`).
Every row comes out as ours: {"question", "answer", "negatives"} plus the row's other keys (those of its own shape
dropped), which is what `mine` writes back and `train` reads.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from retribert_jax.corpus import BadRecord, format_extension, open_input, read_lines, with_title

FORMATS = ("jsonl", "csv", "tsv", "parquet")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_NUMBERED_NEGATIVE = re.compile(r"negative_\d+$")


class Pair(NamedTuple):
    """One training example: a question, its positive passage, and optionally hard negatives (passages that do not
    answer it, e.g. from `retribert-jax mine`)."""

    question: str
    passage: str
    negatives: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PairFields:
    """Which fields of a row hold the question, the positive passage and the negatives; None: found by the row's
    shape (see the module docstring)."""

    question: str | None = None
    positive: str | None = None
    negatives: str | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.question, self.positive, self.negatives))


# The known shapes: (name, question field, positive field, negatives field). ST's numbered negatives are found apart.
SHAPES = (
    ("ours", "question", "answer", "negatives"),
    ("tevatron", "query", "positive_passages", "negative_passages"),
    ("sentence-transformers", "anchor", "positive", "negative"),
)


def detect_format(path: str) -> str:
    """The pairs format from the file extension, beneath a compression suffix ("p.jsonl.gz" is JSONL)."""
    ext = format_extension(path)
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"{path}: cannot tell the pairs format from the extension {ext!r}; expected one of {sorted(_EXTENSIONS)}"
        )
    return _EXTENSIONS[ext]


def _rows(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record: `file:line` and a dict (or whatever a JSON line held), or a BadRecord."""
    if fmt == "jsonl":
        for n, line in read_lines(path):
            if isinstance(line, BadRecord):
                raise line
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    elif fmt in ("csv", "tsv"):
        import csv

        with io.TextIOWrapper(open_input(path), encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}))
            try:
                for row in reader:
                    if None in row or None in row.values():
                        raise ValueError(f"{path}:{reader.line_num}: the number of fields differs from the header's")
                    if any(v.strip() for v in row.values()):
                        yield f"{path}:{reader.line_num}", dict(row)
            except (csv.Error, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{reader.line_num}: not readable as {fmt.upper()} ({e})") from None
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'retribert_jax[data]')") from None
        try:
            f = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for non-parquet files
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        n = 0
        for batch in f.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row


def _shape(row: dict[str, Any], fields: PairFields, where: str) -> tuple[str, str, str, str | None]:
    """(shape name, question field, positive field, negatives field) for rows like `row`."""
    for name, q, p, n in SHAPES:
        if q in row and p in row:
            if fields.given():
                name = "given fields"
            return name, fields.question or q, fields.positive or p, fields.negatives or n
    if fields.question and fields.positive:
        return "given fields", fields.question, fields.positive, fields.negatives
    known = "; ".join(f"{q}/{p}[/{n}]" for _, q, p, n in SHAPES)
    raise ValueError(
        f"{where}: no question and positive passage among the fields {sorted(row)}; expected one of "
        f"{known}, or name them with --question-field and --positive-field"
    )


def _passage(value: Any, where: str, field: str, strings_only: bool = False) -> str:
    """A passage's text: a string, or a Tevatron passage {"title", "text", ...}."""
    if isinstance(value, str):
        return value
    if not strings_only and isinstance(value, dict) and isinstance(value.get("text"), str):
        return with_title(value.get("title"), value["text"])
    if strings_only:
        raise ValueError(f"{where}: field {field!r} must be a list of strings")
    raise ValueError(
        f"{where}: field {field!r} must hold strings or {{'title', 'text'}} passages, got {type(value).__name__}"
    )


def normalize_row(row: Any, shape: tuple[str, str, str, str | None], where: str) -> dict[str, Any]:
    """A row of any shape as ours: {"question": str, "answer": str, "negatives": [str]} plus the row's other keys.

    Raises:
      ValueError: naming `where` (file:line) and the field that is missing or of the wrong type.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name, qf, pf, nf = shape
    for field in (qf, pf) if name != "tevatron" else (qf,):
        if not isinstance(row.get(field), str) and not (name != "ours" and isinstance(row.get(field), (list, dict))):
            got = "missing" if row.get(field) is None else type(row[field]).__name__
            raise ValueError(f"{where}: field {field!r} must be a string ({got})")
    positive = row.get(pf)
    if name == "ours" and not isinstance(row.get(nf, []), list):
        raise ValueError(f"{where}: field {nf!r} must be a list of strings")
    if isinstance(positive, list):  # Tevatron: the first positive passage, as Tevatron trains without shuffling
        if not positive:
            raise ValueError(f"{where}: field {pf!r} holds no passage")
        positive = positive[0]
    positive = _passage(positive, where, pf)
    own = {qf, pf}
    negatives: list[str] = []
    if nf is not None and nf in row and row[nf] is not None:
        own.add(nf)
        value = row[nf]
        for v in value if isinstance(value, list) else [value]:
            negatives.append(_passage(v, where, nf, strings_only=name == "ours"))
    if name == "sentence-transformers" and (nf is None or nf == "negative"):
        numbered = sorted((k for k in row if _NUMBERED_NEGATIVE.match(k)), key=lambda k: int(k.split("_")[1]))
        for k in numbered:
            own.add(k)
            if row[k] is not None and row[k] != "":
                negatives.append(_passage(row[k], where, k))
    out = {k: v for k, v in row.items() if k not in own}
    return {**out, "question": row[qf], "answer": positive, "negatives": negatives}


def read_pair_rows(
    path: str, fields: PairFields | None = None, fmt: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every record of a training-pairs file, each row in our shape (`normalize_row`), other keys
    kept (what `mine` writes back). Blank lines and rows are skipped.

    Args:
      path: the file: JSONL, CSV, TSV or parquet (by `fmt`, else its extension).
      fields: the fields to read; default found by the first row's shape (see the module docstring).

    Raises:
      FileNotFoundError, ValueError: naming the file and line (or parquet row).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such pairs file")
    fields = fields or PairFields()
    shape = None
    for where, row in _rows(path, fmt or detect_format(path)):
        if shape is None:
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            shape = _shape(row, fields, where)
        yield where, normalize_row(row, shape, where)


def read_pairs(path: str, fields: PairFields | None = None, fmt: str | None = None) -> list[Pair]:
    """Every pair of a training-pairs file (see `read_pair_rows`): question, positive passage, negatives.

    Raises:
      FileNotFoundError, ValueError: naming the file and line; a file without pairs.
    """
    pairs = [Pair(r["question"], r["answer"], tuple(r["negatives"])) for _, r in read_pair_rows(path, fields, fmt)]
    if not pairs:
        raise ValueError(f"{path}: no question/answer pairs")
    return pairs


def check_pair_row(row: Any, where: str) -> None:
    """Refuses a row that is not {"question": str, "answer": str[, "negatives": [str, ...]], ...} (our shape, as
    `mine_hard_negatives` takes rows from Python).

    Raises:
      ValueError: naming `where` and the field.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("question", "answer"):
        if not isinstance(row.get(field), str):
            got = "missing" if field not in row else type(row[field]).__name__
            raise ValueError(f"{where}: field {field!r} must be a string ({got})")
    negatives = row.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"{where}: field 'negatives' must be a list of strings")
