"""Packed rows: several texts per row of one length, each seeing only its own tokens with its own positions.

A pure layer between token ids and the model's inputs, with no model and no device: `pack_rows` decides which texts
share a row (best-fit decreasing), `build_batch` writes one batch's arrays from the token ids with vectorised numpy.
The model reads such rows as HF's packed-sequence convention has them (`modeling`: `position_ids` restarting at 0
where each text starts, `cls_index` naming each text's [CLS]); `encode.Encoder` drives the two.

Token ids travel as `TokenIds`: one flat int32 array and each text's offset into it, so that a batch is gathered
with a few numpy operations rather than a Python loop per text or token.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np


def texts_per_row(length: int) -> int:
    """The most texts one packed row of `length` tokens holds: the last layer and the pooler compute this many
    [CLS] rows per packed row whether filled or not, so it stays a small fraction (1/8) of the row's tokens."""
    return max(1, length // 8)


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Token ids of N texts, unpadded: text i is `flat[offsets[i]:offsets[i + 1]]`.

    Attributes:
      flat: int32 [T], every text's ids one after another.
      offsets: int64 [N + 1], where each text starts in `flat` (and `T` last).
    """

    flat: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]]) -> TokenIds:
        """From one list of ids per text (as `tokenizers`' `Encoding.ids` gives them)."""
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenIds]) -> TokenIds:
        """The texts of `parts`, in order, as one `TokenIds`."""
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        starts = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        offsets = np.concatenate(
            [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)]
        )
        return cls(np.concatenate([p.flat for p in parts]), offsets)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N], tokens per text."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self, i: int) -> list[int]:
        """Text i's ids as a list."""
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()


class TokenBuffer:
    """Token ids that grow chunk by chunk (a job tokenized in chunks), in buffers grown geometrically so that each
    token is copied O(1) times; `view()` is the `TokenIds` of every text so far."""

    def __init__(self):
        self._flat, self._offsets = np.empty(1 << 16, np.int32), np.zeros(1 << 10, np.int64)
        self._tokens = self._texts = 0

    def append(self, chunk: TokenIds) -> None:
        tokens, texts = self._tokens + len(chunk.flat), self._texts + len(chunk)
        self._flat, self._offsets = _grown(self._flat, tokens), _grown(self._offsets, texts + 1)
        self._flat[self._tokens : tokens] = chunk.flat
        self._offsets[self._texts + 1 : texts + 1] = chunk.offsets[1:] + self._tokens
        self._tokens, self._texts = tokens, texts

    def view(self) -> TokenIds:
        return TokenIds(self._flat[: self._tokens], self._offsets[: self._texts + 1])


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    if size <= len(a):
        return a
    out = np.empty(max(size, 2 * len(a)), a.dtype)
    out[: len(a)] = a
    return out


