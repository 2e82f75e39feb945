"""Retrieval evaluation: encode queries, search an index, score the run against qrels with ir-measures (trec_eval).

Inputs:
- queries: JSONL, one `{"id": ..., "text": ...}` object a line (BEIR's `{"_id": ..., "text": ...}` too; the key is
  taken from the first line), or TSV `id<TAB>text` with or without a header line (`id`/`_id`/`qid`/`query_id`/
  `query-id` then `text`/`query`/`question`). `.jsonl`/`.json`/`.ndjson` and `.tsv` say which; any other name is
  read as JSONL when its first non-blank line starts with `{`.
- qrels: TREC (`query-id iteration doc-id relevance`, whitespace separated) or BEIR's TSV (a header line
  `query-id<TAB>corpus-id<TAB>score`, then those three columns); the first line says which. Relevance is an integer.

Ids are compared as strings: a JSON string id as it is, any other JSON value as its JSON text, so the index's record
numbers (ints) match the qrels' "0", "1", ... and the int 7 and the string "7" are the same document.

Which queries count (trec_eval's default, which BEIR's pytrec_eval loop follows too): only queries that have at
least one qrels line, whatever its relevance, are encoded, searched and averaged over; queries without any are
skipped and counted, and qrels for query ids absent from the queries file are ignored and counted. A judged query
with no relevant document scores 0 on every measure.

The measures come from ir-measures: R@k and nDCG@k from trec_eval (through pytrec_eval), RR@k from MS MARCO's
script. Both re-sort a query's documents by score and ignore the run's rank column, and they break exact score ties
differently: trec_eval by doc id descending, MS MARCO's script by doc id ascending. Equal float32 inner products come
almost only from bit-identical embeddings (duplicate passages), so this rarely matters; the run file's rank column
keeps the index's order (the lower row first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

from retribert_jax.errors import MissingDependency
from retribert_jax.search import Hit, Index

DEFAULT_METRICS = ("R@1", "R@5", "R@10", "R@100", "RR@10", "nDCG@10")
BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")
QUERY_ID_COLUMNS = ("id", "_id", "qid", "query_id", "query-id")
QUERY_TEXT_COLUMNS = ("text", "query", "question")
INSTALL_HINT = "evaluation needs ir-measures: pip install 'retribert_jax[eval]'"


def require_ir_measures():
    """The `ir_measures` module.

    Raises:
      MissingDependency: with the install command, when it is not installed.
    """
    try:
        import ir_measures
    except ImportError:
        raise MissingDependency(INSTALL_HINT) from None
    return ir_measures


def id_string(value: Any) -> str:
    """The string an id is compared as: a JSON string as it is, any other JSON value as its JSON text (7 -> "7")."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# Reading queries and qrels


