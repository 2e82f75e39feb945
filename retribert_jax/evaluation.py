"""Retrieval evaluation: encode queries, search an index, score the run against qrels with ir-measures (trec_eval).

Inputs:
- queries: JSONL, one `{"id": ..., "text": ...}` object a line (BEIR's `{"_id": ..., "text": ...}` too; the key is
  taken from the first line), or TSV `id<TAB>text` with or without a header line (`id`/`_id`/`qid`/`query_id`/
  `query-id` then `text`/`query`/`question`). `.jsonl`/`.json`/`.ndjson` and `.tsv` say which; any other name is
  read as JSONL when its first non-blank line starts with `{`.
- qrels: TREC (`query-id iteration doc-id relevance`, whitespace separated) or BEIR's TSV (a header line
  `query-id<TAB>corpus-id<TAB>score`, then those three columns); the first line says which. Relevance is an integer.
Both are read line by line as `corpus.read_lines` reads: a UTF-8 byte-order mark and CRLF line ends are not data,
and a gzip, bz2, xz or zstd file is read decompressed (`queries.jsonl.gz` is JSONL).

Ids are compared as strings: a JSON string id as it is, any other JSON value as its JSON text, so the index's record
numbers (ints) match the qrels' "0", "1", ... and the int 7 and the string "7" are the same document.

Which queries count (trec_eval's default, which BEIR's pytrec_eval loop follows too): only queries that have at
least one judgment, whatever its relevance, are encoded, searched and averaged over; queries without any (absent
from the qrels, or given an empty set of judgments, as a mapping may after relevance-0 lines are dropped) are
skipped and counted, and qrels for query ids absent from the queries file are ignored and counted. A judged query
with no relevant document (every judgment 0) scores 0 on every measure, as trec_eval scores it.

The measures come from ir-measures: R@k and nDCG@k from trec_eval (through pytrec_eval), RR@k from MS MARCO's
script. Both re-sort a query's documents by score and ignore the run's rank column, and they break exact score ties
differently: trec_eval by doc id descending, MS MARCO's script by doc id ascending. Equal float32 inner products come
almost only from bit-identical embeddings (duplicate passages), so this rarely matters; the run file's rank column
keeps the index's order (the lower row first).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from retribert_jax.corpus import RepeatedIds, format_extension, read_corpus, read_lines
from retribert_jax.embedding_dir import id_string
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


# ----------------------------------------------------------------------------------------------------------------
# Reading queries and qrels


def _first_line(path: str) -> str | None:
    for _, line in read_lines(path):
        if isinstance(line, str) and line.strip():
            return line
    return None


def _queries_format(path: str) -> str:
    ext = format_extension(path)
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    first = _first_line(path)
    return "jsonl" if first is not None and first.lstrip().startswith("{") else "tsv"


def _jsonl_queries(path: str, skip_bad_lines: bool, log: TextIO) -> Iterator[tuple[int, str, str]]:
    id_field = "id"
    try:
        first = json.loads(_first_line(path) or "null")
        if isinstance(first, dict) and "_id" in first:
            id_field = "_id"
    except json.JSONDecodeError:
        pass  # read_corpus reports the line
    for rec in read_corpus(
        path, "jsonl", text_field="text", id_field=id_field, skip_bad_lines=skip_bad_lines, log=log, unique_ids=False
    ):  # read_queries names a repeated query id itself
        yield rec.line, id_string(rec.id), rec.text


def _tsv_queries(path: str, skip_bad_lines: bool, log: TextIO) -> Iterator[tuple[int, str, str]]:
    for n, line in read_lines(path):
        if isinstance(line, str) and not line.strip():
            continue
        if isinstance(line, str):
            fields = line.split("\t", 1)
            if (
                n == 1
                and len(fields) == 2
                and fields[0].strip().lower() in QUERY_ID_COLUMNS
                and fields[1].strip().lower() in QUERY_TEXT_COLUMNS
            ):
                continue  # the header
            if len(fields) == 2 and fields[0]:
                yield n, fields[0], fields[1]
                continue
            line = ValueError(
                f"{path}:{n}: expected 'id<TAB>text'" + (", got no tab" if len(fields) == 1 else ", got an empty id")
            )
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
    for n, line in read_lines(path):
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
                raise ValueError(
                    f"{path}:{n}: {len(fields)} tab-separated fields, expected 3 "
                    f"(query-id, corpus-id, score) as the header says"
                )
            qid, doc, rel = (f.strip() for f in fields)
        else:
            fields = line.split()
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{n}: {len(fields)} fields, expected 4 ('query-id iteration doc-id "
                    f"relevance', TREC qrels), or a BEIR file whose first line is "
                    f"'query-id<TAB>corpus-id<TAB>score'"
                )
            qid, _, doc, rel = fields
        if not qid or not doc:
            raise ValueError(f"{path}:{n}: empty {'query' if not qid else 'document'} id")
        try:
            relevance = int(rel)
        except ValueError:
            raise ValueError(f"{path}:{n}: relevance {rel!r} is not an integer") from None
        if (qid, doc) in first_line:
            raise ValueError(
                f"{path}:{n}: query {qid!r}, document {doc!r} judged again (first on line {first_line[qid, doc]})"
            )
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
            raise ValueError(
                f"unknown measure {name!r} ({e}); use ir-measures names, e.g. R@10 RR@10 nDCG@10 AP"
            ) from None
        cutoff = measure.params.get("cutoff")
        if cutoff is not None and cutoff > depth:
            raise ValueError(f"measure {measure} needs the top {cutoff}, but the depth is {depth}; raise --depth")
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


def judged_queries(queries: Iterable[str], qrels: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The ids of `queries`, in order, that have at least one judgment (of any relevance) in `qrels`: those trec_eval
    and pytrec_eval score. A query absent from the qrels or mapped to no judgments is not among them."""
    return [qid for qid in queries if qrels.get(qid)]


