"""Search at corpus scale: `search.Index` against faiss' flat indexes, exact and compressed, in one run.

    python benchmarks/search_scale.py [--rows 1000000] [--queries 1000] [-k 100] [--real 50000] [--out DIR]
                                      [--work DIR] [--quick]

1. **Exact**: a synthetic index (`--rows` x 128 standard normal float32, written shard by shard as `embed` writes
   it) searched by `Index(...).search_rows` and by faiss `IndexFlatIP` on the same vectors, interleaved, best of
   `--repeats`; throughput ratio, and how many ids equal faiss'.
2. **Compressed**: the same index's int8 and binary copies (`retribert-jax compress`), searched with rescoring,
   beside faiss' `IndexScalarQuantizer` (8-bit, inner product) and `IndexBinaryFlat` (Hamming on sign bits, no
   rescoring); recall@10 / @100 against exact search, and the bytes per row each form scans.
3. **Real text** (`--real N`, 0 to skip): N passages of `benchmarks.data.real_texts` embedded by the MiniLM
   RetriBERT (`minilm.build_minilm_retribert`, projection 128), 1,000 other texts as questions; recall@10 / @100 of
   int8 and binary with rescoring against exact search, at several rescore multipliers, beside sentence-transformers'
   recipe on the same vectors (the k x multiplier best rows by the copy, bits at 0, rescored).

Writes `search_scale.json` and `search_scale.png` under --out. The synthetic and real indexes are kept under --work
(default: a directory in the system's temp dir named by the sizes), so a rerun measures without rebuilding them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DIM = 128
SHARD_ROWS = 1_000_000
MULTIPLIERS = {"int8": (1, 2, 4), "binary": (4, 10, 20, 40)}  # rows rescored per hit; 40 x 100 is under the 4,096 cap


def synthetic_index(directory: str, rows: int, seed: int = 0) -> str:
    """`rows` x 128 standard normal float32 rows as an embedding directory, written shard by shard (kept if there)."""
    from retribert_jax import embedding_dir

    if os.path.isfile(os.path.join(directory, embedding_dir.MANIFEST)):
        if embedding_dir.read_manifest(directory)["count"] == rows:
            return directory
    settings = {
        "model": "synthetic",
        "config_hash": "synthetic",
        "kind": "passages",
        "dtype": "float32",
        "max_length": 0,
        "projection_dim": DIM,
        "normalized": False,
        "shard_size": SHARD_ROWS,
        "has_text": False,
    }
    embedding_dir.start_run(directory, settings, overwrite=True)
    rng = np.random.default_rng(seed)
    shards = -(-rows // SHARD_ROWS)
    for i in range(shards):
        n = min(SHARD_ROWS, rows - i * SHARD_ROWS)
        embedding_dir.write_shard(
            directory, i, range(i * SHARD_ROWS, i * SHARD_ROWS + n), rng.standard_normal((n, DIM), dtype=np.float32)
        )
    embedding_dir.finish_run(directory, settings, rows, shards)
    return directory


def best_of(fn, repeats: int) -> tuple[float, Any]:
    out, best = fn(), float("inf")  # the first call compiles and warms up
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def recall(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, exact, strict=True)]))


def all_vectors(index) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.float32) for s in index.shards])


def exact_part(directory: str, q: np.ndarray, k: int, repeats: int) -> dict[str, Any]:
    import faiss

    from retribert_jax.search import Index

    index = Index(directory)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(all_vectors(index))
    ours_t = theirs_t = float("inf")
    ours = theirs = None
    for _ in range(repeats):  # interleaved: both see the same machine state
        t, ours = best_of(lambda: index.search_rows(q, k), 1)
        ours_t = min(ours_t, t)
        t, theirs = best_of(lambda: flat.search(q, k), 1)
        theirs_t = min(theirs_t, t)
    same = float(np.mean(ours[1] == theirs[1]))
    differ = ours[1] != theirs[1]
    gap = float(np.abs(ours[0][differ] - theirs[0][differ]).max()) if differ.any() else 0.0
    return {
        "ours_s": ours_t,
        "faiss_flat_s": theirs_t,
        "ratio": theirs_t / ours_t,
        "ids_equal": same,
        "largest_score_gap_where_ids_differ": gap,
        "screen_dtype": index._screen_dtype(),
        "exact_rows": ours[1],
    }


def compressed_part(directory: str, q: np.ndarray, k: int, exact_rows: np.ndarray, repeats: int) -> dict[str, Any]:
    import faiss

    from retribert_jax import embedding_dir
    from retribert_jax.search import Index

    t = time.perf_counter()
    embedding_dir.write_compressed(directory, ["int8", "binary"])
    out: dict[str, Any] = {"compress_s": time.perf_counter() - t}
    vectors = all_vectors(Index(directory))
    sq = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(vectors)
    sq.add(vectors)
    binary = faiss.IndexBinaryFlat(DIM)
    binary.add(np.packbits(vectors > 0, axis=1))
    del vectors
    peers = {
        "int8": ("faiss_sq8", lambda: sq.search(q, k)),
        "binary": ("faiss_binary_flat", lambda: binary.search(np.packbits(q > 0, axis=1), k)),
    }
    for form in ("int8", "binary"):
        name, peer = peers[form]
        peer_t, (_, peer_rows) = best_of(peer, repeats)
        out[name] = {
            "s": peer_t,
            "recall@10": recall(peer_rows, exact_rows, 10),
            "recall@100": recall(peer_rows, exact_rows, min(100, k)),
        }
        for m in MULTIPLIERS[form]:
            index = Index(directory, scan=form, rescore_multiplier=m)
            ours_t, (_, rows) = best_of(lambda index=index: index.search_rows(q, k), repeats)
            out[f"{form}_x{m}"] = {
                "s": ours_t,
                "ratio_to_peer": peer_t / ours_t,
                "recall@10": recall(rows, exact_rows, 10),
                "recall@100": recall(rows, exact_rows, min(100, k)),
            }
    return out


def real_part(work: str, n: int, k: int, quick: bool) -> dict[str, Any]:
    from benchmarks.data import real_texts
    from retribert_jax import RetriBertModel, RetriBertTokenizer, embedding_dir, quantization
    from retribert_jax.embedding_job import embed_corpus
    from retribert_jax.encode import Encoder
    from retribert_jax.minilm import build_minilm_retribert
    from retribert_jax.search import Index

    model_dir = build_minilm_retribert(os.path.join(work, "minilm-retribert-128"), projection_dim=DIM)
    encoder = Encoder(RetriBertModel.from_pretrained(model_dir), RetriBertTokenizer.from_pretrained(model_dir))
    directory = os.path.join(work, f"real-{n}")
    t = time.perf_counter()
    embed_corpus(
        encoder,
        enumerate(real_texts(n, seed=1)),
        directory,
        kind="passages",
        model=model_dir,
        shard_size=max(1, n // 4),
        max_length=128,
        show_progress=False,
    )
    embed_s = time.perf_counter() - t
    embedding_dir.write_compressed(directory, ["int8", "binary"])
    questions = real_texts(100 if quick else 1000, seed=2)
    q = encoder.encode_questions(questions, max_length=64)
    exact = Index(directory).search_rows(q, k)[1]
    m = embedding_dir.read_manifest(directory)
    out: dict[str, Any] = {
        "passages": n,
        "questions": len(questions),
        "embed_s": embed_s,
        "bytes_per_passage": {"float32": 4 * DIM, "int8": DIM, "binary": DIM // 8},
    }
    vectors = all_vectors(Index(directory))
    scores = q @ vectors.T
    recipe = {
        "int8": quantization.decode(
            quantization.encode(vectors, "int8", embedding_dir.calibration(m, "int8")),
            "int8",
            embedding_dir.calibration(m, "int8"),
        ),
        "binary": np.where(vectors > 0, 1.0, -1.0).astype(np.float32),
    }  # sentence-transformers: bits at 0
    for form in ("int8", "binary"):
        approx = q @ recipe[form].T
        for mult in MULTIPLIERS[form]:
            rows = Index(directory, scan=form, rescore_multiplier=mult).search_rows(q, k)[1]
            out[f"{form}_x{mult}"] = {"recall@10": recall(rows, exact, 10), "recall@100": recall(rows, exact, k)}
            # sentence-transformers' recipe on the same rows: the k * mult best rows by the copy, rescored.
            short = np.argsort(-approx, axis=1, kind="stable")[:, : k * mult]
            ranked = np.take_along_axis(
                short, np.argsort(-np.take_along_axis(scores, short, axis=1), axis=1, kind="stable"), axis=1
            )
            out[f"recipe_{form}_x{mult}"] = {
                "recall@10": recall(ranked, exact, 10),
                "recall@100": recall(ranked, exact, k),
            }
    assert m["count"] == n
    return out


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ex, comp = result["exact"], result["compressed"]
    names = ["faiss IndexFlatIP", "ours exact"] + [n for n in comp if "_x" in n] + ["faiss SQ8", "faiss binary"]
    secs = (
        [ex["faiss_flat_s"], ex["ours_s"]]
        + [comp[n]["s"] for n in comp if "_x" in n]
        + [comp["faiss_sq8"]["s"], comp["faiss_binary_flat"]["s"]]
    )
    rate = [result["queries"] / s for s in secs]
    axes[0].barh(names, rate, color=["grey", "C0"] + ["C1"] * (len(names) - 4) + ["grey", "grey"])
    axes[0].set_xlabel("queries / s")
    axes[0].set_title(f"{result['rows']:,} x {DIM}, {result['queries']} queries, k = {result['k']}")
    rec_names = [n for n in comp if "_x" in n] + ["faiss_sq8", "faiss_binary_flat"]
    axes[1].barh(rec_names, [comp[n]["recall@10"] for n in rec_names], label="synthetic, recall@10", alpha=0.6)
    if result.get("real"):
        real_names = [n for n in result["real"] if "_x" in n]
        axes[1].barh(
            real_names, [result["real"][n]["recall@10"] for n in real_names], label="real text, recall@10", alpha=0.6
        )
    axes[1].set_xlim(0, 1)
    axes[1].legend(loc="lower left")
    axes[1].set_title("recall against exact search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--real", type=int, default=50_000, help="real-text passages (0: skip the real-text part)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="search-results")
    p.add_argument("--work", help="where the indexes are kept between runs")
    p.add_argument("--quick", action="store_true", help="toy sizes: every step runs, in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.queries, args.k, args.real, args.repeats = 40_000, 16, 10, min(args.real, 64), 1
    work = args.work or os.path.join(tempfile.gettempdir(), f"retribert-search-{args.rows}")
    os.makedirs(args.out, exist_ok=True)
    import jax

    t = time.perf_counter()
    directory = synthetic_index(os.path.join(work, "synthetic"), args.rows)
    print(f"synthetic index: {args.rows:,} rows in {time.perf_counter() - t:.1f}s", flush=True)
    q = np.random.default_rng(1).standard_normal((args.queries, DIM), dtype=np.float32)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "rows": args.rows,
        "queries": args.queries,
        "k": args.k,
    }
    result["exact"] = exact_part(directory, q, args.k, args.repeats)
    exact_rows = result["exact"].pop("exact_rows")
    e = result["exact"]
    print(
        f"exact: ours {e['ours_s']:.3f}s, faiss IndexFlatIP {e['faiss_flat_s']:.3f}s: {e['ratio']:.2f}x faiss' "
        f"throughput (screen {e['screen_dtype']}); ids equal faiss' {e['ids_equal']:.5f}",
        flush=True,
    )
    result["compressed"] = compressed_part(directory, q, args.k, exact_rows, args.repeats)
    for name, v in result["compressed"].items():
        if isinstance(v, dict):
            ratio = f", {v['ratio_to_peer']:.2f}x faiss' throughput" if "ratio_to_peer" in v else ""
            print(
                f"{name}: {v['s']:.3f}s{ratio}, recall@10 {v['recall@10']:.4f}, @100 {v['recall@100']:.4f}", flush=True
            )
    if args.real:
        result["real"] = real_part(work, args.real, args.k, args.quick)
        for name, v in result["real"].items():
            if isinstance(v, dict) and "recall@10" in v:
                print(f"real text {name}: recall@10 {v['recall@10']:.4f}, @100 {v['recall@100']:.4f}", flush=True)
    with open(os.path.join(args.out, "search_scale.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "search_scale.png"))
    print(f"wrote {args.out}/search_scale.json and search_scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
