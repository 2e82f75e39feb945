import dataclasses
import json

import pytest

from retribert_jax import RetriBertConfig


def test_defaults_equal_hf():
    transformers = pytest.importorskip("transformers")
    hf = transformers.RetriBertConfig().to_dict()
    ours = RetriBertConfig()
    for f in dataclasses.fields(ours):
        if f.name != "extra":
            assert getattr(ours, f.name) == hf[f.name], f"default of {f.name}: {getattr(ours, f.name)} vs {hf[f.name]}"
    assert ours == RetriBertConfig.retribert_base_uncased()


def test_hf_config_json_round_trip_is_lossless(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.RetriBertConfig(hidden_size=64, num_attention_heads=4, share_encoders=False).save_pretrained(tmp_path)
    original = json.loads((tmp_path / "config.json").read_text())
    cfg = RetriBertConfig.from_pretrained(tmp_path)
    assert cfg.hidden_size == 64 and cfg.share_encoders is False
    assert "transformers_version" in cfg.extra and "architectures" not in dataclasses.asdict(cfg)
    assert cfg.to_hf_dict() == original
    out = tmp_path / "again"
    cfg.save_pretrained(out)
    assert json.loads((out / "config.json").read_text()) == original
    assert RetriBertConfig.from_pretrained(out) == cfg


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(hidden_act="gelu_fancy"), "unknown hidden_act"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size must be a positive integer"),
        (dict(projection_dim=1.5), "projection_dim must be a positive integer"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(pad_token_id=99999), "pad_token_id"),
    ],
)
def test_impossible_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        RetriBertConfig(**changes)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        RetriBertConfig.from_pretrained(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        RetriBertConfig.from_pretrained(tmp_path)
    bad.write_text(json.dumps({"hidden_size": 10, "num_attention_heads": 3}))
    with pytest.raises(ValueError, match=r"config.json: config: hidden_size 10 is not divisible"):
        RetriBertConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        RetriBertConfig.from_pretrained(tmp_path / "nowhere")


def test_architecture_hash_ignores_extra_keys_only():
    a = RetriBertConfig.tiny()
    assert a.architecture_hash() == RetriBertConfig.tiny(extra={"transformers_version": "4.30.0"}).architecture_hash()
    assert a.architecture_hash() != RetriBertConfig.tiny(projection_dim=8).architecture_hash()


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(learning_rate=float("nan")), "learning_rate must be a finite number, got nan"),
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number, got inf"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
        (dict(grad_clip=float("inf")), "grad_clip must be a finite number"),
        (dict(adam_b2=1.0), r"adam_b1, adam_b2 in \[0, 1\)"),
        (dict(max_length=1), r"max_length must be at least 2 \(\[CLS\] and \[SEP\]\)"),
    ],
)
def test_impossible_training_settings_are_refused(changes, message):
    """A NaN or infinite learning rate or weight decay passed every check (NaN compares False) and trained a NaN
    model to the end, exit 0."""
    from retribert_jax.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
