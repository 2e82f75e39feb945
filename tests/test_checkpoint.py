"""Loading HF checkpoints: every format, and strict refusal of anything that does not fit the config."""

import json
import os
import pickle

import numpy as np
import pytest

from retribert_jax import RetriBertConfig, RetriBertModel
from retribert_jax.checkpoint import load_model
from retribert_jax.errors import CheckpointError
from tests.conftest import hf_reference, random_batch, save_hf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ref_and_ids():
    cfg = RetriBertConfig.tiny()
    ids, mask = random_batch(np.random.default_rng(0), 3, 8, cfg.vocab_size)
    ref = hf_reference(cfg)
    with torch.no_grad():
        q = ref.embed_questions(torch.tensor(ids, dtype=torch.long), torch.tensor(mask)).numpy()
    return cfg, ref, ids, mask, q


def _check(model, ids, mask, q, what):
    diff = np.abs(np.asarray(model.embed_questions(ids, mask)) - q).max()
    assert diff <= 1e-5, f"{what}: embeddings differ by {diff:.3g}"


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_every_hf_format_loads(tmp_path, ref_and_ids, safe, sharded):
    cfg, ref, ids, mask, q = ref_and_ids
    ref.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB" if sharded else "5GB")
    names = os.listdir(tmp_path)
    assert any(n.endswith(".index.json") for n in names) == sharded, names
    _check(RetriBertModel.from_pretrained(str(tmp_path)), ids, mask, q, f"safe={safe} sharded={sharded}")


def test_single_weight_file_with_config(tmp_path, ref_and_ids):
    cfg, ref, ids, mask, q = ref_and_ids
    save_hf(ref, str(tmp_path / "d"))
    _check(load_model(str(tmp_path / "d" / "model.safetensors"), config=cfg), ids, mask, q, "single file")


def test_legacy_gamma_beta_and_buffers(tmp_path, ref_and_ids):
    cfg, ref, ids, mask, q = ref_and_ids
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in ref.state_dict().items()
    }
    state["bert_query.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    state["bert_query.embeddings.token_type_ids"] = torch.zeros(1, cfg.max_position_embeddings, dtype=torch.long)
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg.save_pretrained(tmp_path)
    _check(RetriBertModel.from_pretrained(str(tmp_path)), ids, mask, q, "gamma/beta names")


def _write(tmp_path, cfg, state):
    from safetensors.torch import save_file

    cfg.save_pretrained(tmp_path)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    return str(tmp_path)


def test_strict_both_ways(tmp_path, ref_and_ids):
    cfg, ref, *_ = ref_and_ids
    base = dict(ref.state_dict())
    cases = {
        "unknown": ({**base, "bert_query.extra.weight": torch.zeros(2)}, r"unexpected key\(s\): 'bert_query.extra"),
        "missing": ({k: v for k, v in base.items() if k != "project_doc.weight"}, r"missing key\(s\): 'project_doc"),
        "twice": (
            {
                **base,
                "bert_query.pooler.dense.bias": base["bert_query.pooler.dense.bias"],
                "bert_query.embeddings.LayerNorm.gamma": base["bert_query.embeddings.LayerNorm.weight"],
            },
            "'bert_query.embeddings.LayerNorm.weight' is given twice",
        ),
        "shape": (
            {**base, "project_query.weight": torch.zeros(7, cfg.hidden_size)},
            r"key 'project_query.weight' has shape \(7, 32\), expected \(16, 32\)",
        ),
    }
    for name, (state, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_model(_write(tmp_path / name, cfg, state))


def test_bert_doc_against_share_encoders(tmp_path):
    separate = hf_reference(RetriBertConfig.tiny(share_encoders=False))
    path = save_hf(separate, str(tmp_path))
    assert RetriBertModel.from_pretrained(path).bert_doc is not None
    with pytest.raises(CheckpointError, match="has bert_doc but the config says share_encoders=true"):
        load_model(path, config=RetriBertConfig.tiny(share_encoders=True))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    RetriBertConfig.tiny().save_pretrained(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert_query.x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a loadable PyTorch weights file"):
        load_model(str(tmp_path))


def test_broken_files_name_the_file(tmp_path, ref_and_ids):
    cfg, ref, *_ = ref_and_ids
    with pytest.raises(CheckpointError, match="no weights found"):
        cfg.save_pretrained(tmp_path / "empty")
        load_model(str(tmp_path / "empty"))
    path = save_hf(ref, str(tmp_path / "cut"))
    blob = open(os.path.join(path, "model.safetensors"), "rb").read()
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(path)
    open(os.path.join(path, "model.safetensors"), "wb").close()
    with pytest.raises(CheckpointError, match="model.safetensors: the file is empty"):
        load_model(path)
    index = tmp_path / "idx"
    cfg.save_pretrained(index)
    (index / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="not a valid sharded-checkpoint index"):
        load_model(str(index))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model(str(tmp_path / "does" / "not" / "exist"))
