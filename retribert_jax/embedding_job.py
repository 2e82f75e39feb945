"""The resumable embedding job: records in, an embedding directory (`embedding_dir`) out. `retribert-jax embed` and
`search.build_index` both run it.

Records are read as a stream and cut into shards of `shard_size`; a shard is embedded in pieces of `piece_size`
records, one `Encoder.encode_passages` (or `encode_questions`) call each, and every finished piece is kept on disk
(`embedding_dir.write_piece`), so that an interrupted run (Ctrl-C, `kill -9`, a lost machine) loses one piece at
most. When a shard's pieces are all there they become its files and are removed: the finished directory is the same
whatever the interruptions, byte for byte, because a piece's boundaries depend only on the shard and the piece size.

Under `jax.distributed` process p embeds shards p, p + P, ... into the same directory, and process 0 writes the
manifest once every shard exists.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from retribert_jax import embedding_dir

# Records per piece (the most an interruption loses) by platform: on a CPU ~1 minute of RetriBERT-base; an
# accelerator embeds that many in well under a second, so it keeps progress less often and calls the Encoder with
# enough texts to fill its pipeline.
PIECE_SIZE = {"cpu": 1024}
ACCELERATOR_PIECE_SIZE = 16384


class NoRecords(ValueError):
    """The input held no record to embed (empty, or every line skipped as bad)."""


@dataclasses.dataclass
class EmbedResult:
    """What `embed_corpus` did.

    Attributes:
      manifest: the finished directory's manifest (None on processes other than 0 of a multi-process run).
      count: records in the input.
      embedded: records this run embedded (this process's).
      resumed: records found finished by an earlier run (shards and pieces, this process's).
      already_complete: the directory held this very job, finished; nothing was done.
      seconds: wall time of the embedding loop.
    """

    manifest: dict[str, Any] | None
    count: int
    embedded: int = 0
    resumed: int = 0
    already_complete: bool = False
    seconds: float = 0.0


def run_settings(
    encoder,
    *,
    kind: str,
    model: str,
    max_length: int,
    normalize: bool,
    dtype: str,
    shard_size: int,
    store_text: bool,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What makes two runs the same run: the model (name, architecture, weights, how it runs), what was embedded and
    how it is stored, and `source` (what the caller knows of its input: a file's SHA-256, format and fields)."""
    from retribert_jax.params import weights_fingerprint

    cfg, run = encoder.config, encoder.model.run_config
    return {
        "model": model,
        "config_hash": cfg.architecture_hash(),
        "weights_fingerprint": weights_fingerprint(encoder.model),
        "compute_dtype": run.dtype,
        "precision": run.precision,
        "kind": kind,
        "dtype": dtype,
        "max_length": max_length,
        "projection_dim": cfg.projection_dim,
        "normalized": bool(normalize),
        "shard_size": shard_size,
        "has_text": bool(store_text),
        **(source or {}),
    }


def embed_corpus(
    encoder,
    records: Iterable[tuple[Any, str]],
    directory: str,
    *,
    kind: str = "passages",
    model: str = "",
    source: dict[str, Any] | None = None,
    shard_size: int = 100_000,
    piece_size: int | None = None,
    batch_size: int | None = None,
    max_length: int = 128,
    normalize: bool = False,
    dtype: str = "float32",
    store_text: bool = False,
    overwrite: bool = False,
    total: int | None = None,
    show_progress: bool = False,
    wait_timeout: float = 3600.0,
) -> EmbedResult:
    """Embeds records into `directory`, resuming what an earlier run with the same settings left there.

    Args:
      encoder: an `Encoder`; its model's name, architecture hash, weights fingerprint, compute dtype and precision
        are recorded, so that a resume, `search`, `evaluate` and `mine` with another model are refused.
      records: (id, text) in corpus order; id None means the record's 0-based number. A resumed run must give the
        same records (the caller records what identifies them in `source`).
      directory: the embedding directory (created if needed).
      kind: "passages" (document tower, `project_doc`) or "questions" (query tower, `project_query`).
      model: how the model is named in the manifest (a path or hub id).
      source: more settings that identify the run (recorded and compared; JSON values).
      shard_size: records per shard file.
      piece_size: records per kept piece (at most what an interruption loses); default `PIECE_SIZE` for JAX's
        default platform, capped at `shard_size`.
      batch_size, max_length, normalize: passed to `encoder.encode_passages` (or `encode_questions`).
      dtype: stored embeddings' dtype, "float32" or "float16".
      store_text: keep the texts beside the embeddings.
      overwrite: replace whatever embeddings the directory holds, finished or not, whatever their settings.
      total: the record count, if known, for the progress bar.
      show_progress: a tqdm bar over the records.
      wait_timeout: seconds process 0 of a multi-process run waits for the others' shards.

    Returns:
      An `EmbedResult`.

    Raises:
      NoRecords: no records (nothing is left behind).
      ValueError: a bad setting, or a directory holding embeddings with other settings.
      KeyboardInterrupt: interrupted; its message says what was kept and that rerunning resumes.
      UserError: process 0 waited `wait_timeout` for another process's shards.
    """
    import jax
    from tqdm.auto import tqdm

    from retribert_jax.errors import UserError

    if kind not in embedding_dir.KINDS:
        raise ValueError(f"kind must be one of {embedding_dir.KINDS}, got {kind!r}")
    if dtype not in embedding_dir.DTYPES:
        raise ValueError(f"dtype must be one of {embedding_dir.DTYPES}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("piece_size", piece_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    piece_size = min(shard_size, piece_size or PIECE_SIZE.get(jax.default_backend(), ACCELERATOR_PIECE_SIZE))
    settings = run_settings(
        encoder,
        kind=kind,
        model=model,
        max_length=max_length,
        normalize=normalize,
        dtype=dtype,
        shard_size=shard_size,
        store_text=store_text,
        source=source,
    )
    existed = os.path.isdir(directory)
    done = embedding_dir.start_run(directory, settings, overwrite=overwrite)
    if done is not None:
        return EmbedResult(done, done["count"], already_complete=True)
    nproc, rank = jax.process_count(), jax.process_index()
    encode = encoder.encode_passages if kind == "passages" else encoder.encode_questions
    result = EmbedResult(None, 0)
    # Whole shards and their records, and every record on disk (shards and pieces), for an interruption's report.
    shards_done = in_shards = kept = 0
    start = time.perf_counter()

    def embed_shard(i: int, shard: list[tuple[Any, str]], bar) -> None:
        nonlocal shards_done, in_shards, kept
        if i % nproc != rank:  # another process's
            bar.total = None if bar.total is None else max(bar.n, bar.total - len(shard))
            return
        if embedding_dir.shard_done(directory, i):
            result.resumed += len(shard)
            kept += len(shard)
            shards_done, in_shards = shards_done + 1, in_shards + len(shard)
            bar.update(len(shard))
            return
        # Without an id a record's id is its number; a reader that was asked for ids gives real ones.
        ids = [i * shard_size + k if rid is None else rid for k, (rid, _) in enumerate(shard)]
        texts = [t for _, t in shard]
        earlier = embedding_dir.read_pieces(directory, i)
        pieces = [emb for _, emb, _ in earlier]
        pos = sum(len(p) for p in pieces)
        result.resumed += pos
        kept += pos
        bar.update(pos)
        last = 0  # the records of the last piece, which is kept as the shard itself
        while pos < len(shard):
            end = min(pos + piece_size, len(shard))
            emb = encode(texts[pos:end], batch_size=batch_size, max_length=max_length, normalize=normalize)
            with np.errstate(over="ignore"):  # a value past float16's range: inf, which the shard's check names
                emb = emb.astype(np.dtype(dtype))
            if end < len(shard):  # the last piece becomes the shard at once
                embedding_dir.write_piece(directory, i, pos, ids[pos:end], emb, texts[pos:end] if store_text else None)
                kept += end - pos
            else:
                last = end - pos
            pieces.append(emb)
            result.embedded += end - pos
            bar.update(end - pos)
            pos = end
        # The kept pieces' ids went through JSON, as the shard's lines do: the same lines either way.
        earlier_ids = [v for piece_ids, _, _ in earlier for v in piece_ids]
        embedding_dir.write_shard(
            directory, i, earlier_ids + ids[len(earlier_ids) :], np.concatenate(pieces), texts if store_text else None
        )
        embedding_dir.remove_pieces(directory, i)
        kept += last
        shards_done, in_shards = shards_done + 1, in_shards + len(shard)

    desc = f"embedding {kind}" + (f" [{rank}/{nproc}]" if nproc > 1 else "")
    # The bar is closed (its line ended) before any error is printed, so the error is the last line on the screen.
    with tqdm(
        total=total,
        unit=kind[:-1],
        unit_scale=True,
        smoothing=0.1,
        desc=desc,
        disable=not show_progress,
        dynamic_ncols=True,
    ) as bar:
        try:
            shard: list[tuple[Any, str]] = []
            for record in records:
                shard.append(record)
                result.count += 1
                if len(shard) == shard_size:
                    embed_shard(result.count // shard_size - 1, shard, bar)
                    shard = []
            if shard:
                embed_shard(result.count // shard_size, shard, bar)
        except KeyboardInterrupt:
            in_pieces = kept - in_shards
            where = [f"{shards_done} whole shard{'s' * (shards_done != 1)}"] * bool(shards_done)
            where += [f"{in_pieces} in pieces of up to {piece_size}"] * bool(in_pieces)
            if not kept and nproc == 1:
                embedding_dir.discard_run(directory, remove_directory=not existed)
                raise KeyboardInterrupt(f"{directory}: interrupted before any {kind} were embedded") from None
            raise KeyboardInterrupt(
                f"{directory} keeps {kept} {kind} embedded"
                + (f" ({', '.join(where)})" if where else "")
                + "; rerunning the same job resumes from there"
            ) from None
        except Exception:
            # A run that fails before it keeps anything (a bad first record, a tokenizer error) leaves no trace; one
            # that kept work leaves it, with its settings, for the fixed rerun to resume.
            if not kept and nproc == 1:
                embedding_dir.discard_run(directory, remove_directory=not existed)
            raise
    result.seconds = time.perf_counter() - start
    if result.count == 0:
        embedding_dir.discard_run(directory, remove_directory=not existed)
        raise NoRecords("no records to embed (an empty input, or every line skipped as bad)")
    if rank != 0:
        return result
    num_shards = -(-result.count // shard_size)
    deadline = time.monotonic() + wait_timeout
    while missing := embedding_dir.missing_shards(directory, num_shards):
        if time.monotonic() > deadline:
            raise UserError(
                f"{directory}: shards {missing[:10]} still missing after {wait_timeout:.0f}s; "
                "rerun the same command to finish them"
            )
        time.sleep(0.5)
    result.manifest = embedding_dir.finish_run(directory, settings, result.count, num_shards)
    return result
