"""Checking a checkpoint against the reference: HF transformers' PyTorch RetriBertModel (a test-time dependency,
never a runtime one) on built-in sample texts, and the one bridge from our config to transformers'."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from retribert_jax.config import RetriBertConfig
from retribert_jax.errors import MissingDependency

QUESTIONS = [
    "Why is the sky blue?",
    "How does yeast make bread rise?",
    "Why does ice float on water?",
    "How do airplanes stay in the air?",
    "Why do cats purr?",
    "What causes the seasons on Earth?",
    "How do vaccines train the immune system?",
    "Why does salt melt ice on roads?",
]
PASSAGES = [
    "Air molecules scatter short blue wavelengths of sunlight much more strongly than long red ones.",
    "Yeast ferments the sugars in dough and releases carbon dioxide, which the gluten traps as bubbles.",
    "Water expands as it freezes, so ice is less dense than liquid water and floats on top of it.",
    "Wings deflect air downwards; by Newton's third law the air pushes the wings, and the plane, up.",
    "Cats purr by twitching the muscles of the larynx, which makes the vocal folds vibrate as they breathe.",
    "The Earth's axis is tilted, so each hemisphere gets more direct sunlight for half of the year.",
    "A vaccine shows the immune system a harmless piece of a pathogen so it can make antibodies in advance.",
    "Dissolved salt lowers the freezing point of water, so ice melts at temperatures below zero Celsius.",
    "Volcanoes erupt when pressure from molten rock and gas below the crust becomes too great.",
    "Rainbows form when sunlight is refracted, reflected and dispersed inside water droplets.",
    "Bees make honey by evaporating the water from nectar and adding enzymes that break down sugars.",
    "Batteries store energy chemically and release it as an electric current when a circuit is closed.",
    "Tides are caused mostly by the Moon's gravity pulling on the oceans as the Earth rotates.",
    "Leaves change colour in autumn when chlorophyll breaks down and reveals other pigments.",
    "Thunder is the sound of air expanding explosively after being heated by a lightning bolt.",
    "Onions make you cry because cutting them releases a gas that irritates the eyes.",
]
TOP_K = 10
# Default tolerances by stored parameter dtype, about 10x the differences measured on the real-weights MiniLM
# checkpoint (fp32 3e-7, float16 1.6e-4, bfloat16 1.7e-3; see docs/convert.md).
DEFAULT_ATOL = {None: 1e-4, "float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2}
# The same bar for a model run with bf16 matmuls, or with float32 matmuls at less than the highest precision (TF32
# or bf16 passes on GPUs and TPUs), against the float32 reference: 10 bits of mantissa or fewer, like the bf16 store.
REDUCED_COMPUTE_ATOL = DEFAULT_ATOL["bfloat16"]


def default_atol(stored_dtype: str | None = None, dtype: str | None = None, precision: str | None = None) -> float:
    """The default tolerance for a checkpoint stored in `stored_dtype` and run with compute `dtype` and matmul
    `precision` (None: float32 at the highest precision, how `verify` runs by default)."""
    reduced = dtype == "bfloat16" or precision in ("default", "high")
    return max(DEFAULT_ATOL[stored_dtype], REDUCED_COMPUTE_ATOL if reduced else 0.0)


TORCH_MISSING = (
    "verify needs torch and transformers for the PyTorch reference: "
    "pip install 'retribert_jax[test]' (torch==2.13.0, transformers>=4.57,<5)"
)


class VerificationFailed(Exception):
    """The Flax model and the PyTorch reference disagree beyond the tolerance."""


def hf_torch_config(config: RetriBertConfig):
    """Our config as a `transformers.RetriBertConfig` that transformers can build a RetriBertModel from (see
    `RetriBertConfig.to_transformers_dict`)."""
    import transformers

    d = {k: v for k, v in config.to_transformers_dict().items() if k != "model_type"}
    return transformers.RetriBertConfig(**d)


def torch_reference(hf_dir: str):
    """HF transformers' PyTorch RetriBertModel loaded from an HF directory, in fp32 and evaluation mode."""
    import torch
    import transformers

    config = hf_torch_config(RetriBertConfig.from_pretrained(hf_dir))
    return transformers.RetriBertModel.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()


