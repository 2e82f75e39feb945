"""`retribert-jax verify DIR`: the PyTorch reference (HF transformers) against our Flax model on built-in texts."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

HELP = "compare a checkpoint's Flax embeddings with HF transformers' PyTorch RetriBertModel on sample texts"

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
TORCH_MISSING = ("verify needs torch and transformers for the PyTorch reference: "
                 "pip install 'retribert_jax[test]' (torch==2.13.0, transformers>=4.57,<5)")


class VerificationFailed(Exception):
    """The Flax model and the PyTorch reference disagree beyond the tolerance."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a checkpoint directory (Flax, from convert; or HF PyTorch) or hub id")
    add_tolerance_arguments(p)


def add_tolerance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, default=None,
                   help="largest allowed |flax - torch| of any embedding entry (default: 1e-4; with convert --dtype, "
                        "1e-3 for float16 and 1e-2 for bfloat16, where the reference keeps the fp32 source weights)")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help=f"smallest allowed mean overlap of the two top-{TOP_K} rankings (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length (default: %(default)s)")


def _torch_reference(hf_dir: str):
    import torch
    import transformers

    config = transformers.RetriBertConfig.from_pretrained(hf_dir)
    # transformers 4.57's BERT layers read this attribute, which RetriBertConfig does not define.
    config.position_embedding_type = getattr(config, "position_embedding_type", "absolute")
    model = transformers.RetriBertModel.from_pretrained(hf_dir, config=config, dtype=torch.float32)
    return model.eval()


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
            mask[n // 2:, 12:] = 0
            return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}

        return fake(len(QUESTIONS)), fake(len(PASSAGES)), "random token ids (no tokenizer in the checkpoint)"
    return tok(QUESTIONS, max_length=max_length), tok(PASSAGES, max_length=max_length), "built-in sample texts"


def verify_checkpoint(directory: str, *, reference: str | None = None, atol: float = 1e-4,
                      min_agreement: float = 0.9, max_length: int = 128) -> dict[str, Any]:
    """Runs both models on the built-in texts and compares them.

    Args:
      directory: the checkpoint our loader reads (Flax or HF directory).
      reference: an HF PyTorch directory for the reference; default `directory` itself when it holds HF weights,
        else a temporary export of it.
      atol, min_agreement: the pass criteria (max abs embedding diff; mean top-10 overlap).
      max_length: tokenizer truncation length.

    Returns:
      {"question_max_abs_diff", "answer_max_abs_diff", "top10_overlap", "top10_same_order", "inputs", "ok"}.
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        from retribert_jax.cli import UserError

        raise UserError(TORCH_MISSING) from None
    import jax
    import numpy as np

    from retribert_jax.checkpoint import find_hf_weights, has_flax_weights, load_model, resolve_checkpoint
    from retribert_jax.export import export_pytorch

    # The reference is fp32 on CPU; compare against fp32 matmuls, not TF32/bf16 passes.
    jax.config.update("jax_default_matmul_precision", "highest")
    directory = resolve_checkpoint(directory)
    model = load_model(directory)
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
        ref = _torch_reference(reference)
        with torch.no_grad():
            tq = ref.embed_questions(torch.as_tensor(q_in["input_ids"], dtype=torch.long),
                                     torch.as_tensor(q_in["attention_mask"])).numpy()
            ta = ref.embed_answers(torch.as_tensor(a_in["input_ids"], dtype=torch.long),
                                   torch.as_tensor(a_in["attention_mask"])).numpy()
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
    }
    result["ok"] = (result["question_max_abs_diff"] <= atol and result["answer_max_abs_diff"] <= atol
                    and overlap >= min_agreement)
    return result


def report(result: dict[str, Any], atol: float, min_agreement: float) -> str:
    verdict = "OK" if result["ok"] else "FAILED"
    return (f"verify: {result['inputs']}; reference: {result['reference']}\n"
            f"  question embeddings max |flax - torch| = {result['question_max_abs_diff']:.3g}\n"
            f"  answer embeddings   max |flax - torch| = {result['answer_max_abs_diff']:.3g}  (atol {atol:g})\n"
            f"  top-{TOP_K} ranking overlap = {result['top10_overlap']:.3f} (min {min_agreement:g}), "
            f"identical order in {result['top10_same_order']:.0%} of questions\n"
            f"verify: {verdict}")


def run(args: argparse.Namespace) -> int:
    # DIR's own weights are the reference here (exported at fp32 when DIR is Flax-only), so fp32's tolerance holds.
    atol = DEFAULT_ATOL[None] if args.atol is None else args.atol
    result = verify_checkpoint(args.dir, atol=atol, min_agreement=args.min_agreement, max_length=args.max_length)
    print(report(result, atol, args.min_agreement))
    return 0 if result["ok"] else 1
