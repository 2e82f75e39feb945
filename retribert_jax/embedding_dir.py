"""The embedding directory that `retribert-jax embed` writes and `search`, `evaluate` and `mine` read.

Layout: shard i holds records [i * shard_size, (i + 1) * shard_size) of the input, as
  - `embeddings-{i:05d}.npy`: float32 or float16 [n, projection_dim];
  - `ids-{i:05d}.jsonl`: one JSON value per line, the record's id (or its 0-based record number);
  - `texts-{i:05d}.jsonl` (when the run stored texts): one JSON string per line;
and `manifest.json` (the run's settings, `num_shards` and `count`) once every shard exists. A compressed copy
(`quantization`) adds per shard `int8-{i:05d}.npy` (int8 [n, projection_dim]) or `binary-{i:05d}.npy` (uint8
[n, projection_dim / 8]), and the manifest's `compressed` key says which exist (with their calibration). While a
run is unfinished, `.embed-settings.json` holds its settings, so that a resume with other settings is refused
before any work, and a shard being embedded keeps its finished pieces (consecutive runs of its records) as hidden
`.piece-*.npz` files, so that an interrupted run loses at most one piece; they become the shard's files once the
shard is whole.

Each file is written under a temporary name and renamed, the embeddings last, so a shard whose embeddings file exists
is complete. Everything about this layout (names, keys, checks) lives in this module.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retribert_jax import quantization
from retribert_jax.io import atomic_file

MANIFEST = "manifest.json"
RUN_SETTINGS = ".embed-settings.json"
FORMAT = "retribert_jax.embeddings"
VERSION = 1
DTYPES = ("float32", "float16")
KINDS = ("passages", "questions")  # the manifest's `kind`: which tower and projection embedded the rows
# How an embedding directory can be searched (`search.Index`): exact top-k in JAX, or faiss' IndexFlatIP.
BACKENDS = ("jax", "faiss")
# What the jax backend scans: the float rows (exact), or a compressed copy for a shortlist (`quantization`).
SCANS = ("float", *quantization.FORMS)
# The manifest's keys and their types (a run's settings plus num_shards and count; a few more are informational).
MANIFEST_KEYS = {
    "format": str,
    "version": int,
    "model": str,
    "config_hash": str,
    "kind": str,
    "dtype": str,
    "max_length": int,
    "projection_dim": int,
    "normalized": bool,
    "shard_size": int,
    "num_shards": int,
    "count": int,
    "has_text": bool,
}
# Keys that manifests written before them lack: checked when present.
#   weights_fingerprint: `params.weights_fingerprint` of the model that embedded the rows;
#   compute_dtype, precision: how that model ran (`config.RunConfig`; precision None is JAX's default).
#   compressed: {form: {...}} for each compressed copy written (`write_compressed`); int8 holds its "ranges",
#     binary its "centers" (`calibration`) and the names of its rotation's and decoder's files, "rotation" and
#     "decoder" (`binary_matrix`; a copy written before rotations was thresholded at the mean unrotated, and one
#     written before decoders decodes with the diagonal one).
OPTIONAL_KEYS = {"weights_fingerprint": str, "compute_dtype": str, "precision": (str, type(None)), "compressed": dict}
CODE_DTYPES = {"int8": np.dtype(np.int8), "binary": np.dtype(np.uint8)}  # a compressed copy's dtype, by form
# Every file name a run writes, by pattern: what `--overwrite` may remove (and nothing else).
_OWN_FILES = (
    "embeddings-*.npy",
    "int8-*.npy",
    "binary-*.npy",
    "ids-*.jsonl",
    "texts-*.jsonl",
    MANIFEST,
    RUN_SETTINGS,
    ".piece-*",
    ".*.tmp-*",
)


def shard_paths(directory: str, i: int) -> dict[str, str]:
    """The three files of shard i: {"embeddings", "ids", "texts"} -> path."""
    return {
        name: os.path.join(directory, f"{name}-{i:05d}.{ext}")
        for name, ext in (("embeddings", "npy"), ("ids", "jsonl"), ("texts", "jsonl"))
    }


def shard_done(directory: str, i: int) -> bool:
    """Whether shard i is complete (its embeddings file, written last, exists)."""
    return os.path.isfile(shard_paths(directory, i)["embeddings"])


def id_string(value: Any) -> str:
    """The string an id is compared as: a JSON string as it is, any other JSON value as its JSON text (7 -> "7").
    The qrels of `evaluate` and a TREC run carry ids as text, so two ids are one exactly when these strings are."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _write_lines(path: str, values: Sequence[Any]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        for v in values:
            f.write(json.dumps(v, ensure_ascii=False, default=str) + "\n")


