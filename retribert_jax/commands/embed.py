"""`retribert-jax embed`: a corpus (text, JSONL, TSV, parquet) -> a directory of embedding shards and a manifest.

Shard i holds input records [i * shard_size, (i + 1) * shard_size): `embeddings-{i:05d}.npy`, `ids-{i:05d}.jsonl`
and, with --store-text, `texts-{i:05d}.jsonl`. Each file is written under a temporary name and renamed, the
embeddings last, so a shard whose embeddings file exists is complete; a rerun of the same command skips it. Under
`jax.distributed` (--coordinator/--num-processes/--process-id) process p embeds shards p, p + P, ... into the same
OUT, and process 0 writes `manifest.json` once every shard exists.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

HELP = "embed a corpus of passages or questions into a directory of fixed-size shards with a manifest (resumable)"

MANIFEST = "manifest.json"
RUN_SETTINGS = ".embed-settings.json"  # the settings of an unfinished run, so that a resume with others fails early


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a RetriBERT checkpoint directory (HF or Flax) or hub id")
    p.add_argument("input", metavar="INPUT", help="plain text (one passage a line), .jsonl, .tsv (with a header) "
                                                  "or .parquet")
    p.add_argument("out", metavar="OUT", help="output directory of shards and manifest.json")
    p.add_argument("--kind", choices=("passages", "questions"), required=True,
                   help="passages go through the document encoder and project_doc, questions through the query ones")
    p.add_argument("--format", choices=("text", "jsonl", "tsv", "parquet"), help="input format (default: from the "
                                                                                 "extension)")
    p.add_argument("--text-field", default="text", help="JSON key / column of the text (default: %(default)s)")
    p.add_argument("--id-field", help="JSON key / column of the id (default: 0-based record numbers)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="log bad lines (invalid JSON or UTF-8, missing field) and go on instead of stopping")
    p.add_argument("--shard-size", type=int, default=100_000, help="records per shard (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward call (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="truncation length in tokens (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype the embeddings are stored in (default: %(default)s)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="matmul dtype (default: %(default)s)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--store-text", action="store_true", help="also write texts-NNNNN.jsonl beside each shard")
    p.add_argument("--compilation-cache", metavar="DIR", help="turn on JAX's persistent compilation cache in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address; turns on jax.distributed")
    g.add_argument("--num-processes", type=int, help="number of processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--wait-timeout", type=float, default=3600.0,
                   help="seconds process 0 waits for the other processes' shards (default: %(default)s)")


def shard_paths(out: str, i: int) -> dict[str, str]:
    return {name: os.path.join(out, f"{name}-{i:05d}.{ext}")
            for name, ext in (("embeddings", "npy"), ("ids", "jsonl"), ("texts", "jsonl"))}


def _write_lines(path: str, values) -> None:
    from retribert_jax.io import atomic_file

    with atomic_file(path, "w") as f:
        for v in values:
            f.write(json.dumps(v, ensure_ascii=False, default=str) + "\n")


def _write_shard(out: str, i: int, ids: list, texts: list[str] | None, emb) -> None:
    import numpy as np

    from retribert_jax.io import atomic_file

    paths = shard_paths(out, i)
    _write_lines(paths["ids"], ids)
    if texts is not None:
        _write_lines(paths["texts"], texts)
    # The embeddings file marks the shard complete, so it is renamed into place last.
    with atomic_file(paths["embeddings"], "wb") as f:
        np.save(f, emb, allow_pickle=False)


def _file_sha256(path: str) -> str:
    """The input's content hash: a resumed run must embed the very records the first run numbered into shards."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _check_settings(out: str, settings: dict) -> dict | None:
    """The finished manifest when OUT already holds this very run; raises when OUT holds a different one."""
    for name in (MANIFEST, RUN_SETTINGS):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); remove it or use another OUT") from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{out}: holds embeddings made with other settings ({desc}); use another OUT")
        if name == MANIFEST:
            return old
    return None


