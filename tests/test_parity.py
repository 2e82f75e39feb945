"""Parity with HF transformers' PyTorch RetriBertModel, bottom-up, in fp32 at highest matmul precision.

Bar: max |diff| <= 1e-5 on activations and embeddings, relative error <= 1e-4 on every gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retribert_jax import RetriBertConfig, RetriBertModel, RunConfig
from retribert_jax.params import flat_params, param_table, path_str
from tests.conftest import hf_reference, random_batch, save_hf

torch = pytest.importorskip("torch")

ATOL = 1e-5
GRAD_RTOL = 1e-4


def assert_close(ours, theirs, what: str, atol: float = ATOL):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs reference {theirs.shape}"
    diff = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:g}"


def t(x):
    x = np.asarray(x)
    return torch.tensor(x, dtype=torch.long if x.dtype.kind in "iu" else torch.float32)


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "separate"])
def pair(request, tmp_path_factory):
    cfg = RetriBertConfig.tiny(share_encoders=request.param)
    ref = hf_reference(cfg)
    ours = RetriBertModel.from_pretrained(save_hf(ref, str(tmp_path_factory.mktemp("hf"))))
    return cfg, ref, ours


def layer_at(encoder, i: int):
    """Layer i of a `BertEncoder`'s stack as a module of its own (HF's `encoder.layer[i]`), parameters copied."""
    graphdef, state = nnx.split(encoder.layer)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def extended_mask(ref_bert, mask):
    return ref_bert.get_extended_attention_mask(t(mask), tuple(mask.shape))


def test_embeddings(pair):
    cfg, ref, ours = pair
    ids, _ = random_batch(np.random.default_rng(1), 3, 11, cfg.vocab_size)
    with torch.no_grad():
        theirs = ref.bert_query.embeddings(input_ids=t(ids), token_type_ids=torch.zeros_like(t(ids))).numpy()
    assert_close(ours.bert_query.embeddings(jnp.asarray(ids)), theirs, "embeddings")


def test_one_layer_and_encoder_and_pooler(pair):
    cfg, ref, ours = pair
    rng = np.random.default_rng(2)
    ids, mask = random_batch(rng, 4, 9, cfg.vocab_size, pad_rows=2)
    x = rng.standard_normal((4, 9, cfg.hidden_size)).astype(np.float32)
    for name in ("bert_query",) + (() if cfg.share_encoders else ("bert_doc",)):
        ref_bert, our_bert = getattr(ref, name), getattr(ours, name)
        ext = extended_mask(ref_bert, mask)
        with torch.no_grad():
            layer0 = ref_bert.encoder.layer[0](t(x), attention_mask=ext)[0].numpy()
            enc = ref_bert.encoder(t(x), attention_mask=ext)[0].numpy()
            pooled = ref_bert.pooler(t(enc)).numpy()
        m = jnp.asarray(mask, bool)
        # Padded query rows see the same keys as HF's, so every row is compared, padding included.
        assert_close(layer_at(our_bert.encoder, 0)(jnp.asarray(x), m), layer0, f"{name} layer 0")
        assert_close(our_bert.encoder(jnp.asarray(x), m), enc, f"{name} encoder")
        assert_close(our_bert.pooler(jnp.asarray(enc)), pooled, f"{name} pooler")


def test_projections(pair):
    cfg, ref, ours = pair
    h = np.random.default_rng(3).standard_normal((5, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        assert_close(ours.project_query(jnp.asarray(h)), ref.project_query(t(h)).numpy(), "project_query")
        assert_close(ours.project_doc(jnp.asarray(h)), ref.project_doc(t(h)).numpy(), "project_doc")


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("checkpoint_batch_size", [-1, 2])
def test_embed_questions_and_answers(pair, batch, checkpoint_batch_size):
    cfg, ref, ours = pair
    ids, mask = random_batch(np.random.default_rng(batch), batch, 10, cfg.vocab_size, pad_rows=batch // 2 + 1)
    with torch.no_grad():
        q = ref.embed_questions(t(ids), t(mask), checkpoint_batch_size).numpy()
        a = ref.embed_answers(t(ids), t(mask), checkpoint_batch_size).numpy()
    assert_close(ours.embed_questions(ids, mask, checkpoint_batch_size), q, f"questions B={batch}")
    assert_close(ours.embed_answers(ids, mask, checkpoint_batch_size), a, f"answers B={batch}")


def test_mask_none_means_all_ones(pair):
    cfg, ref, ours = pair
    ids, _ = random_batch(np.random.default_rng(4), 4, 8, cfg.vocab_size, pad_rows=0)
    with torch.no_grad():
        q = ref.embed_questions(t(ids), None).numpy()  # HF's plain path accepts None; its chunked path crashes
    for cbs in (-1, 2):
        assert_close(ours.embed_questions(ids, None, cbs), q, f"questions, mask None, checkpoint_batch_size={cbs}")


def _losses_and_grads(cfg, ref, ours, batch, cbs):
    rng = np.random.default_rng(10 + batch)
    qi, qm = random_batch(rng, batch, 9, cfg.vocab_size, pad_rows=batch // 2)
    ai, am = random_batch(rng, batch, 12, cfg.vocab_size, pad_rows=batch // 2 + 1)
    ref.zero_grad()
    ref_loss = ref(t(qi), t(qm), t(ai), t(am), checkpoint_batch_size=cbs)
    ref_loss.backward()
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}

    graphdef, state = nnx.split(ours)

    def loss_fn(state):
        return nnx.merge(graphdef, state)(qi, qm, ai, am, cbs)

    loss, grads = jax.value_and_grad(loss_fn)(state)
    return float(ref_loss.detach()), ref_grads, float(loss), flat_params(grads, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("batch,cbs", [(3, -1), (4, -1), (5, 2), (4, 4)])
def test_loss_and_every_gradient(pair, batch, cbs):
    cfg, ref, ours = pair
    ref_loss, ref_grads, loss, grads = _losses_and_grads(cfg, ref, ours, batch, cbs)
    assert abs(loss - ref_loss) <= ATOL * max(1.0, abs(ref_loss)), f"loss {loss} vs reference {ref_loss}"
    table = param_table(cfg)
    assert len(table) == len(grads), f"{len(grads)} gradients for {len(table)} parameters"
    global_norm = np.sqrt(sum(np.sum(np.square(g)) for g in ref_grads.values()))
    worst = (0.0, "")
    for e in table:
        g = np.asarray(grads[e.flax_path])
        r = ref_grads[e.torch_key]
        r = r.T if e.transpose else r
        if e.torch_key.endswith("attention.self.key.bias"):
            # Softmax ignores a shift shared by all keys of a query, so this gradient is zero in exact arithmetic:
            # both sides hold only round-off, which a relative error would blow up.
            for name, v in (("ours", g), ("reference", r)):
                assert np.linalg.norm(v) <= 1e-6 * global_norm, f"{e.torch_key}: {name} gradient is not ~0"
            continue
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        worst = max(worst, (float(rel), f"{e.torch_key} ({path_str(e.flax_path)})"))
    assert worst[0] <= GRAD_RTOL, f"worst relative gradient error {worst[0]:.3g} at {worst[1]}"


@pytest.mark.slow
def test_batch_of_one_has_zero_loss_and_gradients(pair):
    # One pair: each cross-entropy is over a single logit, so the loss and every gradient are exactly 0, in HF too.
    cfg, ref, ours = pair
    ref_loss, ref_grads, loss, grads = _losses_and_grads(cfg, ref, ours, 1, -1)
    assert loss == 0.0 and ref_loss == 0.0, f"loss {loss}, reference {ref_loss}"
    assert all(not np.any(g) for g in ref_grads.values()), "reference gradients are not all zero"
    nonzero = [path_str(p) for p, v in grads.items() if np.any(np.asarray(v))]
    assert not nonzero, f"non-zero gradients for a batch of one: {nonzero[:3]}"


@pytest.mark.slow
def test_checkpointed_path_gives_same_gradients_as_plain(pair):
    cfg, _, ours = pair
    rng = np.random.default_rng(7)
    qi, qm = random_batch(rng, 6, 8, cfg.vocab_size, pad_rows=2)
    graphdef, state = nnx.split(ours)
    grads = [jax.grad(lambda s, c=cbs: nnx.merge(graphdef, s)(qi, qm, qi[::-1], qm[::-1], c))(state) for cbs in (-1, 4)]
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads[0]), nnx.to_flat_state(grads[1]), strict=True):
        assert_close(a.get_value(), b.get_value(), f"gradient of {path_str(path)}, plain vs checkpointed", atol=1e-6)


@pytest.mark.parametrize("trim", [True, False])
def test_dropout_only_in_training_mode_with_rngs(tiny_cfg, trim):
    """Both forms of the last layer (`trim_last_layer`): the same evaluation numbers, dropout only in training."""
    model = RetriBertModel(tiny_cfg, rngs=nnx.Rngs(0))
    ids, mask = random_batch(np.random.default_rng(5), 2, 8, tiny_cfg.vocab_size)
    trimmed = model.embed_questions(ids, mask)
    model = model.with_run_config(RunConfig(trim_last_layer=trim))
    eval_a, eval_b = model.embed_questions(ids, mask), model.embed_questions(ids, mask)
    assert_close(eval_a, trimmed, "last layer on every row vs on the [CLS] rows alone", atol=1e-6)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b), "evaluation is not deterministic")
    model.train()
    with pytest.raises(ValueError, match="rngs"):
        model.embed_questions(ids, mask)
    rngs = nnx.Rngs(dropout=1)
    train_a, train_b = model.embed_questions(ids, mask, rngs=rngs), model.embed_questions(ids, mask, rngs=rngs)
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-3, "dropout did not change the training output"
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3, "two dropout draws gave the same output"
    model.eval()
    np.testing.assert_array_equal(np.asarray(model.embed_questions(ids, mask)), np.asarray(eval_a))


def test_bfloat16_compute_stays_close_to_float32(tmp_path, tiny_cfg):
    ref = hf_reference(tiny_cfg)
    path = save_hf(ref, str(tmp_path))
    fp32 = RetriBertModel.from_pretrained(path)
    bf16 = RetriBertModel.from_pretrained(path, dtype=jnp.bfloat16)
    ids, mask = random_batch(np.random.default_rng(6), 4, 16, tiny_cfg.vocab_size)
    a, b = np.asarray(fp32.embed_answers(ids, mask)), np.asarray(bf16.embed_answers(ids, mask))
    assert b.dtype == np.float32
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # Measured: cosine > 0.9999 on this tiny model; 0.999 leaves room for other CPUs' bf16 rounding.
    assert cos.min() > 0.999, f"bf16 vs fp32 cosine similarity {cos.min():.5f}"
    assert jax.tree.leaves(nnx.state(bf16))[0].dtype == jnp.float32, "parameters must stay float32"


def test_random_init_matches_hf_statistics(tiny_cfg):
    model = RetriBertModel(tiny_cfg, rngs=nnx.Rngs(0))
    w = np.asarray(model.bert_query.encoder.layer.attention.self.query.kernel.get_value()[0])
    assert abs(w.std() - tiny_cfg.initializer_range) < 0.005, f"kernel std {w.std():.4f}"
    np.testing.assert_array_equal(np.asarray(model.bert_query.pooler.dense.bias.get_value()), 0.0)


@pytest.mark.parametrize("cls_only", [False, True], ids=["all-queries", "cls-only"])
def test_cudnn_branch_computes_the_same_attention(monkeypatch, tiny_cfg, cls_only):
    """The GPU branch's call (layout B L H Dh, the padding mask broadcast to B 1 Lq L) gives our einsum attention's
    numbers. Run here through JAX's XLA implementation of that very call, since this machine has no cuDNN."""
    from retribert_jax.modeling import BertSelfAttention

    calls = []
    real = jax.nn.dot_product_attention

    def via_xla(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", via_xla)
    xla = BertSelfAttention(tiny_cfg, RunConfig(), rngs=nnx.Rngs(0))
    cudnn = BertSelfAttention(tiny_cfg, RunConfig(), rngs=nnx.Rngs(0))
    cudnn.attention_impl = "cudnn"  # in float32, which RunConfig refuses for cuDNN: XLA runs that call here
    ids, mask = random_batch(np.random.default_rng(7), 3, 12, tiny_cfg.vocab_size)
    x = jax.random.normal(jax.random.key(1), (3, 12, tiny_cfg.hidden_size))
    mask = jnp.asarray(mask, bool)
    assert_close(
        cudnn(x, mask, cls_only=cls_only), xla(x, mask, cls_only=cls_only), "cudnn-branch attention", atol=1e-6
    )
    assert calls == ["cudnn"], f"the cudnn branch did not call dot_product_attention(implementation='cudnn'): {calls}"


def test_cudnn_attention_needs_half_precision(tiny_cfg):
    with pytest.raises(ValueError, match="needs the bfloat16 compute dtype"):
        RetriBertModel(tiny_cfg, attention_impl="cudnn", rngs=nnx.Rngs(0))
    RetriBertModel(tiny_cfg, dtype=jnp.bfloat16, attention_impl="cudnn", rngs=nnx.Rngs(0))  # builds


def test_longer_than_the_position_table_is_a_clear_error(tiny_cfg):
    """Every entry point refuses L > max_position_embeddings by name (HF's embedding lookup fails on it too)."""
    from retribert_jax.modeling import embed

    model = RetriBertModel(tiny_cfg, rngs=nnx.Rngs(0))
    limit = tiny_cfg.max_position_embeddings
    ids = np.ones((2, limit + 1), np.int32)
    graphdef, state = nnx.split(model)
    calls = {
        "embed_questions": lambda: model.embed_questions(ids, ids),
        "embed_answers": lambda: model.embed_answers(ids, ids),
        "__call__": lambda: model(ids, ids, ids, ids),
        "embed": lambda: embed(graphdef, state, ids, ids, kind="passages"),
    }
    for name, call in calls.items():
        with pytest.raises(
            ValueError,
            match=f"input length {limit + 1} is longer than the model's max_position_embeddings \\({limit}\\)",
        ):
            call()
            pytest.fail(f"{name} accepted {limit + 1} tokens")
    ok = np.ones((2, limit), np.int32)
    assert model.embed_questions(ok, ok).shape == (2, tiny_cfg.projection_dim), "the limit itself must pass"
