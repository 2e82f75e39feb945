"""Every path the package takes to a checkpoint works relative, absolute, with `~` and through a symlink, for both
formats: orbax-checkpoint itself reads no metadata from a relative path, so the package must hand it absolute ones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from retribert_jax import RetriBertModel, cli
from retribert_jax.checkpoint import convert_checkpoint
from tests.embed_helpers import tiny_model_dir


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding an HF checkpoint `hf/` and its conversions `flax-orbax/` and `flax-st/`, made
    with relative paths; HOME points at it so that `~/...` names the same directories."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_model_dir("hf")
    convert_checkpoint("hf", "flax-orbax")
    convert_checkpoint("hf", "flax-st", format="safetensors")
    return tmp_path


@pytest.mark.parametrize("fmt", ["orbax", "st"])
def test_from_pretrained_takes_every_spelling_of_a_path(workdir, fmt):
    name = f"flax-{fmt}"
    os.symlink(name, "linked")
    expected = RetriBertModel.from_pretrained(str(workdir / name)).project_doc.kernel.get_value()
    for spelling in (name, f"./{name}", f"~/{name}", "linked", f"sub/../{name}"):
        os.makedirs("sub", exist_ok=True)
        got = RetriBertModel.from_pretrained(spelling).project_doc.kernel.get_value()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"loading {spelling!r}")


def test_save_pretrained_then_from_pretrained_relative(workdir):
    model = RetriBertModel.from_pretrained("flax-st")
    model.save_pretrained("saved")  # orbax, the default format
    again = RetriBertModel.from_pretrained("saved")
    np.testing.assert_array_equal(
        np.asarray(again.project_query.kernel.get_value()), np.asarray(model.project_query.kernel.get_value())
    )


def test_commands_take_a_relative_orbax_checkpoint(workdir, capsys):
    # docs/convert.md's sequence, as written: convert, export back to PyTorch, embed and search, all relative.
    with open("passages.txt", "w", encoding="utf-8") as f:
        f.write("the sky is blue\nbread does rise\nwhy does ice float\n")
    assert cli.main(["export-pytorch", "flax-orbax", "hf-again"]) == 0
    assert os.path.isfile("hf-again/model.safetensors")
    assert cli.main(["embed", "./flax-orbax", "passages.txt", "idx", "--kind", "passages"]) == 0
    capsys.readouterr()
    assert cli.main(["search", "idx", "flax-orbax", "why does ice float", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[-1])["hits"]
    assert len(hits) == 2 and {str(h["id"]) for h in hits} <= {"0", "1", "2"}


def test_a_failed_hub_download_is_one_line(monkeypatch):
    """huggingface_hub's errors span several lines; the command's error must stay one."""
    import huggingface_hub

    from retribert_jax.hub import resolve_checkpoint

    def fail(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.\n" + "x" * 500)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint("someone/some-model")
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith("someone/some-model: not a local path, and the hub download failed (OSError: We couldn't")
