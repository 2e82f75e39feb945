"""`retribert-jax embed`: a corpus (text, JSONL, TSV, CSV, parquet) -> an embedding directory (`embedding_dir`).

The command parses, opens the model and runs `embedding_job.embed_corpus` (resumable: a rerun of the same command
goes on where the last one stopped). Under `jax.distributed` (--coordinator/--num-processes/--process-id) process p
embeds shards p, p + P, ... into the same OUT, and process 0 writes the manifest once every shard exists.
"""

from __future__ import annotations

import argparse
import sys

from retribert_jax.commands import common
from retribert_jax.corpus import FORMATS
from retribert_jax.embedding_dir import DTYPES, KINDS
from retribert_jax.quantization import FORMS

HELP = "embed a corpus of passages or questions into a directory of fixed-size shards with a manifest (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a RetriBERT checkpoint directory (HF or Flax) or hub id")
    p.add_argument(
        "input",
        metavar="INPUT",
        help="plain text (one passage a line), .jsonl, .tsv, .csv or .parquet; "
        "text, JSONL, TSV and CSV also gzip/bz2/xz/zstd-compressed",
    )
    p.add_argument("out", metavar="OUT", help="output directory of shards and manifest.json")
    p.add_argument(
        "--kind",
        choices=KINDS,
        required=True,
        help="passages go through the document encoder and project_doc, questions through the query ones",
    )
    p.add_argument("--format", choices=FORMATS, help="input format (default: from the extension)")
    p.add_argument("--text-field", default="text", help="JSON key / column of the text (default: %(default)s)")
    p.add_argument("--id-field", help="JSON key / column of the id (default: 0-based record numbers)")
    p.add_argument(
        "--title-field",
        default="title",
        help="JSON key / column of a title, joined to the text as 'title text' where a record has one, as "
        "BEIR and sentence-transformers do (default: %(default)s; '' for none)",
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="log bad lines (invalid JSON or UTF-8, missing field, null id) and go on instead of stopping",
    )
    p.add_argument(
        "--shard-size", type=common.positive_int, default=100_000, help="records per shard (default: %(default)s)"
    )
    common.add_encoding_arguments(p, max_length_help="truncation length in tokens (default: 128)")
    p.add_argument("--compute-dtype", dest="dtype", choices=common.COMPUTE_DTYPES, help=argparse.SUPPRESS)
    p.add_argument(
        "--embedding-dtype",
        choices=DTYPES,
        default=DTYPES[0],
        help="dtype the embeddings are stored in (default: %(default)s)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--store-text", action="store_true", help="also write texts-NNNNN.jsonl beside each shard")
    p.add_argument(
        "--compress",
        nargs="+",
        choices=FORMS,
        default=[],
        help="also write these compressed copies once every shard exists (as `retribert-jax compress`)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the embeddings OUT holds, finished or not, whatever settings made them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address; turns on jax.distributed")
    g.add_argument("--num-processes", type=common.positive_int, help="number of processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument(
        "--wait-timeout",
        type=float,
        default=3600.0,
        help="seconds process 0 waits for the other processes' shards (default: %(default)s)",
    )


def check(args: argparse.Namespace) -> None:
    from retribert_jax.corpus import detect_format

    distributed = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    common.require_file(args.input, "input file")
    args.format = args.format or detect_format(args.input)
    if args.format == "text" and args.id_field is not None:
        raise ValueError(
            f"{args.input}: plain text input has no id field; drop --id-field or use JSONL/TSV/CSV/parquet"
        )


def run(args: argparse.Namespace) -> int:
    timings = args.timings
    with timings.phase("import retribert_jax"):
        import jax

        if args.coordinator is not None:
            # The coordinator waits for every process (5 minutes by default, then JAX aborts the process): say so.
            print(
                f"retribert-jax embed: process {args.process_id} of {args.num_processes}: waiting for the others at "
                f"{args.coordinator}",
                file=sys.stderr,
                flush=True,
            )
            jax.distributed.initialize(
                coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        from retribert_jax.corpus import count_records, read_corpus
        from retribert_jax.embedding_job import NoRecords, embed_corpus
        from retribert_jax.io import file_sha256

    _, encoder = common.open_encoder(args, args.model)
    with timings.phase("hash input"):
        # What identifies the input: a resume must embed the very records the first run numbered into shards.
        source = {
            "input_sha256": file_sha256(args.input),
            "input_format": args.format,
            "text_field": args.text_field,
            "id_field": args.id_field,
            "title_field": args.title_field or None,
            "skip_bad_lines": bool(args.skip_bad_lines),
        }
    records = (
        (r.id, r.text)
        for r in read_corpus(
            args.input,
            args.format,
            text_field=args.text_field,
            id_field=args.id_field,
            title_field=args.title_field or None,
            skip_bad_lines=args.skip_bad_lines,
        )
    )
    try:
        result = embed_corpus(
            encoder,
            records,
            args.out,
            kind=args.kind,
            model=common.model_name(args.model),
            source=source,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            max_length=args.max_length or common.DEFAULT_MAX_LENGTH,
            normalize=args.normalize,
            dtype=args.embedding_dtype,
            store_text=args.store_text,
            overwrite=args.overwrite,
            total=count_records(args.input, args.format),
            show_progress=not args.no_progress,
            wait_timeout=args.wait_timeout,
        )
    except NoRecords:
        raise ValueError(
            f"{args.input}: no {args.kind} to embed"
            + (" that could be read (see the skipped lines above)" if args.skip_bad_lines else "")
        ) from None
    if result.manifest is not None and args.compress:
        from retribert_jax.embedding_dir import write_compressed

        with timings.phase("write compressed copies"):
            write_compressed(args.out, args.compress)
    if result.already_complete:
        m = result.manifest
        print(
            f"{args.out}: already complete ({m['count']} {args.kind} in {m['num_shards']} shards); nothing to do "
            "(--overwrite embeds it again)",
            file=sys.stderr,
        )
        return 0
    timings.report()
    nproc = jax.process_count()
    who = f"process {jax.process_index()}/{nproc}: " if nproc > 1 else ""
    resumed = f", {result.resumed} kept from an earlier run" if result.resumed else ""
    cached = f" ({encoder.programs_from_cache} from the compilation cache)" if encoder.programs_from_cache else ""
    print(
        f"{who}embedded {result.embedded} {args.kind} ({result.embedded / max(result.seconds, 1e-9):.1f}/s)"
        f"{resumed}; {encoder.compile_count} programs{cached}, compiled in {encoder.compile_seconds:.1f}s",
        file=sys.stderr,
    )
    if result.manifest is not None:
        m = result.manifest
        copies = f", with {' and '.join(args.compress)} copies" if args.compress else ""
        print(f"wrote {args.out}: {m['count']} {args.kind} in {m['num_shards']} shards{copies}", file=sys.stderr)
    return 0
