"""Hard-negative mining: for each training pair, the passages of an index that rank high for its question but are not
its answer, written back into the pair as `negatives`.

A question may be written on several rows, one per positive passage (sentence-transformers' format for several
positives): as in sentence-transformers, rows whose questions are the same text (here after whitespace
normalisation, which the model cannot see) are one question, every row's answer is a positive of it, and all its
rows are mined alike. "The question's positives" below are all of them, across the whole input.

The filters are those of sentence-transformers' `mine_hard_negatives` (`util/hard_negatives.py`), over one ranking:
1. The index's hits for the question, best first, with the question's positives removed (a hit whose text equals one
   of their answers after whitespace normalisation, or whose id equals one of their `positive_id_field` values,
   compared as strings) and any passage whose normalised text already appeared higher up removed (a corpus may hold
   a passage twice; it is one negative). Rank 0 is the best hit left.
2. The rank window [range_min, range_max). Unlike sentence-transformers, which skips its `range_min` candidates after
   the score filters, both bounds here are ranks of this list, so whether a passage is eligible depends on its own
   rank and score alone. range_max defaults to range_min + num_negatives, or range_min + 10 * num_negatives when a
   score filter is set (sentence-transformers' defaults).
3. The score filters, with sentence-transformers' inequalities, `positive` being the lowest inner product of the
   question's embedding with its positives' (`encode_passages`, truncated as the index was; the lowest, as
   sentence-transformers takes, "to be on the safe side"): a candidate is dropped when
   `score + absolute_margin > positive`, `score > positive * (1 - relative_margin)` (meant for positive scores, as
   with a normalised index), `score > max_score` or `score < min_score`.
4. The first num_negatives candidates left ("top" sampling).
The index is searched as deep as the window needs: when removing positives and duplicates leaves fewer than
range_max candidates, the query is searched again twice as deep.

A pair that ends with fewer negatives than asked keeps them (possibly none) and is counted: the filters run short on
the hard questions (a crowded neighbourhood, or a positive the model scores low), so dropping such pairs would shrink
the training set and take the hard ones out of it, while in-batch negatives still train them. `drop_incomplete`
drops them instead (sentence-transformers' "n-tuple" output does so).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from retribert_jax.corpus import open_input
from retribert_jax.embedding_dir import id_string
from retribert_jax.io import file_sha256
from retribert_jax.pairs import PairFields, check_pair_row, read_pair_rows
from retribert_jax.search import Hit, Index

FILTERS = ("absolute_margin", "relative_margin", "max_score", "min_score")
# Extra hits fetched beyond the window: room for the positive and a duplicate or two before a deeper search is needed.
SLACK = 4
# Pairs encoded and searched per call inside a chunk: the progress bar moves per step, memory stays small.
STEP = 1024
PARTS_FORMAT = "retribert_jax.mined"


def normalize_whitespace(text: str) -> str:
    """`text` with every run of whitespace turned into one space and none at either end."""
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """Which hits become negatives (see the module docstring for the order the filters apply in).

    Attributes:
      num_negatives: negatives per pair (at most).
      range_min, range_max: the window of ranks (0-based, positives and duplicates removed) negatives come from.
      max_score, min_score: bounds on a negative's inner product with the question.
      absolute_margin, relative_margin: how far below the question's lowest positive score a negative must be.
      positive_id_field: the row key holding the positive's id in the index, for rows that have it.
      include_scores: also write `negative_scores` and `positive_score` (float inner products; the positive score
        is the row's own answer's).
    """

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    positive_id_field: str | None = None
    include_scores: bool = False

    def __post_init__(self):
        if self.num_negatives <= 0:
            raise ValueError(f"num_negatives must be positive, got {self.num_negatives}")
        # NaN passes every comparison below and then filters nothing; an infinite bound means no bound (None).
        for name in ("max_score", "min_score", "absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r} (leave it out for no bound)")
        if self.range_min < 0:
            raise ValueError(f"range_min must be >= 0, got {self.range_min}")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(f"range_max ({self.range_max}) must exceed range_min ({self.range_min})")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.max_score is not None and self.min_score is not None and self.min_score > self.max_score:
            raise ValueError(f"min_score ({self.min_score}) exceeds max_score ({self.max_score})")

    @property
    def window_end(self) -> int:
        """range_max, or its default."""
        if self.range_max is not None:
            return self.range_max
        filtered = any(getattr(self, name) is not None for name in FILTERS)
        return self.range_min + self.num_negatives * (10 if filtered else 1)

    @property
    def needs_positive_score(self) -> bool:
        return self.absolute_margin is not None or self.relative_margin is not None or self.include_scores

    def rejects(self, score: float, positive: float | None) -> str | None:
        """The first filter that drops a candidate with this score, or None."""
        if self.absolute_margin is not None and score + self.absolute_margin > positive:
            return "absolute_margin"
        if self.relative_margin is not None and score > positive * (1 - self.relative_margin):
            return "relative_margin"
        if self.max_score is not None and score > self.max_score:
            return "max_score"
        if self.min_score is not None and score < self.min_score:
            return "min_score"
        return None


@dataclasses.dataclass
class MiningStats:
    """Counts over the mined pairs.

    Attributes:
      pairs: pairs mined (dropped ones included).
      negatives: negatives written.
      incomplete: pairs that got fewer than num_negatives.
      dropped: incomplete pairs left out of the output (`drop_incomplete`).
      with_positive_id: pairs that carried `positive_id_field`.
      window: candidates inside the rank window, over all pairs.
      skipped: filter name -> candidates of the window it dropped (each counted under the first filter that drops it).
      already_complete: `mine_file` found `out` made by this very run (the counts are that run's).
    """

    pairs: int = 0
    negatives: int = 0
    incomplete: int = 0
    dropped: int = 0
    with_positive_id: int = 0
    window: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    already_complete: bool = False  # `mine_file` found this very run finished: nothing was mined

    def add(self, other: MiningStats) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("skipped", "already_complete"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for name, n in other.skipped.items():
            self.skipped[name] = self.skipped.get(name, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Mined:
    """The output rows (input keys kept, `negatives` and `negative_ids` set) and their counts."""

    rows: list[dict[str, Any]]
    stats: MiningStats


def check_index(index: Index, model) -> None:
    """Refuses an index without stored texts, of questions, or embedded by another model than `model` (a model or an
    Encoder; see `Index.check_model`)."""
    index.check_model(model)
    if not index.manifest["has_text"]:
        raise ValueError(
            f"{index.directory}: holds no passage texts; mining writes negatives as text, so embed the "
            f"corpus again with `retribert-jax embed ... --store-text`"
        )


@dataclasses.dataclass
class Positives:
    """Everything that is a positive of one question: its answers (first seen first, one per normalised text) and
    the ids given for them (as strings)."""

    answers: list[str] = dataclasses.field(default_factory=list)
    ids: set[str] = dataclasses.field(default_factory=set)
    _texts: set[str] = dataclasses.field(default_factory=set, repr=False)  # the answers, normalised

    def add(self, row: Mapping[str, Any], positive_id_field: str | None) -> None:
        text = normalize_whitespace(row["answer"])
        if text not in self._texts:
            self._texts.add(text)
            self.answers.append(row["answer"])
        if positive_id_field is not None and positive_id_field in row:
            self.ids.add(id_string(row[positive_id_field]))


def question_key(question: str) -> str:
    """What makes two rows one question: the same text after whitespace normalisation."""
    return normalize_whitespace(question)


def shared_positives(
    rows: Callable[[], Iterable[Mapping[str, Any]]], positive_id_field: str | None
) -> dict[str, Positives]:
    """The positives of every question asked on more than one row, by `question_key`, in two passes over `rows`
    (a callable giving them again): a question's rows may lie anywhere in a file mined chunk by chunk. Only hashes
    are kept for the questions asked once (the most of a large file)."""
    counts = collections.Counter(hash(question_key(r["question"])) for r in rows())
    shared: dict[str, Positives] = {}
    for r in rows():
        key = question_key(r["question"])
        if counts[hash(key)] > 1:  # a hash collision only makes a group of one row
            shared.setdefault(key, Positives()).add(r, positive_id_field)
    return shared


def _candidates(hits: Sequence[Hit], positives: Positives) -> list[Hit]:
    """The hits, best first, without the question's positives and without passages whose normalised text came
    higher up."""
    seen = set(positives._texts)
    out = []
    for h in hits:
        text = normalize_whitespace(h.text)
        if text in seen or id_string(h.id) in positives.ids:
            continue
        seen.add(text)
        out.append(h)
    return out


def _search_deep(index: Index, q: np.ndarray, positives: list[Positives], depth: int) -> list[list[Hit]]:
    """Each query's candidates, at least `depth` of them unless the index runs out: searched `depth` + SLACK deep,
    then twice as deep for the queries whose positives and duplicates took too many hits."""
    out: list[list[Hit] | None] = [None] * len(positives)
    todo = list(range(len(positives)))
    k = min(len(index), depth + SLACK + max(len(p.answers) for p in positives) - 1)
    while todo:
        results = index.search_embeddings(q[todo], k)
        short = []
        for i, hits in zip(todo, results, strict=True):
            cands = _candidates(hits, positives[i])
            if len(cands) < depth and k < len(index):
                short.append(i)
            else:
                out[i] = cands
        todo, k = short, min(len(index), 2 * k)
    return out


def _row_positives(
    rows: Sequence[Mapping[str, Any]], shared: Mapping[str, Positives], key: str | None
) -> list[Positives]:
    """Each row's question's positives: the shared ones of a question asked on several rows, else the row's own."""
    out = []
    for r in rows:
        own = Positives()
        own.add(r, key)
        out.append(shared.get(question_key(r["question"]), own))
    return out


def _positive_scores(
    encoder,
    q: np.ndarray,
    rows: Sequence[Mapping[str, Any]],
    positives: list[Positives],
    batch_size: int | None,
    max_length: int,
    normalize: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(each row's own answer's score, the lowest score of its question's positives), float [N] each."""
    texts = list(dict.fromkeys([r["answer"] for r in rows] + [a for p in positives for a in p.answers]))
    # Truncated as the index's passages were, so that the positives' scores are comparable with theirs.
    emb = encoder.encode_passages(texts, batch_size=batch_size, max_length=max_length, normalize=normalize)  # T P
    row_of = {t: i for i, t in enumerate(texts)}
    own = np.array([q[i] @ emb[row_of[r["answer"]]] for i, r in enumerate(rows)])  # N
    lowest = np.array([min(q[i] @ emb[row_of[a]] for a in p.answers) for i, p in enumerate(positives)])  # N
    return own, lowest


def _mine(
    index: Index,
    encoder,
    rows: Sequence[Mapping[str, Any]],
    cfg: MiningConfig,
    batch_size: int | None,
    max_length: int,
    shared: Mapping[str, Positives],
) -> Mined:
    questions = [r["question"] for r in rows]
    key = cfg.positive_id_field
    stats = MiningStats(pairs=len(rows), with_positive_id=sum(key is not None and key in r for r in rows))
    if not rows:
        return Mined([], stats)
    positives = _row_positives(rows, shared, key)
    normalize = index.manifest["normalized"]
    q = encoder.encode_questions(questions, batch_size=batch_size, max_length=max_length, normalize=normalize)  # N P
    own = lowest = None
    if cfg.needs_positive_score:
        own, lowest = _positive_scores(encoder, q, rows, positives, batch_size, index.manifest["max_length"], normalize)
    candidates = _search_deep(index, q, positives, cfg.window_end)
    out = []
    for i, row in enumerate(rows):
        pos = None if lowest is None else float(lowest[i])
        window = candidates[i][cfg.range_min : cfg.window_end]
        chosen = []
        for h in window:
            reason = cfg.rejects(h.score, pos)
            if reason is not None:
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
            elif len(chosen) < cfg.num_negatives:
                chosen.append(h)
        stats.window += len(window)
        stats.negatives += len(chosen)
        stats.incomplete += len(chosen) < cfg.num_negatives
        mined = {**row, "negatives": [h.text for h in chosen], "negative_ids": [h.id for h in chosen]}
        if cfg.include_scores:
            mined["negative_scores"] = [h.score for h in chosen]
            mined["positive_score"] = float(own[i])
        out.append(mined)
    return Mined(out, stats)


def mine_hard_negatives(
    index: Index,
    encoder,
    rows: Sequence[Mapping[str, Any]],
    *,
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    positive_id_field: str | None = None,
    include_scores: bool = False,
    batch_size: int | None = None,
    max_length: int = 128,
) -> Mined:
    """Hard negatives for (question, answer) rows from an index of passages (see the module docstring).

    Args:
      index: an `Index` embedded with `--store-text` by `encoder`'s model (its config hash is checked).
      encoder: a `retribert_jax.encode.Encoder`; questions go through `encode_questions`, answers (for the positive
        score) through `encode_passages`, L2-normalised when the index is; scores are float32 inner products.
      rows: mappings with string "question" and "answer" (the positive passage); other keys are copied through.
        Rows with the same question (whitespace aside) are one question whose positives are all their answers.
      num_negatives, range_min, range_max, max_score, min_score, absolute_margin, relative_margin,
        positive_id_field, include_scores: see `MiningConfig`.
      batch_size, max_length: for `encode_questions` (max_length in tokens); answers use the index's max_length.

    Returns:
      `Mined`: one output row per input row, in order, each with "negatives" (passage texts, best first) and
      "negative_ids" (their ids in the index, as stored), replacing any such keys of the input; and the counts.

    Raises:
      ValueError: a row without string question/answer, a bad setting, or an index without texts, of questions, or
        of another architecture.
    """
    cfg = MiningConfig(
        num_negatives=num_negatives,
        range_min=range_min,
        range_max=range_max,
        max_score=max_score,
        min_score=min_score,
        absolute_margin=absolute_margin,
        relative_margin=relative_margin,
        positive_id_field=positive_id_field,
        include_scores=include_scores,
    )
    check_index(index, encoder)
    for i, row in enumerate(rows):
        check_pair_row(row, f"row {i}")
    return _mine(index, encoder, rows, cfg, batch_size, max_length, shared_positives(lambda: rows, positive_id_field))


# ----------------------------------------------------------------------------------------------------------------
# Files: JSONL in, JSONL out, in resumable chunks


def _count_rows(path: str) -> int:
    with open_input(path) as f:
        return sum(1 for line in f if line.strip())


def _part(parts: str, i: int, ext: str) -> str:
    return os.path.join(parts, f"part-{i:05d}.{ext}")


def _open_parts(parts: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Makes `parts` hold this run's settings; keeps an earlier run's parts only when its settings were the same."""
    from retribert_jax.io import atomic_file

    path = os.path.join(parts, "settings.json")
    if os.path.isdir(parts) and os.listdir(parts) and not os.path.isfile(path):
        # Never remove a directory this module did not make.
        raise ValueError(f"{parts}: exists and is not an unfinished `retribert-jax mine` run; move it away")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); remove {parts} to start again") from None
        if old == settings:
            return
        if not overwrite:
            diff = ", ".join(
                f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in sorted(settings.items()) if old.get(k) != v
            )
            raise ValueError(
                f"{parts}: holds an unfinished run with other settings ({diff}); pass --overwrite to start again"
            )
    if os.path.exists(parts):
        shutil.rmtree(parts)
    os.makedirs(parts)
    with atomic_file(path, "wb") as f:
        f.write(json.dumps(settings, indent=2, sort_keys=True).encode("utf-8"))


def _write_part(parts: str, i: int, rows: list[dict[str, Any]], stats: MiningStats) -> None:
    from retribert_jax.io import atomic_file

    # The rows file marks the part done, so it is renamed into place after its counts.
    with atomic_file(_part(parts, i, "stats.json"), "wb") as f:
        f.write(json.dumps(stats.to_dict()).encode("utf-8"))
    with atomic_file(_part(parts, i, "jsonl"), "wb") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _read_part_stats(parts: str, i: int) -> MiningStats:
    with open(_part(parts, i, "stats.json"), encoding="utf-8") as f:
        return MiningStats(**json.load(f))


def mine_file(
    index: Index,
    encoder,
    pairs: str,
    out: str,
    config: MiningConfig | None = None,
    *,
    chunk_size: int = 10_000,
    drop_incomplete: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    max_length: int = 128,
    model_name: str | None = None,
    show_progress: bool = True,
    fields: PairFields | None = None,
) -> MiningStats:
    """Mines a JSONL pairs file into a JSONL file `retribert-jax train` reads, resumably.

    The pairs are mined `chunk_size` at a time into `{out}.parts/part-NNNNN.jsonl` (each written atomically); a rerun
    with the same settings skips the parts that exist. Once all exist they are joined into `out` (atomically),
    `{out}.parts` is removed and the run's settings and counts are kept beside `out` (`io.job_record`), so that a
    rerun of the same run returns them (`already_complete`) instead of refusing `out`.

    Args:
      index, encoder: as for `mine_hard_negatives`.
      pairs: a training-pairs file (`pairs.read_pair_rows`: JSONL, CSV, TSV or parquet; ours, Tevatron's or
        sentence-transformers' fields, or `fields`); blank lines are skipped. Rows are written in our shape.
      out: the output JSONL: each row with all its keys, plus "negatives" and "negative_ids".
      config: the filters (default: `MiningConfig()`).
      chunk_size: pairs per part (the work a kill can lose).
      drop_incomplete: leave out pairs with fewer than `config.num_negatives` negatives (they are kept by default).
      overwrite: replace an existing `out`, and discard an unfinished run with other settings.
      batch_size, max_length: for `encode_questions`.
      model_name: recorded in the run's settings, so that a resume with another checkpoint of the same architecture
        is refused.
      show_progress: a tqdm bar over the pairs.

    Returns:
      The counts over all pairs.

    Raises:
      FileExistsError: `out` exists and `overwrite` is False.
      FileNotFoundError: no such pairs file.
      ValueError: a bad line (file:line named), no pairs, or an unfinished run with other settings.
    """
    from tqdm.auto import tqdm

    from retribert_jax.io import atomic_file, check_overwrite, job_record

    config = config or MiningConfig()
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not os.path.isfile(pairs):
        raise FileNotFoundError(f"{pairs}: no such pairs file")
    check_index(index, encoder)
    parts = out + ".parts"
    settings = {
        "format": PARTS_FORMAT,
        "version": 1,
        "pairs_sha256": file_sha256(pairs),
        "index": os.path.abspath(index.directory),
        "index_config_hash": index.manifest["config_hash"],
        "index_count": len(index),
        "model": model_name,
        "config": dataclasses.asdict(config),
        "chunk_size": chunk_size,
        "drop_incomplete": drop_incomplete,
        "max_length": max_length,
        "fields": dataclasses.asdict(fields or PairFields()),
    }
    record = job_record(out)
    if os.path.isfile(out) and not overwrite and os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("settings") == settings:
            return MiningStats(**{**done["stats"], "already_complete": True})
    check_overwrite(out, overwrite)
    _open_parts(parts, settings, overwrite)
    shared = shared_positives(lambda: (row for _, row in read_pair_rows(pairs, fields)), config.positive_id_field)
    stats = MiningStats()
    # The bar is closed (its line ended) before an error propagates, so the error is the last line on the screen.
    with tqdm(total=_count_rows(pairs), unit="pair", desc="mining", disable=not show_progress) as bar:
        num_parts = 0
        rows = read_pair_rows(pairs, fields)
        while chunk := [row for _, row in itertools.islice(rows, chunk_size)]:
            i, num_parts = num_parts, num_parts + 1
            if os.path.isfile(_part(parts, i, "jsonl")):  # done by an earlier run
                stats.add(_read_part_stats(parts, i))
                bar.update(len(chunk))
                continue
            kept, part_stats = [], MiningStats()
            for s in range(0, len(chunk), STEP):
                mined = _mine(index, encoder, chunk[s : s + STEP], config, batch_size, max_length, shared)
                part_stats.add(mined.stats)
                for row in mined.rows:
                    if drop_incomplete and len(row["negatives"]) < config.num_negatives:
                        part_stats.dropped += 1
                    else:
                        kept.append(row)
                bar.update(len(mined.rows))
            _write_part(parts, i, kept, part_stats)
            stats.add(part_stats)
    if num_parts == 0:
        shutil.rmtree(parts)  # holds the settings alone: nothing to resume
        raise ValueError(f"{pairs}: no question/answer pairs")
    with atomic_file(out, "wb") as f:
        for i in range(num_parts):
            with open(_part(parts, i, "jsonl"), "rb") as part:
                shutil.copyfileobj(part, f)
    with atomic_file(record, "w") as f:
        json.dump({"settings": settings, "stats": stats.to_dict()}, f)
    shutil.rmtree(parts)
    return stats