def write_shard(
    directory: str, i: int, ids: Sequence[Any], embeddings: np.ndarray, texts: Sequence[str] | None = None
) -> None:
    """Writes shard i: ids, texts (if given), then the embeddings file that marks it complete.

    Args:
      directory: the embedding directory.
      i: the shard number.
      ids: one JSON-serialisable id per row.
      embeddings: [len(ids), projection_dim] in the run's stored dtype.
      texts: the rows' texts, or None.

    Raises:
      ValueError: counts that disagree, or a row that is not finite (NaN, or too large for float16), naming the
        ids of such rows.
    """
    if len(ids) != embeddings.shape[0] or (texts is not None and len(texts) != len(ids)):
        raise ValueError(
            f"shard {i}: {len(ids)} ids, {embeddings.shape[0]} embeddings"
            + ("" if texts is None else f", {len(texts)} texts")
        )
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        # A NaN row is never found by a search and spoils every measure: an index must not hold one.
        names = ", ".join(json.dumps(ids[r], ensure_ascii=False, default=str) for r in bad[:5])
        raise ValueError(
            f"{directory}: the model gave {bad.size} record(s) NaN or infinite embeddings (in the stored "
            f"dtype {embeddings.dtype}), ids {names}{', ...' if bad.size > 5 else ''}; are its weights "
            f"damaged (retribert-jax verify MODEL)? shard {i} was not written"
        )
    paths = shard_paths(directory, i)
    _write_lines(paths["ids"], ids)
    if texts is not None:
        _write_lines(paths["texts"], texts)
    with atomic_file(paths["embeddings"], "wb") as f:
        np.save(f, embeddings, allow_pickle=False)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); remove it or use another directory") from None


def _own_files(directory: str) -> list[str]:
    return sorted({p for pattern in _OWN_FILES for p in glob.glob(os.path.join(directory, pattern))})


def _has_work(directory: str) -> bool:
    """Whether an unfinished run left anything worth keeping: a finished shard or piece."""
    return bool(glob.glob(os.path.join(directory, "embeddings-*.npy")) or _piece_files(directory))


def start_run(directory: str, settings: dict[str, Any], *, overwrite: bool = False) -> dict[str, Any] | None:
    """Opens `directory` for a run with these settings.

    A finished run with the same settings is this run (nothing to do). An unfinished one with the same settings is
    resumed. One with other settings that finished no shard nor piece held nothing to protect (a run that failed on
    its first record, say) and is discarded; otherwise other settings are refused, unless `overwrite`, which removes
    the embedding files (and only those) first.

    Returns:
      The manifest when the directory already holds this very run, finished; else None, after recording the
      settings (a resumed run finds them and goes on).

    Raises:
      ValueError: the directory holds embeddings made with other settings (named, with both values).
      NotADirectoryError: `directory` is a file.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    for name in (MANIFEST, RUN_SETTINGS):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        old = _read_json(path) if not overwrite else {}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if not diff and name == MANIFEST:
            return old
        if diff and not overwrite and (name == MANIFEST or _has_work(directory)):
            desc = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
            what = "embeddings" if name == MANIFEST else "an unfinished run's embeddings"
            raise ValueError(
                f"{directory}: holds {what} made with other settings ({desc}); use another OUT or "
                f"pass --overwrite to replace them"
            )
        if diff:
            for own in _own_files(directory):
                os.remove(own)
        break
    os.makedirs(directory, exist_ok=True)
    with atomic_file(os.path.join(directory, RUN_SETTINGS), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    return None


def _piece_files(directory: str, shard: int | None = None) -> list[str]:
    pattern = ".piece-*.npz" if shard is None else f".piece-{shard:05d}-*.npz"
    return sorted(glob.glob(os.path.join(directory, pattern)))


def write_piece(
    directory: str,
    shard: int,
    start: int,
    ids: Sequence[Any],
    embeddings: np.ndarray,
    texts: Sequence[str] | None = None,
) -> None:
    """Keeps rows [start, start + len(ids)) of an unfinished shard as one hidden file (one write, one flush).

    Args:
      shard: the shard number; start: the first row's position inside the shard.
      ids, embeddings, texts: as for `write_shard` (ids and texts are kept as JSON, so that the shard written from
        the pieces later is the one `write_shard` would write from the values themselves).
    """
    if len(ids) != embeddings.shape[0] or (texts is not None and len(texts) != len(ids)):
        raise ValueError(f"shard {shard} piece at {start}: {len(ids)} ids, {embeddings.shape[0]} embeddings")
    end = start + len(ids)
    arrays = {
        "embeddings": embeddings,
        "ids": np.array([json.dumps(v, ensure_ascii=False, default=str) for v in ids], dtype=str),
    }
    if texts is not None:
        arrays["texts"] = np.array(list(texts), dtype=str)
    with atomic_file(os.path.join(directory, f".piece-{shard:05d}-{start:09d}-{end:09d}.npz"), "wb") as f:
        np.savez(f, **arrays)


def read_pieces(directory: str, shard: int) -> list[tuple[list[Any], np.ndarray, list[str] | None]]:
    """The finished pieces of `shard` that continue each other from its first row, in row order, each as (ids,
    embeddings, texts or None). A piece that does not continue them (left by a run with another piece size) is
    ignored; it is removed with the others when the shard is written."""
    out, pos = [], 0
    spans = {}
    for path in _piece_files(directory, shard):
        _, _, start, end = os.path.basename(path)[:-4].split("-")
        spans[int(start)] = path
    while pos in spans:
        with np.load(spans[pos], allow_pickle=False) as z:
            ids = [json.loads(v) for v in z["ids"].tolist()]
            out.append((ids, z["embeddings"], z["texts"].tolist() if "texts" in z.files else None))
        pos += len(ids)
    return out


def remove_pieces(directory: str, shard: int) -> None:
    """Removes a shard's pieces once the shard is written."""
    for path in _piece_files(directory, shard):
        os.remove(path)


