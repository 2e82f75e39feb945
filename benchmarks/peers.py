"""One framework per process: each peer's fixed-shape forward and end-to-end `encode`, timed the same way.

`run_worker(spec)` is what `run.py --worker` calls in a fresh subprocess, so that each framework's peak memory is
its own and no framework's threads or allocator linger into another's measurement.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.data import ModelDirs, bench_config, real_texts
from retribert_jax.modeling import flops_per_sequence

FRAMEWORKS = ("retribert_jax", "hf_torch", "hf_flax", "sentence_transformers")
CLS_ID, SEP_ID = 101, 102


def available(framework: str) -> str | None:
    """None when the framework's packages import here, else why not."""
    try:
        if framework in ("retribert_jax", "hf_flax"):
            import flax  # noqa: F401
            import jax  # noqa: F401
        if framework in ("hf_torch", "hf_flax", "sentence_transformers"):
            import torch  # noqa: F401
            import transformers

            if int(transformers.__version__.split(".")[0]) >= 5:
                return f"transformers {transformers.__version__} dropped RetriBertModel and Flax; needs <5"
        if framework == "hf_flax":
            from transformers import FlaxBertModel  # noqa: F401
        if framework == "sentence_transformers":
            import sentence_transformers  # noqa: F401
    except ImportError as e:
        return f"not installed ({e.name})"
    return None


class CompileCounter:
    """Counts XLA backend compilations and sums their time, through jax.monitoring's duration events."""

    def __init__(self):
        import jax.monitoring

        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


def time_calls(fn: Callable[[], Any], min_time: float, max_iters: int) -> dict[str, float]:
    """First call (compilation, warm-up) timed alone, then repeated calls until `min_time` or `max_iters`.

    `fn` must block until its result exists. Returns first-call, median and best steady-state seconds.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times: list[float] = []
    while not times or (sum(times) < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "step_s": statistics.median(times), "best_s": min(times), "iters": len(times)}


def fixed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [CLS] w... [SEP] with every position a real token, so the work matches the FLOP count."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    return ids, np.ones((batch, length), np.int32)


# --- the peers: each builder returns (fixed-shape forward on numpy ids/mask -> callable, end-to-end encode) -------


def _jax_dtype(dtype: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def build_retribert_jax(dirs: ModelDirs, dtype: str, gpu: bool, max_length: int, e2e_batch: int):
    import jax
    from flax import nnx

    from retribert_jax.encode import Encoder
    from retribert_jax.modeling import RetriBertModel, embed
    from retribert_jax.tokenizer import RetriBertTokenizer

    # cuDNN flash attention where it helps: on GPU, in bfloat16 (it has no float32 kernel).
    impl = "cudnn" if gpu and dtype == "bfloat16" else "xla"
    model = RetriBertModel.from_pretrained(dirs.retribert, dtype=_jax_dtype(dtype), attention_impl=impl)
    graphdef, state = nnx.split(model)
    tok = RetriBertTokenizer.from_pretrained(dirs.retribert)

    def fixed(ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
        ids_d, mask_d = jax.device_put(ids), jax.device_put(mask)
        return lambda: jax.block_until_ready(embed(graphdef, state, ids_d, mask_d, "passages"))

    encoder = Encoder(model, tok, dtype=_jax_dtype(dtype))

    def e2e(texts: list[str]) -> np.ndarray:
        # The Encoder's batch_size counts packed rows (several texts each), not texts: it runs at its default, the
        # platform's tokens per call, as a user of the command line does.
        return encoder.encode_passages(texts, max_length=max_length)

    return fixed, e2e, {"attention_impl": impl, "encoder": "retribert_jax.encode.Encoder"}


def build_hf_torch(dirs: ModelDirs, dtype: str, gpu: bool, max_length: int, e2e_batch: int):
    import torch
    import transformers

    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    model = transformers.RetriBertModel.from_pretrained(dirs.retribert).eval().to(device)
    tok = transformers.BertTokenizerFast.from_pretrained(dirs.retribert)
    autocast = dtype == "bfloat16"

    def forward(ids, mask):
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model.embed_answers(ids, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    def fixed(ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
        ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)
        mask_t = torch.from_numpy(mask.astype(np.int64)).to(device)
        return lambda: forward(ids_t, mask_t)

    def e2e(texts: list[str]) -> np.ndarray:
        # As the model card uses it: batches in input order, each padded to its longest text.
        outs = []
        for s in range(0, len(texts), e2e_batch):
            enc = tok(
                texts[s : s + e2e_batch],
                max_length=max_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            outs.append(forward(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu().numpy())
        return np.concatenate(outs)

    return (
        fixed,
        e2e,
        {
            "device": device,
            "threads": torch.get_num_threads(),
            "mode": "eager" + (", bf16 autocast" if autocast else ""),
        },
    )


def build_hf_flax(dirs: ModelDirs, dtype: str, gpu: bool, max_length: int, e2e_batch: int):
    import jax
    import jax.numpy as jnp
    import transformers

    model = transformers.FlaxBertModel.from_pretrained(dirs.bert, from_pt=True, dtype=_jax_dtype(dtype))
    params = model.params
    w = jnp.asarray(np.load(dirs.projection))  # P D
    tok = transformers.BertTokenizerFast.from_pretrained(dirs.bert)

    @jax.jit
    def apply(params, w, ids, mask):
        pooled = model(ids, attention_mask=mask, params=params, train=False).pooler_output  # B D
        return (pooled.astype(w.dtype) @ w.T).astype(jnp.float32)  # B P

    def fixed(ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
        ids_d, mask_d = jax.device_put(ids), jax.device_put(mask)
        return lambda: jax.block_until_ready(apply(params, w, ids_d, mask_d))

    def e2e(texts: list[str]) -> np.ndarray:
        # Padded to max_length, the usual way to keep one compiled shape under jit.
        outs = []
        for s in range(0, len(texts), e2e_batch):
            enc = tok(
                texts[s : s + e2e_batch],
                max_length=max_length,
                truncation=True,
                padding="max_length",
                return_tensors="np",
                return_token_type_ids=False,
            )
            outs.append(np.asarray(apply(params, w, enc["input_ids"], enc["attention_mask"])))
        return np.concatenate(outs)

    return fixed, e2e, {"mode": "FlaxBertModel + projection in one jax.jit"}


def sentence_transformers_modules() -> tuple[type, type, type]:
    """sentence-transformers' (Dense, Pooling, Transformer) modules, from where the installed version keeps them."""
    try:  # 5.7 and later; `sentence_transformers.models` is their deprecated alias there
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Pooling, Transformer
    return Dense, Pooling, Transformer


