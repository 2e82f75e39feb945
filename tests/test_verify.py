"""`retribert-jax verify` and `convert --verify`: the PyTorch reference against our model, and the failure paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from retribert_jax import cli
from retribert_jax.checkpoint import convert_checkpoint
from tests.conftest import REPO, hf_reference, save_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _diffs(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"max \|flax - torch\| = ([0-9.eE+-]+)", stdout)]


@pytest.mark.parametrize("what", ["hf", "flax"])
def test_verify_passes(tmp_path, tiny_cfg, capsys, what):
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    target = src if what == "hf" else convert_checkpoint(src, str(tmp_path / "flax"))[0]
    rc = cli.main(["verify", target])
    out = capsys.readouterr().out
    diffs = _diffs(out)
    assert rc == 0, out
    assert len(diffs) == 2 and max(diffs) <= 1e-5, f"question/answer diffs {diffs} (fp32 should agree to 1e-5)"
    assert "top-10 ranking overlap = 1.000" in out, out
    assert out.strip().endswith("verify: OK"), out


def test_convert_verify_failure_leaves_no_out(tmp_path, tiny_cfg, capsys):
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    out_dir = tmp_path / "out"
    # bfloat16 parameters against the fp32 source cannot meet a 1e-7 tolerance.
    rc = cli.main(["convert", src, str(out_dir), "--dtype", "bfloat16", "--verify", "--atol", "1e-7"])
    captured = capsys.readouterr()
    assert rc == 1, (rc, captured.err)
    assert "verify: FAILED" in captured.out, captured.out
    assert min(_diffs(captured.out)) > 1e-7, captured.out
    assert "was not written" in captured.err, captured.err
    assert not out_dir.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    # The default tolerance for bfloat16 accepts the same conversion.
    rc = cli.main(["convert", src, str(out_dir), "--dtype", "bfloat16", "--verify"])
    assert rc == 0, capsys.readouterr()
    assert (out_dir / "flax_params").is_dir()


def test_verify_without_torch_says_what_to_install(tmp_path, tiny_cfg):
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from retribert_jax.cli import main\n"
        f"sys.exit(main(['verify', {src!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err)
    assert err.count("\n") == 0 and "pip install" in err and "torch" in err, err


def test_verify_runs_the_model_in_bfloat16_against_the_float32_reference(tmp_path, tiny_cfg, capsys):
    """`verify --dtype bfloat16` measures the bf16 model against the fp32 reference, at the bf16 tolerance."""
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    rc = cli.main(["verify", src, "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    diffs = _diffs(out)
    assert rc == 0, out
    assert "ours in bfloat16 at highest precision" in out and "(atol 0.01)" in out, out
    assert len(diffs) == 2 and 1e-5 < max(diffs) <= 1e-2, f"bf16 diffs {diffs}: not bf16's (or beyond its bound)"