def discard_run(directory: str, *, remove_directory: bool) -> None:
    """Forgets a run that produced nothing (its recorded settings), and, with `remove_directory` (the run made it),
    its directory if that is left empty."""
    path = os.path.join(directory, RUN_SETTINGS)
    if os.path.isfile(path):
        os.remove(path)
    if remove_directory and os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)


def missing_shards(directory: str, num_shards: int) -> list[int]:
    """The shards of [0, num_shards) not complete yet."""
    return [i for i in range(num_shards) if not shard_done(directory, i)]


def finish_run(directory: str, settings: dict[str, Any], count: int, num_shards: int) -> dict[str, Any]:
    """Writes the manifest once every shard is complete (the caller checked), removes the run's settings and the
    temporary files of killed runs (nothing is writing any more). Returns the manifest.

    Raises:
      ValueError: count is 0: an index of nothing would only fail later, where the cause is no longer visible.
    """
    if count == 0:
        raise ValueError(
            f"{directory}: no records were embedded (the input holds none, or every line was skipped); nothing to write"
        )
    for tmp in glob.glob(os.path.join(directory, ".*.tmp-*")) + _piece_files(directory):
        os.remove(tmp)
    manifest = {**settings, "format": FORMAT, "version": VERSION, "num_shards": num_shards, "count": count}
    with atomic_file(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.remove(os.path.join(directory, RUN_SETTINGS))
    return manifest


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a finished embedding directory, checked key by key.

    Raises:
      FileNotFoundError: no directory, or no manifest (an unfinished run).
      ValueError: a manifest that is not valid JSON, lacks a key, has a wrong type, format, version or dtype.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such index directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {directory} a finished `retribert-jax embed` output?")
    m = _read_json(path)
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, typ in MANIFEST_KEYS.items():
        if key not in m:
            raise ValueError(f"{path}: key {key!r} is missing")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise ValueError(f"{path}: key {key!r} should be {typ.__name__}, got {m[key]!r}")
    if m["format"] != FORMAT:
        raise ValueError(f"{path}: format is {m['format']!r}, expected {FORMAT!r}")
    if m["version"] != VERSION:
        raise ValueError(f"{path}: version {m['version']} is not supported (expected {VERSION})")
    for key, typ in OPTIONAL_KEYS.items():
        if key in m and not isinstance(m[key], typ):
            raise ValueError(f"{path}: key {key!r} has the wrong type ({m[key]!r})")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype {m['dtype']!r} is neither float32 nor float16")
    if m["count"] <= 0:
        raise ValueError(f"{path}: the index holds no {m['kind']} (count {m['count']}); embed a non-empty corpus")
    return m


def open_shards(directory: str, manifest: dict[str, Any]) -> list[np.ndarray]:
    """Every shard's embeddings, memory-mapped, each checked against the manifest (shape, dtype, row count).

    Raises:
      FileNotFoundError: a shard is missing.
      ValueError: a shard that is not a .npy file or disagrees with the manifest, named.
    """
    m, shards = manifest, []
    for i in range(m["num_shards"]):
        path = shard_paths(directory, i)["embeddings"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: shard {i} of {m['num_shards']} is missing")
        try:
            emb = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy file ({e})") from None
        if emb.ndim != 2 or emb.shape[1] != m["projection_dim"]:
            raise ValueError(f"{path}: shape {emb.shape}, expected [n, {m['projection_dim']}]")
        if emb.dtype != np.dtype(m["dtype"]):
            raise ValueError(f"{path}: dtype {emb.dtype}, but the manifest says {m['dtype']}")
        expected = min(m["shard_size"], m["count"] - i * m["shard_size"])
        if emb.shape[0] != expected:
            raise ValueError(f"{path}: {emb.shape[0]} rows, expected {expected}")
        shards.append(emb)
    total = sum(s.shape[0] for s in shards)
    if total != m["count"]:
        raise ValueError(f"{os.path.join(directory, MANIFEST)}: count {m['count']}, but the shards hold {total}")
    return shards


class Lines:
    """Random access to the JSON values of one ids or texts file, by row, through byte offsets found on first use."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        self._offsets: np.ndarray | None = None

    def _index(self) -> np.ndarray:
        if self._offsets is None:
            offsets = [0]
            with open(self.path, "rb") as f:
                for line in f:
                    offsets.append(offsets[-1] + len(line))
            if len(offsets) - 1 != self.count:
                raise ValueError(f"{self.path}: {len(offsets) - 1} lines, expected {self.count}")
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    def __iter__(self) -> Iterator[Any]:
        """Every row's value, in order, read sequentially."""
        with open(self.path, "rb") as f:
            for r, line in enumerate(f):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{r + 1}: not valid JSON ({e})") from None

    def get(self, rows: Sequence[int]) -> list[Any]:
        """The values of these rows (0-based, in this file), in the order given."""
        offsets = self._index()
        out = []
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(int(offsets[r]))
                line = f.read(int(offsets[r + 1] - offsets[r]))
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{r + 1}: not valid JSON ({e})") from None
        return out


def row_files(directory: str, manifest: dict[str, Any], name: str) -> list[Lines]:
    """Per shard, random access to its `name` file ("ids" or "texts").

    Raises:
      FileNotFoundError: a shard's file is missing, named with its shard (checked here, when the index opens,
        rather than at the first search that reads it).
    """
    m, files = manifest, []
    for i in range(m["num_shards"]):
        path = shard_paths(directory, i)[name]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the {name} of shard {i} of {m['num_shards']} are missing")
        files.append(Lines(path, min(m["shard_size"], m["count"] - i * m["shard_size"])))
    return files


def code_path(directory: str, i: int, form: str) -> str:
    """The file of shard i's compressed copy in `form` ("int8" or "binary")."""
    return os.path.join(directory, f"{form}-{i:05d}.npy")


CALIBRATION = {"int8": "ranges", "binary": "centers"}  # the manifest's key for each form's calibration
DECODER = "binary-decoder.npy"  # the binary copy's least-squares decoder, float32 [D, D]
ROTATION = "binary-rotation.npy"  # the binary copy's rotation before the signs are taken, float32 [D, D]


def calibration(manifest: dict[str, Any], form: str) -> np.ndarray:
    """A compressed copy's calibration from the manifest: float32 [2, D]."""
    return np.asarray(manifest["compressed"][form][CALIBRATION[form]], np.float32)


def write_compressed(directory: str, forms: Sequence[str], *, overwrite: bool = False) -> dict[str, Any]:
    """Writes compressed copies of a finished embedding directory's shards and records them in the manifest.

    The int8 ranges, or the binary centers, rotation and decoder, are calibrated on the whole corpus first
    (`quantization`), recorded in the manifest under "compressed" (`{"int8": {"ranges": [2, D]}, "binary":
    {"centers": [2, D], "rotation": "binary-rotation.npy", "decoder": "binary-decoder.npy"}}`), then every shard
    is encoded (another pass); each file is written atomically, the manifest last, so an interrupted run leaves the
    directory as it was plus files that the next run writes again. A form already recorded is kept as it is unless
    `overwrite`.

    Args:
      directory: a finished `retribert-jax embed` output.
      forms: any of "int8", "binary".

    Returns:
      The updated manifest.

    Raises:
      ValueError: an unknown form, or a binary copy of a width that is not a multiple of 8.
    """
    manifest = read_manifest(directory)
    done = dict(manifest.get("compressed", {}))
    for form in forms:
        if form not in quantization.FORMS:
            raise ValueError(f"unknown compressed form {form!r}; choose from {', '.join(quantization.FORMS)}")
        if form in done and not overwrite:
            continue
        shards = open_shards(directory, manifest)
        if form == "binary" and manifest["projection_dim"] % 8:
            raise ValueError(
                f"{directory}: binary codes need a width that is a multiple of 8, the index's is "
                f"{manifest['projection_dim']}"
            )
        fit = quantization.int8_ranges(shards) if form == "int8" else quantization.binary_centers(shards)
        record: dict[str, Any] = {CALIBRATION[form]: fit.tolist()}
        rotation = None
        if form == "binary":
            rotation = quantization.binary_rotation(shards, fit)
            for key, name, matrix in (
                ("rotation", ROTATION, rotation),
                ("decoder", DECODER, quantization.binary_decoder(shards, fit, rotation)),
            ):
                with atomic_file(os.path.join(directory, name), "wb") as f:
                    np.save(f, matrix, allow_pickle=False)
                record[key] = name
        for i, shard in enumerate(shards):
            with atomic_file(code_path(directory, i, form), "wb") as f:
                np.save(f, quantization.encode(shard, form, fit, rotation), allow_pickle=False)
        done[form] = record
    if done != manifest.get("compressed", {}) or overwrite:
        manifest = {**manifest, "compressed": done}
        with atomic_file(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
    return manifest


def binary_matrix(directory: str, manifest: dict[str, Any], key: str) -> np.ndarray | None:
    """One of the binary copy's matrices, float32 [D, D]: its "decoder" (`quantization.binary_decoder`) or its
    "rotation" (`quantization.binary_rotation`); None for a copy written before them (it decodes with the diagonal
    decoder; its codes are unrotated).

    Raises:
      FileNotFoundError: the recorded file is missing.
      ValueError: a file that is not a float32 [D, D] .npy (named).
    """
    name = manifest["compressed"]["binary"].get(key)
    if name is None:
        return None
    path = os.path.join(directory, name)
    hint = f"write it again with `retribert-jax compress {directory} --forms binary --overwrite`"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the binary copy's {key} is missing; {hint}")
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy file ({e}); {hint}") from None
    dim = manifest["projection_dim"]
    if matrix.dtype != np.float32 or matrix.shape != (dim, dim):
        raise ValueError(f"{path}: {matrix.dtype} {matrix.shape}, a {key} is float32 ({dim}, {dim}); {hint}")
    return matrix


def open_codes(directory: str, manifest: dict[str, Any], form: str) -> list[np.ndarray]:
    """Every shard's compressed copy in `form`, memory-mapped and checked against the manifest.

    Raises:
      ValueError: the manifest records no such copy, or a file of another dtype, shape or row count (named).
      FileNotFoundError: a recorded copy's file is missing.
    """
    if form not in manifest.get("compressed", {}):
        have = ", ".join(manifest.get("compressed", {})) or "none"
        raise ValueError(
            f"{directory}: holds no {form} copy (it has: {have}); write one with "
            f"`retribert-jax compress {directory} --forms {form}`"
        )
    if CALIBRATION[form] not in manifest["compressed"][form]:
        raise ValueError(
            f"{directory}: its {form} copy records no {CALIBRATION[form]!r}; write it again with "
            f"`retribert-jax compress {directory} --forms {form} --overwrite`"
        )
    width = manifest["projection_dim"] if form == "int8" else manifest["projection_dim"] // 8
    out = []
    for i in range(manifest["num_shards"]):
        path = code_path(directory, i, form)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: shard {i}'s {form} copy is missing; write it again with "
                f"`retribert-jax compress {directory} --forms {form} --overwrite`"
            )
        try:
            codes = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy file ({e})") from None
        rows = min(manifest["shard_size"], manifest["count"] - i * manifest["shard_size"])
        if codes.dtype != CODE_DTYPES[form]:
            raise ValueError(f"{path}: dtype {codes.dtype}, a {form} copy is {CODE_DTYPES[form]}")
        if codes.shape != (rows, width):
            raise ValueError(f"{path}: shape {codes.shape}, expected ({rows}, {width})")
        out.append(codes)
    return out
