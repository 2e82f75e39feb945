"""Bad input to `retribert-jax convert`: one line on stderr naming what is wrong, exit 2, and no OUT left behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from retribert_jax import cli
from retribert_jax.config import RetriBertConfig
from tests.conftest import hf_reference, save_hf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, str]:
    """A tiny HF checkpoint as a safetensors directory and as a .bin directory."""
    root = tmp_path_factory.mktemp("good")
    ref = hf_reference(RetriBertConfig.tiny())
    return {"st": save_hf(ref, str(root / "st")), "bin": save_hf(ref, str(root / "bin"), safe=False)}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _convert_fails(capsys, tmp_path, argv: list[str], *needles: str) -> str:
    out = tmp_path / "out"
    rc = cli.main(["convert", *argv, str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc}, expected 2; stderr: {err!r}"
    assert err.count("\n") == 0, f"expected one line on stderr, got:\n{err}"
    assert err.startswith("retribert-jax convert: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in the error: {err!r}"
    assert not out.exists(), f"OUT was created: {os.listdir(out)}"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    assert not leftovers, f"temporary directories left behind: {leftovers}"
    return err


def test_missing_src(capsys, tmp_path):
    _convert_fails(capsys, tmp_path, [str(tmp_path / "nope")], "nope", "no such file")


def test_empty_src_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _convert_fails(capsys, tmp_path, [str(tmp_path / "empty")], "empty")


def test_empty_weight_file(capsys, tmp_path, good):
    (tmp_path / "w.safetensors").write_bytes(b"")
    _convert_fails(
        capsys, tmp_path, [str(tmp_path / "w.safetensors"), "--config", good["st"]], "w.safetensors", "empty"
    )


def test_directory_without_weights(capsys, tmp_path, good):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(good["st"], "config.json"), d)
    _convert_fails(capsys, tmp_path, [str(d)], "no weights found")


def test_single_file_without_config(capsys, tmp_path, good):
    shutil.copy(os.path.join(good["st"], "model.safetensors"), tmp_path / "w.safetensors")
    _convert_fails(capsys, tmp_path, [str(tmp_path / "w.safetensors")], "--config")


@pytest.mark.parametrize(
    "kind,name,message",
    [
        ("st", "model.safetensors", "not a readable safetensors file"),
        ("bin", "pytorch_model.bin", "not a loadable PyTorch weights file"),
    ],
)
def test_truncated_weights(capsys, tmp_path, good, kind, name, message):
    d = _copy(good[kind], tmp_path / "trunc")
    f = os.path.join(d, name)
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    _convert_fails(capsys, tmp_path, [d], name, message)


def test_corrupt_safetensors_header(capsys, tmp_path, good):
    d = _copy(good["st"], tmp_path / "corrupt")
    f = os.path.join(d, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[8:20] = b"not json !!!"
    open(f, "wb").write(bytes(data))
    _convert_fails(capsys, tmp_path, [d], "model.safetensors", "not a readable safetensors file")


def test_garbage_bin(capsys, tmp_path, good):
    d = _copy(good["bin"], tmp_path / "garbage")
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(np.random.default_rng(0).bytes(4096))
    _convert_fails(capsys, tmp_path, [d], "pytorch_model.bin", "not a loadable PyTorch weights file")


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_pickled_code_is_refused(capsys, tmp_path, good):
    d = _copy(good["bin"], tmp_path / "evil")
    marker = tmp_path / "code-ran"
    state = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    state["evil"] = _Payload(str(marker))
    torch.save(state, os.path.join(d, "pytorch_model.bin"))
    _convert_fails(
        capsys,
        tmp_path,
        [d],
        "pytorch_model.bin",
        "not a loadable PyTorch weights file",
        "refused to unpickle the global",
        "system",
    )
    assert not marker.exists(), "the pickled code was executed"


def _edit_state(good_dir: str, dst, edit) -> str:
    from safetensors.numpy import load_file, save_file

    d = _copy(good_dir, dst)
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return d


def test_missing_key(capsys, tmp_path, good):
    d = _edit_state(good["st"], tmp_path / "missing", lambda t: t.pop("project_doc.weight"))
    _convert_fails(capsys, tmp_path, [d], "1 missing key", "project_doc.weight")


def test_extra_key(capsys, tmp_path, good):
    d = _edit_state(
        good["st"], tmp_path / "extra", lambda t: t.__setitem__("classifier.weight", np.zeros((2, 2), np.float32))
    )
    _convert_fails(capsys, tmp_path, [d], "unexpected key", "classifier.weight")


def test_shapes_disagree_with_config(capsys, tmp_path, good):
    d = _copy(good["st"], tmp_path / "shape")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 48
    json.dump(cfg, open(cfg_path, "w"))
    _convert_fails(capsys, tmp_path, [d], "intermediate.dense.", "has shape (64", "expected (48", "model.safetensors")


def test_config_not_json(capsys, tmp_path, good):
    d = _copy(good["st"], tmp_path / "badjson")
    open(os.path.join(d, "config.json"), "w").write("{ not json")
    _convert_fails(capsys, tmp_path, [d], "config.json", "not valid JSON")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_size", -32, "hidden_size must be a positive integer"),
        ("num_attention_heads", 5, "not divisible"),
        ("hidden_act", "swishy", "unknown hidden_act"),
    ],
)
def test_config_impossible_values(capsys, tmp_path, good, field, value, needle):
    d = _copy(good["st"], tmp_path / "badcfg")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg[field] = value
    json.dump(cfg, open(cfg_path, "w"))
    _convert_fails(capsys, tmp_path, [d], "config.json", needle)


def test_existing_out_refused_then_overwritten(capsys, tmp_path, good):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli.main(["convert", good["st"], str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and err.count("\n") == 0, (rc, err)
    assert (out / "keep.txt").read_text() == "mine", "a refused convert touched OUT"
    rc = cli.main(["convert", good["st"], str(out), "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    assert not (out / "keep.txt").exists() and (out / "flax_params").is_dir(), os.listdir(out)


def test_bad_dtype_and_format_rejected_by_argparse(capsys, tmp_path, good):
    for flag, value in (("--dtype", "int8"), ("--format", "pickle")):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", good["st"], str(tmp_path / "out"), flag, value])
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
