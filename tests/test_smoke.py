import numpy as np

from retribert_jax import RetriBertModel
from tests.conftest import hf_reference, random_batch, save_hf


def test_loads_hf_checkpoint_and_matches_embeddings(tmp_path, tiny_cfg):
    torch = __import__("torch")
    ref = hf_reference(tiny_cfg)
    model = RetriBertModel.from_pretrained(save_hf(ref, str(tmp_path)))
    ids, mask = random_batch(np.random.default_rng(0), 3, 7, tiny_cfg.vocab_size)
    ours = np.asarray(model.embed_questions(ids, mask))
    with torch.no_grad():
        theirs = ref.embed_questions(torch.tensor(ids, dtype=torch.long), torch.tensor(mask)).numpy()
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-5, f"question embeddings differ by {diff:.3g}"
