"""How a model runs (`RunConfig`): held by the model, honoured by every program the Encoder compiles, on its compile
thread too; the Encoder runs a model as the model says unless told otherwise, and says so when told otherwise."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retribert_jax import RetriBertModel, RetriBertTokenizer, RunConfig, encode
from retribert_jax.config import COMPILER_OPTIONS
from retribert_jax.encode import Encoder
from tests.embed_helpers import random_texts, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("m") / "hf"))


@pytest.fixture
def lowered(monkeypatch):
    """The StableHLO and XLA options of every program an Encoder compiles from now on."""
    seen: list[tuple[str, dict]] = []
    real = encode.compile_lowered

    def capture(lowered, platform, options=None):
        seen.append((lowered.as_text(), options))
        return real(lowered, platform, options)

    monkeypatch.setattr(encode, "compile_lowered", capture)
    return seen


def precisions(text: str) -> set[str]:
    """The precision of every dot_general in a StableHLO text ("DEFAULT" where none is written)."""
    found = set()
    for line in text.splitlines():
        if "stablehlo.dot_general" in line:
            m = re.search(r"precision = \[(\w+), (\w+)\]", line)
            found.add(m.group(1) if m else "DEFAULT")
    return found


def test_fields_are_checked_and_named():
    assert RunConfig(dtype=jnp.bfloat16, precision=jax.lax.Precision.HIGHEST) == RunConfig("bfloat16", None, "highest")
    assert RunConfig(precision="float32").precision == "highest"  # JAX's alias
    for bad, match in (
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(precision="max"), "precision must"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(attention_impl="cudnn"), "bfloat16"),
        (dict(scan_unroll=True), "scan_unroll"),
        (dict(scan_unroll=0), "scan_unroll"),
        (dict(trim_last_layer=1), "trim_last_layer"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig(**bad)


def test_unroll_one_and_two_are_different_graphs(model_dir):
    """A graph compares static attributes with ==, so the unroll must never be a bool that equals an int."""
    a = RetriBertModel.from_pretrained(model_dir, run_config=RunConfig(scan_unroll=1))
    b = a.with_run_config(RunConfig(scan_unroll=2))
    assert nnx.graphdef(a) != nnx.graphdef(b)
    ids = np.array([[2, 10, 11, 3]], np.int32)
    np.testing.assert_allclose(np.asarray(b.embed_answers(ids)), np.asarray(a.embed_answers(ids)), atol=1e-6)


def test_the_model_holds_its_settings_through_loading(model_dir):
    model = RetriBertModel.from_pretrained(model_dir, dtype="bfloat16", precision="high")
    assert model.run_config == RunConfig(dtype="bfloat16", precision="high")
    layer = model.bert_query.encoder.layer
    assert layer.attention.self.query.dtype == jnp.bfloat16 and layer.attention.self.query.precision == "high"
    assert layer.output.LayerNorm.dtype == jnp.bfloat16, "bf16 mode keeps the residual stream in bf16"
    f32_stream = RetriBertModel.from_pretrained(
        model_dir, dtype="bfloat16", run_config=RunConfig(residual_dtype="float32")
    )
    assert f32_stream.bert_query.encoder.layer.output.LayerNorm.dtype == jnp.float32
    assert jax.tree.leaves(nnx.state(model))[0].dtype == jnp.float32, "parameters stay float32"


def test_precision_context_reaches_the_compile_thread(model_dir, lowered):
    """The Encoder compiles on a background thread, which does not see the caller's `jax.default_matmul_precision`
    context: the Encoder reads it on the calling thread and compiles with it. (The suite's global default is
    "highest", so "high" here can only come from the context.)"""
    enc = Encoder(RetriBertModel.from_pretrained(model_dir), RetriBertTokenizer.from_pretrained(model_dir))
    texts = random_texts(20, seed=1)
    with jax.default_matmul_precision("high"):
        high = enc.encode_passages(texts)
    assert lowered and all(precisions(text) == {"HIGH"} for text, _ in lowered), (
        f"programs compiled under 'high' carry {[precisions(t) for t, _ in lowered]}"
    )
    lowered.clear()
    highest = enc.encode_passages(texts)  # the global default: another program
    assert lowered and all(precisions(text) == {"HIGHEST"} for text, _ in lowered)
    assert np.abs(high - highest).max() < 1e-3


def test_the_models_own_precision_wins_over_the_context(model_dir, lowered):
    model = RetriBertModel.from_pretrained(model_dir, precision="high")
    enc = Encoder(model, RetriBertTokenizer.from_pretrained(model_dir))
    with jax.default_matmul_precision("highest"):
        enc.encode_questions(["why does ice float"])
    assert [precisions(text) for text, _ in lowered] == [{"HIGH"}]


def test_a_bf16_model_runs_in_bf16_without_a_word(model_dir, lowered):
    model = RetriBertModel.from_pretrained(model_dir, dtype=jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = Encoder(model, RetriBertTokenizer.from_pretrained(model_dir))
        enc.encode_passages(random_texts(5, seed=2))
    assert enc.run_config.dtype == "bfloat16"
    ((text, options),) = lowered
    assert re.search(r"stablehlo\.dot_general[^\n]*tensor<[^>]*bf16>", text), "no bf16 matmul in the program"
    assert options == COMPILER_OPTIONS["cpu"]
    # cuDNN attention on a bf16 model: the Encoder keeps the model's kernel rather than refusing a float32 it made up.
    cudnn = Encoder(
        RetriBertModel.from_pretrained(model_dir, dtype="bfloat16", attention_impl="cudnn"),
        RetriBertTokenizer.from_pretrained(model_dir),
    )
    assert cudnn.run_config.attention_impl == "cudnn" and cudnn.run_config.dtype == "bfloat16"


def test_the_encoder_says_when_it_runs_a_model_otherwise(model_dir):
    model = RetriBertModel.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match="dtype 'bfloat16' instead of its 'float32'"):
        enc = Encoder(model, RetriBertTokenizer.from_pretrained(model_dir), dtype="bfloat16")
    assert enc.run_config.dtype == "bfloat16" and model.run_config.dtype == "float32"


def test_programs_get_their_platforms_compiler_options(model_dir, lowered):
    """Each program is compiled with its platform's options from the model's RunConfig (on a GPU: cuBLAS for every
    GEMM, not Triton). This machine has no GPU, so the check is on what the Encoder asks XLA for here."""
    assert RunConfig().compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert RunConfig().compiler_options("gpu", training=True) == {"xla_gpu_enable_triton_gemm": False}
    assert RunConfig().compiler_options("cpu", training=True) == {}, "XLA:CPU's defaults compile a train step sooner"
    enc = Encoder(RetriBertModel.from_pretrained(model_dir), RetriBertTokenizer.from_pretrained(model_dir))
    enc.encode_passages(["a b c"])
    assert [options for _, options in lowered] == [
        RetriBertModel.from_pretrained(model_dir).run_config.compiler_options("cpu")
    ]


def test_the_train_step_runs_as_the_model_says(model_dir):
    """Every matmul of the training step, the loss's score matmuls included, carries the model's precision."""
    from retribert_jax.config import TrainConfig
    from retribert_jax.training import make_optimizer, make_train_step

    model = RetriBertModel.from_pretrained(model_dir, precision="high")
    graphdef, params = nnx.split(model, nnx.Param)
    tcfg = TrainConfig(batch_size=4, max_length=16, dropout=False, checkpoint_batch_size=-1)
    tx = make_optimizer(tcfg, 10)
    step = make_train_step(graphdef, tx, tcfg, run_config=model.run_config)
    ids = np.tile(np.array([[2, 10, 11, 3]], np.int32), (4, 1))
    batch = {"q_ids": ids, "q_mask": np.ones_like(ids), "p_ids": ids, "p_mask": np.ones_like(ids)}
    text = step.lower(params, tx.init(params), batch, jax.random.key(0), 0).as_text()
    assert precisions(text) == {"HIGH"}, f"train step matmuls at {precisions(text)}"