def compute_metrics(
    run: Mapping[str, Sequence[Hit]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Sequence[str] | None = None,
    *,
    depth: int = 100,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The measures of a run, averaged over the queries that are in both the run and the qrels, by ir-measures.

    Args:
      run: query id -> hits, best first (the scores are what the measures sort by).
      qrels: query id -> {doc id: integer relevance}; relevance >= 1 is relevant, the gain of nDCG is the relevance.
      metrics: ir-measures names (default `DEFAULT_METRICS` up to `depth`).
      depth: the run's depth, which bounds the measures' cutoffs.

    Returns:
      ({measure name: mean over the judged queries}, {query id: {measure name: value}}), names as ir-measures
      prints them ("MRR@10" comes back as "RR@10"). A query with an empty set of judgments is not judged.

    Raises:
      ValueError: a doc id twice in one query's hits (as strings), or no query of the run has qrels.
    """
    irm = require_ir_measures()
    measures = parse_metrics(metrics, depth)
    judged = judged_queries(run, qrels)
    if not judged:
        raise ValueError(
            f"no query of the run has judgments (ids compared as strings; run ids such as "
            f"{list(run)[:3]}, qrels ids such as {list(qrels)[:3]})"
        )
    docs = []
    for qid in judged:
        seen = set()
        for h in run[qid]:
            doc = id_string(h.id)
            if doc in seen:
                raise ValueError(
                    f"query {qid!r}: doc id {doc!r} is retrieved twice; the index's ids must be unique "
                    f"(as strings) for evaluation"
                )
            seen.add(doc)
            docs.append(irm.ScoredDoc(qid, doc, float(h.score)))
    # ir-measures averages over every query of the qrels it is given (absent or unjudged ones score 0);
    # trec_eval's default, kept here, is the queries of both that have a judgment.
    results = irm.evaluator(measures, {qid: dict(qrels[qid]) for qid in judged}).calc(docs)
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in judged}
    for metric in results.per_query:
        per_query[metric.query_id][str(metric.measure)] = float(metric.value)
    aggregate = {str(m): float(results.aggregated[m]) for m in measures}
    return aggregate, {qid: {str(m): per_query[qid][str(m)] for m in measures} for qid in judged}


def judged_documents_in_index(
    index: Index, qrels: Mapping[str, Mapping[str, int]], judged: Sequence[str]
) -> tuple[int, int]:
    """(judged documents found in the index, judged documents) over the judgments of the `judged` queries, in one
    pass over the index's ids.

    Raises:
      ValueError: an id on two rows of the index (as text), which would make a hit count twice; or none of the
        judged documents in the index (every measure would be 0: the ids of the index are not the qrels' ids).
    """
    wanted = {doc for qid in judged for doc in qrels[qid]}
    found: set[str] = set()
    repeats = RepeatedIds(lambda: enumerate(index.iter_ids()))
    for row, value in enumerate(index.iter_ids()):
        first = repeats.first_position(row, value)
        if first is not None:
            raise ValueError(
                f"{index.directory}: id {id_string(value)!r} is on rows {first} and {row}; evaluation "
                f"needs unique ids (compared as text); embed the corpus again"
            )
        key = id_string(value)
        if key in wanted:
            found.add(key)
    if not found:
        sample = list(itertools.islice(index.iter_ids(), 3))
        raise ValueError(
            f"{index.directory}: none of the {len(wanted)} documents judged for the {len(judged)} "
            f"queries is in the index (ids compared as text; index ids such as {sample}, judged ids "
            f"such as {sorted(wanted)[:3]}); embed the corpus with its ids (--id-field, e.g. _id for "
            f"BEIR)"
        )
    return len(found), len(wanted)


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The outcome of `evaluate`.

    Attributes:
      metrics: measure name -> mean over the judged queries, in the order asked for.
      per_query: query id -> {measure name: value}, judged queries only.
      run: query id -> hits (best first, at most `depth`), judged queries only.
      skipped_queries: ids of queries without any judgment (not searched, not counted).
      unmatched_qrels: qrels query ids with no query in the queries (ignored).
      depth: hits retrieved per query.
      judged_documents: distinct documents judged for the evaluated queries.
      judged_documents_in_index: how many of those the index holds (the others can never be retrieved).
      identical_ids: queries that retrieved a document under their own id (dropped with `ignore_identical_ids`,
        counted either way).
    """

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: dict[str, list[Hit]]
    skipped_queries: list[str]
    unmatched_qrels: list[str]
    depth: int
    judged_documents: int = 0
    judged_documents_in_index: int = 0
    identical_ids: int = 0

    @property
    def num_queries(self) -> int:
        return len(self.run)

    def to_dict(self, per_query: bool = True) -> dict[str, Any]:
        d = {
            "metrics": self.metrics,
            "num_queries": self.num_queries,
            "depth": self.depth,
            "skipped_queries": len(self.skipped_queries),
            "unmatched_qrels": len(self.unmatched_qrels),
            "judged_documents": self.judged_documents,
            "judged_documents_in_index": self.judged_documents_in_index,
            "identical_ids": self.identical_ids,
        }
        if per_query:
            d["per_query"] = self.per_query
        return d

    def table(self) -> str:
        width = max(len(m) for m in self.metrics)
        rows = [f"{'measure':<{width}}  value", *(f"{m:<{width}}  {v:.4f}" for m, v in self.metrics.items())]
        return "\n".join(rows)


def evaluate(
    index: Index,
    encoder,
    queries: str | Mapping[str, str],
    qrels: str | Mapping[str, Mapping[str, int]],
    *,
    depth: int = 100,
    metrics: Sequence[str] | None = None,
    batch_size: int | None = None,
    max_length: int = 128,
    skip_bad_lines: bool = False,
    show_progress: bool = False,
    ignore_identical_ids: bool = False,
) -> Evaluation:
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
      ignore_identical_ids: BEIR's rule (`EvaluateRetrieval.evaluate`, on by default there) for datasets whose
        queries are also documents under the same id (Quora, ArguAna, CQADupStack): a hit whose id equals its
        query's id (as text) is dropped. As BEIR's exact search does, the top `depth` + 1 are retrieved, the
        identical one dropped, and the first `depth` left kept; the qrels are left as they are.

    Returns:
      An `Evaluation`.

    Raises:
      ImportError: ir-measures is missing (the message gives the pip command).
      ValueError: bad inputs (see `read_queries`, `read_qrels`, `parse_metrics`, `compute_metrics`), no query
        with judgments, no judged document in the index, or an id on two rows of the index.
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
    judged = judged_queries(queries, qrels)
    if not judged:
        raise ValueError(
            f"no query has judgments (ids compared as strings; query ids such as {list(queries)[:3]}, "
            f"qrels ids such as {list(qrels)[:3]})"
        )
    in_index, judged_docs = judged_documents_in_index(index, qrels, judged)
    q = encoder.encode_questions(
        [queries[qid] for qid in judged],
        batch_size=batch_size,
        max_length=max_length,
        show_progress_bar=show_progress,
        normalize=index.manifest["normalized"],
    )  # Q P
    # An id names one row (checked above), so one hit at most is dropped: depth + 1 is deep enough.
    found = index.search_embeddings(q, depth + 1 if ignore_identical_ids else depth)
    identical = sum(any(id_string(h.id) == qid for h in hits[:depth]) for qid, hits in zip(judged, found, strict=True))
    if ignore_identical_ids:
        found = [[h for h in hits if id_string(h.id) != qid][:depth] for qid, hits in zip(judged, found, strict=True)]
    run = dict(zip(judged, found, strict=True))
    aggregate, per_query = compute_metrics(run, qrels, metrics, depth=depth)
    return Evaluation(
        metrics=aggregate,
        per_query=per_query,
        run=run,
        skipped_queries=[qid for qid in queries if not qrels.get(qid)],
        unmatched_qrels=[qid for qid in qrels if qid not in queries],
        depth=depth,
        judged_documents=judged_docs,
        judged_documents_in_index=in_index,
        identical_ids=identical,
    )
