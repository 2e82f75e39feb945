"""`train` fitted to the machine and the data: the gradient-cache micro-batch from the device's memory, a memory error
as one line, what a run's data makes of its settings said before it starts, a bar that counts finished steps, and a
finished run's rerun."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from retribert_jax import cli
from retribert_jax.config import RetriBertConfig, TrainConfig
from retribert_jax.training import _StepBar, activation_bytes_per_pair, fit_micro_batch, run_warnings
from tests.test_train import tiny_start

MINILM = RetriBertConfig(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    projection_dim=384,
)
GIB = 2**30


def test_activation_estimate_matches_the_allocation_that_failed():
    """Issue 22: MiniLM, batch 512, 128 tokens, one hard negative ran out of memory allocating 44,840,592,128
    bytes on a 24 GB machine."""
    estimate = 512 * activation_bytes_per_pair(MINILM, 128, 1)
    assert 0.9 <= estimate / 44_840_592_128 <= 1.15, f"estimate {estimate / 1e9:.1f} GB"


def test_micro_batch_fits_the_memory():
    tcfg = TrainConfig()  # batch 512, max_length 128
    per_pair = activation_bytes_per_pair(MINILM, 128, 1)
    micro = fit_micro_batch(MINILM, tcfg, 1, 1, 24 * GIB)
    assert micro is not None and 512 % micro == 0 and micro * per_pair <= 12 * GIB, micro
    assert 2 * micro * per_pair > 12 * GIB - 16 * 4 * 30e6, f"{micro} is not the largest that fits"
    assert fit_micro_batch(MINILM, tcfg, 1, 1, 1024 * GIB) is None, "the whole batch fits: one pass"
    assert fit_micro_batch(MINILM, tcfg, 1, 1, None) is None, "unknown memory: as asked"
    assert fit_micro_batch(MINILM, tcfg, 1, 8, GIB // 4) == 8, "at least one pair a device"
    assert fit_micro_batch(MINILM, tcfg, 1, 8, 24 * GIB) is None, "64 pairs a device fit 24 GiB"
    micro = fit_micro_batch(MINILM, tcfg, 1, 8, 4 * GIB)
    assert micro == 128, f"{micro}: 16 pairs a device fit 4 GiB, 32 do not"


def test_a_run_that_trains_little_says_so():
    """Issue 22's run: 1,000 pairs at batch 512 make one step an epoch, leave 488 out each epoch, and the ten steps
    never leave the 100-step warm-up (the learning rate never above 1.8e-5)."""
    warnings = run_warnings(1000, TrainConfig())
    assert len(warnings) == 3, warnings
    assert "1000 pairs in batches of 512 make 1 step an epoch, 10 in all" in warnings[0]
    assert "leaves out 488 of 1000 pairs (49%)" in warnings[1]
    assert "never leave the 100-step warm-up: the learning rate peaks at 1.8e-05, not 0.0002" in warnings[2]
    assert run_warnings(100_000, TrainConfig()) == []


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_progress_counts_finished_steps():
    waited = []

    class Metrics:
        def __init__(self, step):
            self.step, self.loss = step, jnp.zeros(())

        def block_until_ready(self):
            waited.append(self.step)
            return self

    real = jax.block_until_ready
    jax.block_until_ready = lambda x: x.block_until_ready()
    try:
        bar = _StepBar(_Bar())
        bar.dispatched(Metrics(1))
        assert (bar.bar.n, waited) == (0, []), "a dispatched step was counted before it finished"
        bar.dispatched(Metrics(2))
        assert (bar.bar.n, waited) == (1, [1]), "step 1 was not waited for when step 2 was dispatched"
        bar.finish()
        assert (bar.bar.n, waited) == (2, [1, 2])
    finally:
        jax.block_until_ready = real


def _tiny_run(tmp_path, *extra: str) -> list[str]:
    config, data = tiny_start(tmp_path)
    return [
        "train",
        config,
        data,
        str(tmp_path / "out"),
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--no-progress",
        "--checkpoint-batch-size",
        "4",
        *extra,
    ]


def test_out_of_memory_ends_in_one_line(tmp_path, monkeypatch, capsys):
    from retribert_jax import training

    def step_that_runs_out(*_args, **_kwargs):
        def step(*_):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 44840592128 bytes.")

        return step

    monkeypatch.setattr(training, "make_train_step", step_that_runs_out)
    # Without --max-length, the tiny model's 64 positions (not the default 128, which it cannot take).
    assert cli.main(_tiny_run(tmp_path, "--micro-batch-size", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "retribert-jax train: error: a training step of 8 pairs at max_length 64 ran out of device "
        "memory; pass --micro-batch-size 2 (micro-batches of 4 pairs did not fit)"
    ), err
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_warnings_before_the_run_and_a_finished_run_rerun(tmp_path, capsys):
    argv = _tiny_run(tmp_path, "--warmup-steps", "10")
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: the run's 6 steps never leave the 10-step warm-up" in err, err
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert f"{tmp_path / 'out'}: already complete (6 steps, last loss " in out.err, out
    assert "n/a" not in out.err + out.out