def run(args: argparse.Namespace) -> int:
    for name in ("shard_size", "batch_size", "max_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    distributed = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        raise ValueError("--coordinator, --num-processes and --process-id go together")

    import jax

    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.cli import UserError
    from retribert_jax.corpus import count_records, detect_format, read_corpus
    from retribert_jax.encode import Encoder
    from retribert_jax.io import atomic_file

    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such input file")
    fmt = args.format or detect_format(args.input)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"{args.out}: exists and is not a directory")
    model_name = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    model = RetriBertModel.from_pretrained(args.model, dtype=jnp.dtype(args.compute_dtype))
    tokenizer = RetriBertTokenizer.from_pretrained(args.model)
    settings = {"format": "retribert_jax.embeddings", "version": 1, "model": model_name,
                "config_hash": model.config.architecture_hash(), "kind": args.kind, "dtype": args.dtype,
                "max_length": args.max_length, "projection_dim": model.config.projection_dim,
                "normalized": bool(args.normalize), "shard_size": args.shard_size, "has_text": bool(args.store_text),
                "input_sha256": _file_sha256(args.input), "input_format": fmt, "text_field": args.text_field,
                "id_field": args.id_field, "skip_bad_lines": bool(args.skip_bad_lines)}
    done = _check_settings(args.out, settings)
    if done is not None:
        print(f"{args.out}: already complete ({done['count']} {args.kind} in {done['num_shards']} shards)",
              file=sys.stderr)
        return 0
    os.makedirs(args.out, exist_ok=True)
    with atomic_file(os.path.join(args.out, RUN_SETTINGS), "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)

    encoder = Encoder(model, tokenizer, dtype=jnp.dtype(args.compute_dtype),
                      compilation_cache_dir=args.compilation_cache)
    nproc, rank = jax.process_count(), jax.process_index()
    out_dtype = np.dtype(args.dtype)
    total = count_records(args.input, fmt)
    bar = tqdm(total=total, unit=args.kind[:-1], desc=f"embedding {args.kind}" + (f" [{rank}/{nproc}]" if nproc > 1
                                                                                    else ""),
               disable=args.no_progress, unit_scale=True, smoothing=0.1)
    count = skipped = embedded = 0
    start = time.perf_counter()

    def flush(i: int, records: list) -> None:
        nonlocal skipped, embedded
        paths = shard_paths(args.out, i)
        if i % nproc != rank or os.path.isfile(paths["embeddings"]):  # another process's, or finished earlier
            skipped += len(records)
            if bar.total is not None:
                bar.total = max(bar.n, bar.total - len(records))
                bar.refresh()
            return
        texts = [r.text for r in records]
        emb = encoder.encode(texts, args.kind, batch_size=args.batch_size, max_length=args.max_length,
                             normalize=args.normalize).astype(out_dtype)
        ids = [r.id if args.id_field is not None else i * args.shard_size + k for k, r in enumerate(records)]
        _write_shard(args.out, i, ids, texts if args.store_text else None, emb)
        embedded += len(records)
        bar.update(len(records))

    shard: list = []
    for rec in read_corpus(args.input, fmt, text_field=args.text_field, id_field=args.id_field,
                           skip_bad_lines=args.skip_bad_lines):
        shard.append(rec)
        count += 1
        if len(shard) == args.shard_size:
            flush(count // args.shard_size - 1, shard)
            shard = []
    if shard:
        flush(count // args.shard_size, shard)
    bar.close()
    num_shards = -(-count // args.shard_size)
    seconds = time.perf_counter() - start
    rate = embedded / seconds if seconds > 0 else 0.0
    print(f"process {rank}/{nproc}: embedded {embedded} {args.kind} ({rate:.1f}/s), skipped {skipped} "
          f"(finished earlier or another process's); {encoder.compile_count} programs compiled in "
          f"{encoder.compile_seconds:.1f}s", file=sys.stderr)
    if rank != 0:
        return 0
    deadline = time.monotonic() + args.wait_timeout
    while missing := [i for i in range(num_shards) if not os.path.isfile(shard_paths(args.out, i)["embeddings"])]:
        if time.monotonic() > deadline:
            raise UserError(f"{args.out}: shards {missing[:10]} still missing after {args.wait_timeout:.0f}s; "
                               "rerun the same command to finish them")
        time.sleep(0.5)
    # Every shard exists, so no process is writing: leftovers of killed runs can go.
    for tmp in glob.glob(os.path.join(args.out, ".*.tmp-*")):
        os.remove(tmp)
    manifest = {**settings, "num_shards": num_shards, "count": count}
    with atomic_file(os.path.join(args.out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.remove(os.path.join(args.out, RUN_SETTINGS))
    print(f"wrote {args.out}: {count} {args.kind} in {num_shards} shards", file=sys.stderr)
    return 0
