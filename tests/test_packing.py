"""The packed-array builder on its own: token ids in, the model's row arrays out, checked against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from retribert_jax.packing import TokenIds, build_batch, pack_rows, texts_per_row


def loop_reference(ids: list[list[int]], rows: list[list[int]], num_rows: int, length: int, pad: int):
    """The arrays written text by text, token by token: what build_batch must equal."""
    slots = texts_per_row(length)
    input_ids, mask = np.full((num_rows, length), pad, np.int32), np.zeros((num_rows, length), np.int32)
    positions, cls_index = np.zeros((num_rows, length), np.int32), np.zeros((num_rows, slots), np.int32)
    text_index = np.full((num_rows, slots), -1, np.int64)
    for r, row in enumerate(rows):
        start = 0
        for j, i in enumerate(row):
            for p, token in enumerate(ids[i]):
                input_ids[r, start + p], mask[r, start + p], positions[r, start + p] = token, 1, p
            cls_index[r, j], text_index[r, j] = start, i
            start += len(ids[i])
    mask[len(rows) :, 0] = 1
    return input_ids, mask, positions, cls_index, text_index


@pytest.mark.parametrize("seed", range(5))
def test_build_batch_equals_the_loop(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.choice([16, 32, 64]))
    ids = [[2, *rng.integers(5, 100, size=int(rng.integers(0, length - 2))).tolist(), 3] for _ in range(40)]
    token_ids = TokenIds.from_lists(ids)
    assert [token_ids.ids(i) for i in range(len(ids))] == ids
    rows = pack_rows(token_ids.lengths, length, texts_per_row(length))
    chosen = rows[: int(rng.integers(1, len(rows) + 1))]
    num_rows = len(chosen) + int(rng.integers(0, 3))
    got = build_batch(token_ids, chosen, num_rows, length, pad_token_id=0)
    want = loop_reference(ids, chosen, num_rows, length, 0)
    for name, g, w in zip(
        ("input_ids", "attention_mask", "position_ids", "cls_index", "text_index"),
        (got.input_ids, got.attention_mask, got.position_ids, got.cls_index, got.text_index),
        want,
        strict=True,
    ):
        np.testing.assert_array_equal(g, w, err_msg=name)
        assert g.dtype == w.dtype, f"{name}: {g.dtype}, expected {w.dtype}"


def test_concatenated_token_ids_keep_every_text():
    a, b = TokenIds.from_lists([[1, 2], [3]]), TokenIds.from_lists([[], [4, 5, 6]])
    both = TokenIds.concatenate([a, b])
    assert [both.ids(i) for i in range(len(both))] == [[1, 2], [3], [], [4, 5, 6]]
    assert both.lengths.tolist() == [2, 1, 0, 3] and len(TokenIds.concatenate([])) == 0


def test_build_batch_refuses_what_does_not_fit():
    ids = TokenIds.from_lists([[2, 7, 3]] * 4)
    with pytest.raises(ValueError, match="do not fit a batch of 1"):
        build_batch(ids, [[0], [1]], 1, 16, 0)
    with pytest.raises(ValueError, match="hold at most 2"):
        build_batch(ids, [[0, 1, 2]], 1, 16, 0)
    long = TokenIds.from_lists([[2, *range(10, 18), 3]] * 2)
    with pytest.raises(ValueError, match="more than 16 tokens"):
        build_batch(long, [[0, 1]], 1, 16, 0)


def best_fit_reference(lengths, row_length, max_per_row):
    """Best-fit decreasing, spelled out: each text (longest first, ties in input order) goes to an open row with the
    least room that holds it, found by scanning every room size upward (the latest row to reach that room first),
    else to a new row."""
    rows, by_room = [], {room: [] for room in range(row_length + 1)}
    smallest = min(lengths, default=1)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n, r = lengths[i], None
        for room in range(n, row_length + 1):
            if by_room[room]:
                r = by_room[room].pop()
                break
        if r is None:
            rows.append([])
            r, room = len(rows) - 1, row_length
        rows[r].append(i)
        if len(rows[r]) < max_per_row and room - n >= smallest:
            by_room[room - n].append(r)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_pack_rows_is_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 200))).tolist()
    got = pack_rows(lengths, 64, texts_per_row(64))
    assert got == best_fit_reference(lengths, 64, texts_per_row(64))


def test_token_buffer_grows_chunk_by_chunk():
    from retribert_jax.packing import TokenBuffer

    rng = np.random.default_rng(0)
    chunks = [
        [rng.integers(0, 99, size=int(rng.integers(0, 9))).tolist() for _ in range(int(rng.integers(1, 900)))]
        for _ in range(12)
    ]
    buffer = TokenBuffer()
    for chunk in chunks:
        buffer.append(TokenIds.from_lists(chunk))
    everything = [ids for chunk in chunks for ids in chunk]
    view = buffer.view()
    assert len(view) == len(everything) and [view.ids(i) for i in range(len(view))] == everything