def pack_rows(lengths: Sequence[int] | np.ndarray, row_length: int, max_per_row: int) -> list[list[int]]:
    """Packs texts into rows: best-fit decreasing (each text, longest first, goes to the open row it leaves the
    least room in, or starts a new row), the bin-packing heuristic that Krell et al. (2021, "Efficient Sequence
    Packing without Cross-contamination") pair with per-sequence attention masks and positions for BERT.

    Args:
      lengths: tokens of each text, each in [1, row_length].
      row_length: tokens a row holds.
      max_per_row: texts a row holds at most.

    Returns:
      The rows in the order they were opened (longest texts first), each a list of indices into `lengths`; every
      index appears exactly once. Depends only on `lengths` and the limits (ties keep input order).

    Raises:
      ValueError: a length is outside [1, row_length].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > row_length):
        raise ValueError(f"text lengths must be in [1, {row_length}], got {lengths.min()}..{lengths.max()}")
    rows: list[list[int]] = []
    open_rows: list[list[int]] = [[] for _ in range(row_length + 1)]  # rows with room for more, by free tokens
    room: list[int] = []  # the free-token counts that have open rows, ascending
    smallest = int(lengths.min()) if len(lengths) else 1
    order = np.argsort(-lengths, kind="stable")
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        k = bisect.bisect_left(room, n)  # the tightest open row that holds the text
        if k < len(room):
            free = room[k]
            r = open_rows[free].pop()
            if not open_rows[free]:
                del room[k]
        else:
            r, free = len(rows), row_length
            rows.append([])
        rows[r].append(i)
        free -= n
        if len(rows[r]) < max_per_row and free >= smallest:
            if not open_rows[free]:
                bisect.insort(room, free)
            open_rows[free].append(r)
    return rows


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One batch of packed rows, the model's inputs and where each output goes.

    Attributes:
      input_ids, attention_mask, position_ids: int32 [R, L]; positions restart at 0 where each text starts.
      cls_index: int32 [R, S], S = `texts_per_row(L)`: the position of each text's [CLS] in its row (0 for empty
        slots).
      text_index: int64 [R, S], the text (an index into the job's texts) each [CLS] slot embeds; -1: none.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    cls_index: np.ndarray
    text_index: np.ndarray


def build_batch(
    token_ids: TokenIds, rows: Sequence[Sequence[int]], num_rows: int, length: int, pad_token_id: int
) -> PackedBatch:
    """The arrays of one batch of packed rows, with vectorised numpy.

    Args:
      token_ids: the job's token ids (`rows` index its texts).
      rows: the texts of each row, in the order they sit in the row (as `pack_rows` returns them); at most
        `num_rows` rows of at most `texts_per_row(length)` texts and `length` tokens each.
      num_rows: rows in the batch; rows past `len(rows)` are padding, which attends to its first token only so
        that every row is well defined (its outputs are dropped: `text_index` is -1 there).
      length: tokens per row.
      pad_token_id: the id of padding tokens.

    Returns:
      A `PackedBatch` of `num_rows` rows.

    Raises:
      ValueError: more rows than `num_rows`, or a row over its token or text limit.
    """
    slots = texts_per_row(length)
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    counts = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    if len(counts) and counts.max() > slots:
        raise ValueError(f"a row holds {counts.max()} texts; rows of {length} tokens hold at most {slots}")
    text = np.fromiter((i for r in rows for i in r), np.int64, count=int(counts.sum()))  # row-major texts
    row_of = np.repeat(np.arange(len(rows)), counts)
    first = np.cumsum(counts) - counts  # each row's first text, in `text`
    slot_of = np.arange(len(text)) - np.repeat(first, counts)
    start = token_ids.offsets[text]
    n = token_ids.offsets[text + 1] - start  # tokens per placed text
    stream_start = np.cumsum(n) - n  # where each text starts in the stream of the rows' tokens, row after row
    row_tokens = np.bincount(row_of, weights=n, minlength=len(rows)).astype(np.int64)
    if len(rows) and row_tokens.max() > length:
        raise ValueError(f"a row holds more than {length} tokens")
    row_base = np.cumsum(row_tokens) - row_tokens
    start_in_row = stream_start - row_base[row_of]

    input_ids = np.full((num_rows, length), pad_token_id, np.int32)
    position_ids = np.zeros((num_rows, length), np.int32)
    cls_index = np.zeros((num_rows, slots), np.int32)
    text_index = np.full((num_rows, slots), -1, np.int64)
    # Each row's tokens are the next stretch of the stream, from its first column: a boolean mask of the filled
    # cells takes the stream in row-major order, so one gather and two masked stores write every token.
    filled = np.arange(length) < row_tokens[:, None]  # [rows, length]
    token = np.arange(int(row_tokens.sum()))  # T, in stream order
    input_ids[: len(rows)][filled] = token_ids.flat[token + np.repeat(start - stream_start, n)]
    position_ids[: len(rows)][filled] = token - np.repeat(stream_start, n)
    attention_mask = np.zeros((num_rows, length), np.int32)
    attention_mask[: len(rows)] = filled
    cls_index[row_of, slot_of] = start_in_row
    text_index[row_of, slot_of] = text
    attention_mask[len(rows) :, 0] = 1
    return PackedBatch(input_ids, attention_mask, position_ids, cls_index, text_index)
