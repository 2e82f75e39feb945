"""The torch-free `.bin` reader against `torch.load(weights_only=True)`: same tensors, and the same refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from retribert_jax import torch_zip
from retribert_jax.errors import CheckpointError
from retribert_jax.hf_files import read_weight_file
from tests.conftest import REPO

torch = pytest.importorskip("torch")


def _state() -> dict:
    """Every dtype a checkpoint may hold, and the storage layouts torch produces: views sharing one storage at an
    offset, a transposed (non-contiguous) tensor, a scalar, an empty tensor, an nn.Parameter."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 9, generator=g).bfloat16(),
        "i64": torch.arange(10) - 3,
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.tensor([-3, 5], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "view_rows": base[2:5],
        "view_whole": base,
        "transposed": base.t(),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("zip") / "pytorch_model.bin")
    state = _state()
    torch.save(state, path)
    return path, state


def _numpy(t) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_same_tensors_as_torch_load(saved, mmap):
    path, _ = saved
    ours = torch_zip.read_state_dict(path, mmap=mmap)
    ref = torch.load(path, weights_only=True)
    assert list(ours) == list(ref), "names or their order differ"
    for k, t in ref.items():
        want = _numpy(t)
        got = ours[k]
        assert got.dtype == want.dtype, f"{k}: dtype {got.dtype}, torch gives {want.dtype}"
        assert got.shape == want.shape, f"{k}: shape {got.shape}, torch gives {want.shape}"
        assert np.array_equal(got, want), f"{k}: values differ from torch.load"


def test_views_share_one_storage_read(saved):
    path, _ = saved
    ours = torch_zip.read_state_dict(path)
    assert np.shares_memory(ours["view_rows"], ours["view_whole"]), "a storage was read twice"
    assert np.shares_memory(ours["transposed"], ours["view_whole"])


def test_pickled_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.bin")
    torch.save({"w": torch.zeros(2), "evil": Payload()}, path)
    with pytest.raises(torch_zip.RefusedGlobal, match=r"global (posix|os)\.system"):
        torch_zip.read_state_dict(path)
    assert not marker.exists(), "the pickled code was executed"


def test_legacy_format_falls_back_to_torch(tmp_path):
    path = str(tmp_path / "legacy.bin")
    state = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(torch_zip.Unsupported, match="legacy"):
        torch_zip.read_state_dict(path)
    got = read_weight_file(path)  # through torch.load(weights_only=True)
    for k, t in state.items():
        assert np.array_equal(got[k], t.numpy()), k


def test_truncated_archive_is_named_damaged(saved, tmp_path):
    path, _ = saved
    data = open(path, "rb").read()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[: len(data) - 200])
    with pytest.raises(zipfile.BadZipFile, match="damaged zip archive"):
        torch_zip.read_state_dict(str(bad))
    with pytest.raises(CheckpointError, match=r"cut\.bin: not a loadable PyTorch weights file.*damaged"):
        read_weight_file(str(bad))


def test_storage_of_wrong_size_is_named(tmp_path):
    """An archive whose storage holds fewer bytes than the pickle says: the storage is named, nothing is guessed."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.randn(4, 4)}, str(good))
    bad = tmp_path / "short.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[:-8]
            dst.writestr(info.filename, data)
    with pytest.raises(ValueError, match=r"storage '.*data/0' holds 56 bytes, expected 64"):
        torch_zip.read_state_dict(str(bad))


def test_reads_a_checkpoint_without_torch_installed(saved, tmp_path):
    """A JAX-only machine: torch cannot be imported, and the zip checkpoint still reads, identically."""
    path, _ = saved
    out = tmp_path / "arrays.npz"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from retribert_jax.hf_files import read_weight_file\n"
        f"arrs = read_weight_file({path!r})\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        f"np.savez({str(out)!r}, **{{k: np.asarray(v, dtype=np.float64) for k, v in arrs.items()}})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(out)
    ref = torch.load(path, weights_only=True)
    for k, t in ref.items():
        assert np.array_equal(got[k], _numpy(t).astype(np.float64)), k