def build_sentence_transformers(dirs: ModelDirs, dtype: str, gpu: bool, max_length: int, e2e_batch: int):
    import torch
    from sentence_transformers import SentenceTransformer

    Dense, Pooling, Transformer = sentence_transformers_modules()

    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    encoder = Transformer(dirs.bert, max_seq_length=max_length)
    dim = encoder.get_word_embedding_dimension()
    proj = torch.from_numpy(np.load(dirs.projection))  # P D
    # sentence-transformers pools the [CLS] hidden state itself; BERT's pooler (dense + tanh on [CLS]) is not in its
    # pipeline. That skips one D x D matmul per text: a negligible share of the FLOPs, but its vectors differ.
    dense = Dense(dim, proj.shape[0], bias=False, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.copy_(proj)
    model = SentenceTransformer(modules=[encoder, Pooling(dim, pooling_mode="cls"), dense], device=device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)

    def e2e(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=e2e_batch, convert_to_numpy=True, show_progress_bar=False)

    return None, e2e, {"device": device, "pooling": "cls (no BERT pooler), Dense without bias"}


BUILDERS = {
    "retribert_jax": build_retribert_jax,
    "hf_torch": build_hf_torch,
    "hf_flax": build_hf_flax,
    "sentence_transformers": build_sentence_transformers,
}


# --- the worker -------------------------------------------------------------------------------------------------


def peak_memory_bytes(framework: str, gpu: bool) -> tuple[int, str]:
    """The device's peak allocated bytes on GPU, else this process's RSS high-water mark."""
    if gpu and framework in ("retribert_jax", "hf_flax"):
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak"
    if gpu and framework in ("hf_torch", "sentence_transformers"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def measure_peak(gpu: bool, quick: bool) -> dict[str, Any]:
    """The device's achieved matmul FLOP/s, float32 and bfloat16: the best of a large square jitted matmul and the
    GEMM shapes of BERT-base itself (on CPU a square 2048^3 product runs well below what [4096, 3072] x [3072, 768]
    reaches, so a square matmul alone understates the ceiling)."""
    import jax
    import jax.numpy as jnp

    n = 512 if quick else (8192 if gpu else 2048)
    rows = 256 if quick else (131072 if gpu else 4096)  # tokens of one headline batch
    shapes = [(n, n, n)] + ([] if quick else [(rows, 768, 3072), (rows, 3072, 768), (rows, 768, 2304)])
    out: dict[str, Any] = {
        "matmul_n": n,
        "matmul_shapes": shapes,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
    }
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        best = 0.0
        for m, k, n_ in shapes:
            a = jax.random.normal(jax.random.key(0), (m, k), dt)
            b = jax.random.normal(jax.random.key(1), (k, n_), dt)
            f = jax.jit(lambda x, y: x @ y)
            t = time_calls(
                lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), 0.5 if quick else 1.0, 5 if quick else 30
            )
            # The best repetition: a peak is what the device can do, and on a shared machine the median is not that.
            best = max(best, 2 * m * k * n_ / t["best_s"])
        out[f"peak_flops_{name}"] = best
    out["matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    return out


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one measurement described by `spec` (see run.py) in this process and returns its numbers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    task = spec["task"]
    if task == "probe":
        return measure_peak(spec["gpu"], spec["quick"])
    framework, dtype, gpu = spec["framework"], spec["dtype"], spec["gpu"]
    cfg = bench_config(spec["quick"])
    dirs = ModelDirs(**spec["dirs"])
    counter = CompileCounter() if framework in ("retribert_jax", "hf_flax") else None
    t0 = time.perf_counter()
    fixed, e2e, info = BUILDERS[framework](dirs, dtype, gpu, spec["max_length"], spec["e2e_batch"])
    result: dict[str, Any] = {"framework": framework, "dtype": dtype, "load_s": time.perf_counter() - t0, **info}
    if task == "headline":
        if fixed is not None:
            b, length = spec["batch"], spec["length"]
            before = counter.snapshot() if counter else None
            t = time_calls(fixed(*fixed_batch(b, length, cfg.vocab_size)), spec["min_time"], spec["max_iters"])
            flops = b * flops_per_sequence(cfg, length) / t["step_s"]
            result.update(
                batch=b,
                length=length,
                throughput=b / t["step_s"],
                step_s=t["step_s"],
                iters=t["iters"],
                first_call_s=t["first_s"],
                flops_per_s=flops,
                warmup_s=max(0.0, t["first_s"] - t["step_s"]),
            )
            if counter:
                n, s = counter.snapshot()
                result.update(compile_count=n - before[0], compile_s=s - before[1])
        texts = real_texts(spec["n_texts"], seed=0)
        before = counter.snapshot() if counter else None
        t0 = time.perf_counter()
        emb = e2e(texts)  # cold: includes every compilation the corpus needs
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        e2e(texts)
        warm = time.perf_counter() - t0
        result.update(
            e2e_texts=len(texts),
            e2e_throughput=len(texts) / warm,
            e2e_cold_s=cold,
            e2e_warm_s=warm,
            e2e_shape=list(np.shape(emb)),
        )
        if counter:
            n, s = counter.snapshot()
            result.update(e2e_compile_count=n - before[0], e2e_compile_s=s - before[1])
        result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory_bytes(framework, gpu)
    elif task == "scaling":
        points = []
        for b, length in spec["points"]:
            t = time_calls(fixed(*fixed_batch(b, length, cfg.vocab_size)), spec["min_time"], spec["max_iters"])
            points.append(
                {
                    "batch": b,
                    "length": length,
                    "throughput": b / t["step_s"],
                    "step_s": t["step_s"],
                    "flops_per_s": b * flops_per_sequence(cfg, length) / t["step_s"],
                }
            )
        result["points"] = points
    return result
