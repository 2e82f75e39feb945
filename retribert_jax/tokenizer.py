"""RetriBertTokenizer: uncased BERT WordPiece on HF `tokenizers`, returning numpy int32 and no token_type_ids."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

DEFAULT_MAX_LENGTH = 512
# The files a checkpoint directory's tokenizer may consist of (copied verbatim when a checkpoint is converted).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _read_vocab(path: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise ValueError(f"{path}:{i + 1}: token {token!r} already appears on line {vocab[token] + 1}")
                vocab[token] = i
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise ValueError(f"{path}: the vocabulary has no {special} token")
    return vocab


def wordpiece_from_vocab(vocab_file: str, lowercase: bool = True) -> Tokenizer:
    """BERT's tokenizer from a `vocab.txt`: clean text, CJK splitting, lowercasing with accent stripping."""
    vocab = _read_vocab(vocab_file)
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None follows `lowercase`, as BertTokenizer does.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


class RetriBertTokenizer:
    """Uncased BERT WordPiece; `tok(texts)` gives numpy int32 `input_ids` and `attention_mask`."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int = DEFAULT_MAX_LENGTH):
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.model_max_length = model_max_length
        self.pad_token_id = self._token_id("[PAD]")
        self.cls_token_id = self._token_id("[CLS]")
        self.sep_token_id = self._token_id("[SEP]")

    def _token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer's vocabulary has no {token} token")
        return i

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def from_vocab_file(cls, vocab_file: str, lowercase: bool = True,
                        model_max_length: int = DEFAULT_MAX_LENGTH) -> RetriBertTokenizer:
        return cls(wordpiece_from_vocab(vocab_file, lowercase), model_max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RetriBertTokenizer:
        """From a checkpoint directory (`tokenizer.json`, else `vocab.txt`), a file of either kind, or a hub id."""
        from retribert_jax.hub import resolve_checkpoint

        path = resolve_checkpoint(path)
        if os.path.isfile(path):
            if path.endswith(".json"):
                return cls(_tokenizer_json(path))
            return cls.from_vocab_file(path)
        settings = _tokenizer_config(path)
        max_len = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len > 10**6:  # HF writes a huge sentinel for "no limit"
            max_len = DEFAULT_MAX_LENGTH
        tok_json = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tok_json):
            return cls(_tokenizer_json(tok_json), max_len)
        vocab = os.path.join(path, "vocab.txt")
        if os.path.isfile(vocab):
            return cls.from_vocab_file(vocab, settings.get("do_lower_case", True), max_len)
        raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")

    def save_pretrained(self, directory: str) -> None:
        """Writes `tokenizer.json`, `vocab.txt` and a `tokenizer_config.json` HF's BertTokenizerFast reads."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token, _ in vocab)
        config = {"tokenizer_class": "RetriBertTokenizer", "do_lower_case": True,
                  "model_max_length": self.model_max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
                  "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    def encode_lengths(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Token counts (with [CLS] and [SEP], after truncation) without padding; for sorting by length."""
        enc = self._encode(texts, max_length, truncation=True)
        return np.fromiter((len(e.ids) for e in enc), dtype=np.int32, count=len(enc))

    def _encode(self, texts: Sequence[str], max_length: int | None, truncation: bool):
        if isinstance(texts, str):
            raise TypeError("_encode takes a list of strings")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"text {bad} is a {type(texts[bad]).__name__}, not a str")
        if truncation:
            self._tok.enable_truncation(max_length or self.model_max_length)
        else:
            self._tok.no_truncation()
        try:
            return self._tok.encode_batch(list(texts), add_special_tokens=True)
        finally:
            self._tok.no_truncation()

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None, padding: bool | str = True,
                 truncation: bool = True, pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        """Tokenizes like HF's BertTokenizerFast, minus token_type_ids.

        Args:
          texts: one string or a list of strings.
          max_length: the truncation length (and padding length with padding="max_length"); default 512.
          padding: True/"longest" pads to the longest text; "max_length" to `max_length`; False/"do_not_pad"
            leaves rows unpadded (then every text must have the same length to make one array).
          truncation: cut texts longer than `max_length` (keeping [SEP] at the end).
          pad_to_multiple_of: round the padded length up to a multiple of this.

        Returns:
          {"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}, or [L] for a single string.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        max_length = max_length or self.model_max_length
        enc = self._encode(batch, max_length, truncation)
        lengths = [len(e.ids) for e in enc]
        if padding in (True, "longest"):
            width = max(lengths, default=0)
        elif padding == "max_length":
            width = max(max_length, max(lengths, default=0))
        elif padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError("padding=False with texts of different lengths cannot make one array; "
                                 "use padding=True")
            width = lengths[0] if lengths else 0
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if pad_to_multiple_of and width % pad_to_multiple_of:
            width += pad_to_multiple_of - width % pad_to_multiple_of
        ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.int32)
        for row, e in enumerate(enc):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}


def _tokenizer_json(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None


def _tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}