def _numbered_lines(path: str) -> Iterator[tuple[int, str | ValueError]]:
    """(1-based line number, line without its end of line), or a ValueError for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start}")


def _first_line(path: str) -> str | None:
    for _, line in _numbered_lines(path):
        if isinstance(line, str) and line.strip():
            return line
    return None


def _queries_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    first = _first_line(path)
    return "jsonl" if first is not None and first.lstrip().startswith("{") else "tsv"


def _jsonl_queries(path: str, skip_bad_lines: bool, log: TextIO) -> Iterator[tuple[int, str, str]]:
    from retribert_jax.corpus import read_corpus

    id_field = "id"
    try:
        first = json.loads(_first_line(path) or "null")
        if isinstance(first, dict) and "_id" in first:
            id_field = "_id"
    except json.JSONDecodeError:
        pass  # read_corpus reports the line
    for rec in read_corpus(path, "jsonl", text_field="text", id_field=id_field, skip_bad_lines=skip_bad_lines,
                           log=log):
        yield rec.line, id_string(rec.id), rec.text


def _tsv_queries(path: str, skip_bad_lines: bool, log: TextIO) -> Iterator[tuple[int, str, str]]:
    for n, line in _numbered_lines(path):
        if isinstance(line, str) and not line.strip():
            continue
        if isinstance(line, str):
            fields = line.split("\t", 1)
            if n == 1 and len(fields) == 2 and fields[0].strip().lower() in QUERY_ID_COLUMNS \
                    and fields[1].strip().lower() in QUERY_TEXT_COLUMNS:
                continue  # the header
            if len(fields) == 2 and fields[0]:
                yield n, fields[0], fields[1]
                continue
            line = ValueError(f"{path}:{n}: expected 'id<TAB>text'" + (", got no tab" if len(fields) == 1 else
                                                                        ", got an empty id"))
        if not skip_bad_lines:
            raise ValueError(f"{line} (pass --skip-bad-lines to skip bad lines)")
        print(f"skipping bad line: {line}", file=log)


def read_queries(path: str, *, skip_bad_lines: bool = False, log: TextIO | None = None) -> dict[str, str]:
    """Query id -> text, in file order, from JSONL (`id` or `_id`, and `text`) or TSV (`id<TAB>text`, header optional).

    Args:
      path: the queries file (see the module docstring for the formats).
      skip_bad_lines: log unreadable lines to `log` (stderr by default) and go on, instead of raising.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a bad line (`file:line: ...`), a query id given twice (both lines named), or no queries at all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such queries file")
    log = log or sys.stderr
    reader = _jsonl_queries if _queries_format(path) == "jsonl" else _tsv_queries
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    for n, qid, text in reader(path, skip_bad_lines, log):
        if qid in queries:
            raise ValueError(f"{path}:{n}: query id {qid!r} again (first on line {lines[qid]})")
        queries[qid], lines[qid] = text, n
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """Query id -> {doc id: relevance} from TREC qrels or BEIR's qrels TSV (told apart by BEIR's header line).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line with the wrong number of fields, a relevance that is not an integer, a (query, doc) judged
        twice, or no judgments at all; each names the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such qrels file")
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    beir = None
    for n, line in _numbered_lines(path):
        if isinstance(line, ValueError):
            raise line
        if not line.strip():
            continue
        if beir is None:
            beir = tuple(f.strip() for f in line.split("\t")) == BEIR_QRELS_HEADER
            if beir:
                continue
        if beir:
            fields = line.split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{n}: {len(fields)} tab-separated fields, expected 3 "
                                 f"(query-id, corpus-id, score) as the header says")
            qid, doc, rel = (f.strip() for f in fields)
        else:
            fields = line.split()
            if len(fields) != 4:
                raise ValueError(f"{path}:{n}: {len(fields)} fields, expected 4 ('query-id iteration doc-id "
                                 f"relevance', TREC qrels), or a BEIR file whose first line is "
                                 f"'query-id<TAB>corpus-id<TAB>score'")
            qid, _, doc, rel = fields
        if not qid or not doc:
            raise ValueError(f"{path}:{n}: empty {'query' if not qid else 'document'} id")
        try:
            relevance = int(rel)
        except ValueError:
            raise ValueError(f"{path}:{n}: relevance {rel!r} is not an integer") from None
        if (qid, doc) in first_line:
            raise ValueError(f"{path}:{n}: query {qid!r}, document {doc!r} judged again "
                             f"(first on line {first_line[qid, doc]})")
        first_line[qid, doc] = n
        qrels.setdefault(qid, {})[doc] = relevance
    if not qrels:
        raise ValueError(f"{path}: no judgments")
    return qrels


# ----------------------------------------------------------------------------------------------------------------
# Measures, search, run files


def parse_metrics(names: Sequence[str] | None, depth: int) -> list:
    """ir-measures `Measure`s from their names ("R@10", "RR@10", "nDCG@10", "AP", ...), duplicates dropped.

    None gives `DEFAULT_METRICS` without those whose cutoff exceeds `depth` (R@100 needs depth >= 100).

    Raises:
      ImportError: ir-measures is not installed.
      ValueError: an unknown name, or a named measure whose cutoff exceeds `depth` (it would read a truncated run).
    """
    irm = require_ir_measures()
    if names is None:
        defaults = [irm.parse_measure(n) for n in DEFAULT_METRICS]
        return [m for m in defaults if m.params.get("cutoff", 0) <= depth]
    measures = []
    for name in names:
        try:
            measure = irm.parse_measure(name)
        except (NameError, ValueError) as e:
            raise ValueError(f"unknown measure {name!r} ({e}); use ir-measures names, e.g. R@10 RR@10 nDCG@10 "
                             f"AP") from None
        cutoff = measure.params.get("cutoff")
        if cutoff is not None and cutoff > depth:
            raise ValueError(f"measure {measure} needs the top {cutoff}, but the depth is {depth}; "
                             f"raise --depth")
        if measure not in measures:
            measures.append(measure)
    if not measures:
        raise ValueError("no measures")
    return measures


def _check_trec_token(what: str, value: str) -> None:
    if not value or value != "".join(value.split()):
        raise ValueError(f"{what} {value!r} is empty or holds whitespace, which a TREC run file cannot carry")


def write_trec_run(path: str, run: Mapping[str, Sequence[Hit]], tag: str = "retribert_jax") -> None:
    """Writes `qid Q0 docid rank score tag` lines (rank from 1, in the given order; score as Python's repr, which
    reads back to the same float), atomically.

    Raises:
      ValueError: a query id, doc id or tag that is empty or holds whitespace.
    """
    from retribert_jax.io import atomic_file

    _check_trec_token("tag", tag)
    lines = []
    for qid, hits in run.items():
        _check_trec_token("query id", qid)
        for rank, h in enumerate(hits, 1):
            doc = id_string(h.id)
            _check_trec_token(f"query {qid!r}: doc id", doc)
            lines.append(f"{qid} Q0 {doc} {rank} {float(h.score)!r} {tag}\n")
    with atomic_file(path, "wb") as f:
        f.write("".join(lines).encode("utf-8"))


def compute_metrics(run: Mapping[str, Sequence[Hit]], qrels: Mapping[str, Mapping[str, int]],
                    metrics: Sequence[str] | None = None, *, depth: int = 100
                    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The measures of a run, averaged over the queries that are in both the run and the qrels, by ir-measures.

    Args:
      run: query id -> hits, best first (the scores are what the measures sort by).
      qrels: query id -> {doc id: integer relevance}; relevance >= 1 is relevant, the gain of nDCG is the relevance.
      metrics: ir-measures names (default `DEFAULT_METRICS` up to `depth`).
      depth: the run's depth, which bounds the measures' cutoffs.

    Returns:
      ({measure name: mean over the judged queries}, {query id: {measure name: value}}), names as ir-measures
      prints them ("MRR@10" comes back as "RR@10").

    Raises:
      ValueError: a doc id twice in one query's hits (as strings), or no query of the run has qrels.
    """
    irm = require_ir_measures()
    measures = parse_metrics(metrics, depth)
    judged = [qid for qid in run if qid in qrels]
    if not judged:
        raise ValueError(f"no query of the run has qrels (ids compared as strings; run ids such as "
                         f"{list(run)[:3]}, qrels ids such as {list(qrels)[:3]})")
    docs = []
    for qid in judged:
        seen = set()
        for h in run[qid]:
            doc = id_string(h.id)
            if doc in seen:
                raise ValueError(f"query {qid!r}: doc id {doc!r} is retrieved twice; the index's ids must be unique "
                                 f"(as strings) for evaluation")
            seen.add(doc)
            docs.append(irm.ScoredDoc(qid, doc, float(h.score)))
    # ir-measures averages over every query of the qrels it is given (absent ones score 0); trec_eval's default,
    # kept here, is the queries of both.
    results = irm.evaluator(measures, {qid: dict(qrels[qid]) for qid in judged}).calc(docs)
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in judged}
    for metric in results.per_query:
        per_query[metric.query_id][str(metric.measure)] = float(metric.value)
    aggregate = {str(m): float(results.aggregated[m]) for m in measures}
    return aggregate, {qid: {str(m): per_query[qid][str(m)] for m in measures} for qid in judged}


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The outcome of `evaluate`.

    Attributes:
      metrics: measure name -> mean over the judged queries, in the order asked for.
      per_query: query id -> {measure name: value}, judged queries only.
      run: query id -> hits (best first, at most `depth`), judged queries only.
      skipped_queries: ids of queries without any qrels line (not searched, not counted).
      unmatched_qrels: qrels query ids with no query in the queries (ignored).
      depth: hits retrieved per query.
    """

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: dict[str, list[Hit]]
    skipped_queries: list[str]
    unmatched_qrels: list[str]
    depth: int

    @property
    def num_queries(self) -> int:
        return len(self.run)

    def to_dict(self, per_query: bool = True) -> dict[str, Any]:
        d = {"metrics": self.metrics, "num_queries": self.num_queries, "depth": self.depth,
             "skipped_queries": len(self.skipped_queries), "unmatched_qrels": len(self.unmatched_qrels)}
        if per_query:
            d["per_query"] = self.per_query
        return d

    def table(self) -> str:
        width = max(len(m) for m in self.metrics)
        rows = [f"{'measure':<{width}}  value", *(f"{m:<{width}}  {v:.4f}" for m, v in self.metrics.items())]
        return "\n".join(rows)


def evaluate(index: Index, encoder, queries: str | Mapping[str, str], qrels: str | Mapping[str, Mapping[str, int]],
             *, depth: int = 100, metrics: Sequence[str] | None = None, batch_size: int | None = None,
             max_length: int = 128, skip_bad_lines: bool = False, show_progress: bool = False) -> Evaluation:
    """Encodes the judged queries, retrieves the top `depth` passages of each and measures the run with ir-measures.

    Args:
      index: an `Index` of passages, embedded by `encoder`'s model (its architecture and weights are checked).
      encoder: a `retribert_jax.encode.Encoder`; queries go through `encode_questions`, L2-normalised when the index
        is, and are scored by inner product (float32).
      queries: a queries file (see `read_queries`) or {query id: text}.
      qrels: a qrels file (see `read_qrels`) or {query id: {doc id: relevance}}.
      depth: passages retrieved per query.
      metrics: ir-measures names; default R@1, R@5, R@10, R@100 (when depth >= 100), RR@10 (averaged: MRR@10) and
        nDCG@10.
      batch_size, max_length: for `encode_questions` (max_length in tokens, [CLS] and [SEP] included).
      skip_bad_lines: passed to `read_queries`.
      show_progress: a tqdm bar while encoding.

    Returns:
      An `Evaluation`.

    Raises:
      ImportError: ir-measures is missing (the message gives the pip command).
      ValueError: bad inputs (see `read_queries`, `read_qrels`, `parse_metrics`, `compute_metrics`), or no query
        with qrels.
    """
    require_ir_measures()
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    parse_metrics(metrics, depth)  # bad names fail before any encoding
    if isinstance(queries, str):
        queries = read_queries(queries, skip_bad_lines=skip_bad_lines)
    if isinstance(qrels, str):
        qrels = read_qrels(qrels)
    index.check_model(encoder)
    judged = [qid for qid in queries if qid in qrels]
    if not judged:
        raise ValueError(f"no query has qrels (ids compared as strings; query ids such as {list(queries)[:3]}, "
                         f"qrels ids such as {list(qrels)[:3]})")
    q = encoder.encode_questions([queries[qid] for qid in judged], batch_size=batch_size, max_length=max_length,
                                 show_progress_bar=show_progress, normalize=index.manifest["normalized"])  # Q P
    run = dict(zip(judged, index.search_embeddings(q, depth), strict=True))
    aggregate, per_query = compute_metrics(run, qrels, metrics, depth=depth)
    return Evaluation(metrics=aggregate, per_query=per_query, run=run,
                      skipped_queries=[qid for qid in queries if qid not in qrels],
                      unmatched_qrels=[qid for qid in qrels if qid not in queries], depth=depth)
