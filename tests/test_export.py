"""`retribert-jax export-pytorch`: HF transformers loads the export strictly, and convert -> export is bit-exact."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retribert_jax import RetriBertConfig, cli
from retribert_jax.checkpoint import convert_checkpoint, export_pytorch
from tests.conftest import hf_reference, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _load_strict(directory: str):
    model, info = transformers.RetriBertModel.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"HF loading of {directory} reported {problems}"
    return model


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_convert_then_export_is_bit_exact(hf_checkpoint, tmp_path, fmt, capsys):
    ref, src = hf_checkpoint
    flax_dir, _ = convert_checkpoint(src, str(tmp_path / "flax"), format=fmt)
    assert cli.main(["export-pytorch", flax_dir, str(tmp_path / "exported")]) == 0, capsys.readouterr().err
    back = _load_strict(str(tmp_path / "exported"))
    want, got = ref.state_dict(), back.state_dict()
    assert set(got) == set(want), f"key sets differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{k}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        assert torch.equal(g, w), f"{k}: {(g != w).sum().item()} entries differ, max {(g - w).abs().max().item():.3g}"


def test_export_of_a_model_object_and_of_a_cast_checkpoint(tmp_path, tiny_cfg):
    from retribert_jax import RetriBertModel

    ref = hf_reference(tiny_cfg)
    src = save_hf(ref, str(tmp_path / "src"))
    model = RetriBertModel.from_pretrained(src)
    _load_strict(export_pytorch(model, str(tmp_path / "from-model")))
    half, _ = convert_checkpoint(src, str(tmp_path / "bf16"), dtype="bfloat16", format="safetensors")
    out = export_pytorch(half, str(tmp_path / "bf16-hf"), dtype="float32")
    back = _load_strict(out).state_dict()
    for k, w in ref.state_dict().items():
        rounded = w.to(torch.bfloat16).to(torch.float32)
        assert torch.equal(back[k], rounded), f"{k}: not the bfloat16-rounded original"


def test_export_errors(tmp_path, tiny_cfg, capsys):
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    rc = cli.main(["export-pytorch", src, str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a Flax checkpoint" in err and err.count("\n") == 0, (rc, err)
    rc = cli.main(["export-pytorch", str(tmp_path / "nope"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no such directory" in err, (rc, err)
    flax_dir, _ = convert_checkpoint(src, str(tmp_path / "flax"))
    os.makedirs(tmp_path / "taken")
    rc = cli.main(["export-pytorch", flax_dir, str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err, (rc, err)
    assert not os.path.exists(tmp_path / "out"), "a failed export left OUT behind"


def test_export_writes_hf_config_and_tokenizer(tmp_path, tiny_cfg):
    from tests.test_convert import _write_tokenizer

    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    _write_tokenizer(src, tiny_cfg.vocab_size)
    flax_dir, _ = convert_checkpoint(src, str(tmp_path / "flax"))
    out = export_pytorch(flax_dir, str(tmp_path / "back"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(out))
    assert RetriBertConfig.from_pretrained(out) == tiny_cfg
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(["w3 w4"])["input_ids"]
    assert np.array_equal(ids, [[2, 8, 9, 3]]), ids
