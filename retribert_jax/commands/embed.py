"""`retribert-jax embed`: a corpus (text, JSONL, TSV, parquet) -> an embedding directory (`embedding_dir`).

Records are read as a stream and cut into shards of `--shard-size`; each shard is encoded by one `Encoder.encode`
call and written by `embedding_dir.write_shard`. A rerun of the same command skips finished shards. Under
`jax.distributed` (--coordinator/--num-processes/--process-id) process p embeds shards p, p + P, ... into the same
OUT, and process 0 writes the manifest once every shard exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HELP = "embed a corpus of passages or questions into a directory of fixed-size shards with a manifest (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a RetriBERT checkpoint directory (HF or Flax) or hub id")
    p.add_argument("input", metavar="INPUT", help="plain text (one passage a line), .jsonl, .tsv (with a header) "
                                                  "or .parquet; text, JSONL and TSV also gzip/bz2/xz/zstd-compressed")
    p.add_argument("out", metavar="OUT", help="output directory of shards and manifest.json")
    p.add_argument("--kind", choices=("passages", "questions"), required=True,
                   help="passages go through the document encoder and project_doc, questions through the query ones")
    p.add_argument("--format", choices=("text", "jsonl", "tsv", "parquet"), help="input format (default: from the "
                                                                                 "extension)")
    p.add_argument("--text-field", default="text", help="JSON key / column of the text (default: %(default)s)")
    p.add_argument("--id-field", help="JSON key / column of the id (default: 0-based record numbers)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="log bad lines (invalid JSON or UTF-8, missing field, null id) and go on instead of stopping")
    p.add_argument("--shard-size", type=int, default=100_000, help="records per shard (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="packed rows per forward call (default: a platform's efficient size, ~1024 tokens on CPU)")
    p.add_argument("--max-length", type=int, default=128, help="truncation length in tokens (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype the embeddings are stored in (default: %(default)s)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="matmul dtype (default: %(default)s)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--store-text", action="store_true", help="also write texts-NNNNN.jsonl beside each shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address; turns on jax.distributed")
    g.add_argument("--num-processes", type=int, help="number of processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--wait-timeout", type=float, default=3600.0,
                   help="seconds process 0 waits for the other processes' shards (default: %(default)s)")


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("shard_size", "batch_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    distributed = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such input file")


def _settings(args: argparse.Namespace, fmt: str, config) -> dict:
    """What makes two runs the same run: a resume must embed the very records the first run numbered into shards."""
    from retribert_jax.io import file_sha256

    return {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
            "config_hash": config.architecture_hash(), "kind": args.kind, "dtype": args.dtype,
            "max_length": args.max_length, "projection_dim": config.projection_dim,
            "normalized": bool(args.normalize), "shard_size": args.shard_size, "has_text": bool(args.store_text),
            "input_sha256": file_sha256(args.input), "input_format": fmt, "text_field": args.text_field,
            "id_field": args.id_field, "skip_bad_lines": bool(args.skip_bad_lines)}


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    timings = args.timings
    with timings.phase("import retribert_jax"):
        import jax

        if args.coordinator is not None:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        import jax.numpy as jnp
        import numpy as np
        from tqdm.auto import tqdm

        from retribert_jax import RetriBertModel, RetriBertTokenizer, embedding_dir
        from retribert_jax.corpus import count_records, detect_format, read_corpus
        from retribert_jax.encode import Encoder
        from retribert_jax.errors import UserError

    fmt = args.format or detect_format(args.input)
    with timings.phase("load model"):
        model = RetriBertModel.from_pretrained(args.model, dtype=jnp.dtype(args.compute_dtype))
    with timings.phase("load tokenizer"):
        tokenizer = RetriBertTokenizer.from_pretrained(args.model)
    with timings.phase("hash input"):
        settings = _settings(args, fmt, model.config)
    done = embedding_dir.start_run(args.out, settings)
    if done is not None:
        print(f"{args.out}: already complete ({done['count']} {args.kind} in {done['num_shards']} shards)",
              file=sys.stderr)
        return 0
    with timings.phase("place parameters"):
        encoder = Encoder(model, tokenizer, dtype=jnp.dtype(args.compute_dtype))
    nproc, rank = jax.process_count(), jax.process_index()
    bar = tqdm(total=count_records(args.input, fmt), unit=args.kind[:-1], unit_scale=True, smoothing=0.1,
               desc=f"embedding {args.kind}" + (f" [{rank}/{nproc}]" if nproc > 1 else ""), disable=args.no_progress)
    count = skipped = embedded = 0
    start = time.perf_counter()

    def flush(i: int, records: list) -> None:
        nonlocal skipped, embedded
        if i % nproc != rank or embedding_dir.shard_done(args.out, i):  # another process's, or finished earlier
            skipped += len(records)
            if bar.total is not None:
                bar.total = max(bar.n, bar.total - len(records))
                bar.refresh()
            return
        texts = [r.text for r in records]
        emb = encoder.encode(texts, args.kind, batch_size=args.batch_size, max_length=args.max_length,
                             normalize=args.normalize).astype(np.dtype(args.dtype))
        # Without --id-field a record's id is its number; with it, the reader guarantees a real id.
        ids = [r.id if args.id_field is not None else i * args.shard_size + k for k, r in enumerate(records)]
        embedding_dir.write_shard(args.out, i, ids, emb, texts if args.store_text else None)
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
    if count == 0:
        raise UserError(f"{args.input}: no {args.kind} to embed" + (
            " that could be read (see the skipped lines above)" if args.skip_bad_lines else ""))
    seconds = time.perf_counter() - start
    timings.report()
    cached = f" ({encoder.programs_from_cache} from the compilation cache)" if encoder.programs_from_cache else ""
    print(f"process {rank}/{nproc}: embedded {embedded} {args.kind} ({embedded / max(seconds, 1e-9):.1f}/s), "
          f"skipped {skipped} (finished earlier or another process's); {encoder.compile_count} programs"
          f"{cached}, compiled in {encoder.compile_seconds:.1f}s", file=sys.stderr)
    if rank != 0:
        return 0
    num_shards = -(-count // args.shard_size)
    deadline = time.monotonic() + args.wait_timeout
    while missing := embedding_dir.missing_shards(args.out, num_shards):
        if time.monotonic() > deadline:
            raise UserError(f"{args.out}: shards {missing[:10]} still missing after {args.wait_timeout:.0f}s; "
                            "rerun the same command to finish them")
        time.sleep(0.5)
    embedding_dir.finish_run(args.out, settings, count, num_shards)
    print(f"wrote {args.out}: {count} {args.kind} in {num_shards} shards", file=sys.stderr)
    return 0