def _inputs(directory: str, max_length: int, vocab_size: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    import numpy as np

    from retribert_jax.tokenizer import RetriBertTokenizer

    try:
        tok = RetriBertTokenizer.from_pretrained(directory)
    except FileNotFoundError:
        # No tokenizer: deterministic random ids still compare the two models exactly.
        rng = np.random.default_rng(0)

        def fake(n: int) -> dict[str, Any]:
            ids = rng.integers(1, vocab_size, size=(n, 24)).astype(np.int32)
            mask = np.ones_like(ids)
            mask[n // 2 :, 12:] = 0
            return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}

        return fake(len(QUESTIONS)), fake(len(PASSAGES)), "random token ids (no tokenizer in the checkpoint)"
    return tok(QUESTIONS, max_length=max_length), tok(PASSAGES, max_length=max_length), "built-in sample texts"


def verify_checkpoint(
    directory: str,
    *,
    reference: str | None = None,
    atol: float = 1e-4,
    min_agreement: float = 0.9,
    max_length: int = 128,
    dtype: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Runs both models on the built-in texts and compares them.

    Args:
      directory: the checkpoint our loader reads (Flax or HF directory).
      reference: an HF PyTorch directory for the reference; default `directory` itself when it holds HF weights,
        else a temporary export of it.
      atol, min_agreement: the pass criteria (max abs embedding diff; mean top-10 overlap); see `default_atol` for
        the tolerance that fits a compute dtype and precision.
      max_length: tokenizer truncation length.
      dtype, precision: how our model runs (`RunConfig`); default float32 at the highest precision. The reference
        always runs in float32, so a bfloat16 model is measured against float32 numbers.

    Returns:
      {"question_max_abs_diff", "answer_max_abs_diff", "top10_overlap", "top10_same_order", "inputs", "ok"}.

    Raises:
      MissingDependency: torch or transformers is not installed.
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependency(TORCH_MISSING) from None
    import jax
    import numpy as np

    from retribert_jax.checkpoint import export_pytorch, load_model
    from retribert_jax.flax_files import has_flax_weights
    from retribert_jax.hf_files import find_hf_weights
    from retribert_jax.hub import resolve_checkpoint

    # The reference is fp32 on CPU; compare against fp32 matmuls, not TF32/bf16 passes.
    jax.config.update("jax_default_matmul_precision", "highest")
    directory = resolve_checkpoint(directory)
    model = load_model(directory, dtype=dtype, precision=precision or "highest")
    q_in, a_in, what = _inputs(directory, max_length, model.config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="retribert-verify-") as tmp:
        if reference is None:
            try:
                find_hf_weights(directory)
                reference = directory
            except ValueError:
                if not has_flax_weights(directory):
                    raise
                reference = export_pytorch(directory, os.path.join(tmp, "hf"), dtype="float32")
        ref = torch_reference(reference)
        with torch.no_grad():
            tq = ref.embed_questions(
                torch.as_tensor(q_in["input_ids"], dtype=torch.long), torch.as_tensor(q_in["attention_mask"])
            ).numpy()
            ta = ref.embed_answers(
                torch.as_tensor(a_in["input_ids"], dtype=torch.long), torch.as_tensor(a_in["attention_mask"])
            ).numpy()
    fq = np.asarray(model.embed_questions(q_in["input_ids"], q_in["attention_mask"]))
    fa = np.asarray(model.embed_answers(a_in["input_ids"], a_in["attention_mask"]))
    k = min(TOP_K, fa.shape[0])
    top_f = np.argsort(-(fq @ fa.T), axis=1, kind="stable")[:, :k]
    top_t = np.argsort(-(tq @ ta.T), axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_f, top_t, strict=True)]))
    result = {
        "question_max_abs_diff": float(np.abs(fq - tq).max()),
        "answer_max_abs_diff": float(np.abs(fa - ta).max()),
        "top10_overlap": overlap,
        "top10_same_order": float(np.mean(np.all(top_f == top_t, axis=1))),
        "inputs": f"{len(QUESTIONS)} questions x {len(PASSAGES)} passages, {what}",
        "reference": "HF transformers RetriBertModel (PyTorch, fp32)",
        "run": f"ours in {model.run_config.dtype} at {model.run_config.precision} precision",
    }
    result["ok"] = (
        result["question_max_abs_diff"] <= atol and result["answer_max_abs_diff"] <= atol and overlap >= min_agreement
    )
    return result


def report(result: dict[str, Any], atol: float, min_agreement: float) -> str:
    verdict = "OK" if result["ok"] else "FAILED"
    return (
        f"verify: {result['inputs']}; {result['run']}; reference: {result['reference']}\n"
        f"  question embeddings max |flax - torch| = {result['question_max_abs_diff']:.3g}\n"
        f"  answer embeddings   max |flax - torch| = {result['answer_max_abs_diff']:.3g}  (atol {atol:g})\n"
        f"  top-{TOP_K} ranking overlap = {result['top10_overlap']:.3f} (min {min_agreement:g}), "
        f"identical order in {result['top10_same_order']:.0%} of questions\n"
        f"verify: {verdict}"
    )
