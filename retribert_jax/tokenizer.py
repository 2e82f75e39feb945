"""RetriBertTokenizer: BERT WordPiece on HF `tokenizers`, returning numpy int32 and no token_type_ids.

A checkpoint directory is read as HF's `BertTokenizerFast.from_pretrained` reads it, so the ids are the ones the
model gets under transformers:
- `tokenizer.json`, else `vocab.txt`;
- `tokenizer_config.json`'s `do_lower_case` / `strip_accents` / `tokenize_chinese_chars` (HF's defaults True / None /
  True for absent keys or no file) rebuild tokenizer.json's BertNormalizer where it disagrees, as HF does;
- the special tokens (`unk_token`, ..., `additional_special_tokens`) of `tokenizer_config.json`, overridden by
  `special_tokens_map.json` unless the config has `added_tokens_decoder` (then HF reads neither that file nor
  `added_tokens.json`), are registered as added tokens, so a `[MASK]` written in a text is one id;
- `truncation_side` ("right", or "left": keep a long text's end) of `tokenizer_config.json`, else the direction of
  tokenizer.json's own truncation setting, else "right".
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

DEFAULT_MAX_LENGTH = 512
TRUNCATION_SIDES = ("right", "left")
# HF's SPECIAL_TOKENS_ATTRIBUTES order: tokens absent from the vocabulary get new ids in this order.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BERT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# Every input holds these, so one missing from the vocabulary is an error rather than a new id past the embeddings.
_REQUIRED = ("pad_token", "unk_token", "cls_token", "sep_token")
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")

Token = str | AddedToken


def _content(token: Token) -> str:
    return token.content if isinstance(token, AddedToken) else token


def _read_vocab(path: str) -> dict[str, int]:
    # Text mode splits lines as HF's `load_vocab` does (it reads vocab.txt with readlines()).
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
    return vocab


def _check_required(vocab: Mapping[str, int], special_tokens: Mapping[str, Token | None], where: str) -> None:
    for key in _REQUIRED:
        token = special_tokens.get(key)
        if token is None:
            raise ValueError(f"{where}: no {key} is set; BERT needs one")
        if _content(token) not in vocab:
            raise ValueError(f"{where}: the vocabulary has no {_content(token)} token (the {key})")


def wordpiece_from_vocab(
    vocab_file: str,
    lowercase: bool = True,
    *,
    strip_accents: bool | None = None,
    tokenize_chinese_chars: bool = True,
    special_tokens: Mapping[str, Token | None] | None = None,
) -> Tokenizer:
    """BERT's tokenizer from a `vocab.txt`, as HF's BertConverter builds it (special tokens not yet registered).

    Args:
      vocab_file: one token a line; the line number (from 0) is the id.
      lowercase: lowercase the text (BertNormalizer `lowercase`).
      strip_accents: None follows `lowercase`, as BertTokenizer does.
      tokenize_chinese_chars: put spaces around CJK ideographs.
      special_tokens: HF's names (`unk_token`, `cls_token`, ...) -> token; default BERT's `[UNK]`, `[CLS]`, ...

    Raises:
      ValueError: a duplicate token (naming both lines), non-UTF-8 text, or no [PAD]/[UNK]/[CLS]/[SEP] token.
    """
    special_tokens = {**BERT_SPECIAL_TOKENS, **(special_tokens or {})}
    vocab = _read_vocab(vocab_file)
    _check_required(vocab, special_tokens, vocab_file)
    unk, cls, sep = (_content(special_tokens[k]) for k in ("unk_token", "cls_token", "sep_token"))
    tok = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return tok


class RetriBertTokenizer:
    """BERT WordPiece; `tok(texts)` gives numpy int32 `input_ids` and `attention_mask`.

    The lowercasing, accent stripping and CJK splitting are those of the backend's normaliser (`do_lower_case`,
    `strip_accents`, `tokenize_chinese_chars` read it back), so what `save_pretrained` writes is what it does.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        special_tokens: Mapping[str, Any] | None = None,
        truncation_side: str | None = None,
    ):
        """Wraps a `tokenizers.Tokenizer` and registers its special tokens as HF's PreTrainedTokenizerFast does.

        Args:
          tokenizer: a BERT WordPiece tokenizer (changed in place: truncation and padding off, specials added).
          model_max_length: the default truncation length.
          special_tokens: HF's names (`unk_token`, ..., `mask_token`, `additional_special_tokens`) -> token (a str
            or an AddedToken for lstrip/rstrip); default BERT's. Those that are not yet added tokens of `tokenizer`
            become special added tokens (a text's `[MASK]` is then one id), new ids past the vocabulary for those
            it lacks.
          truncation_side: "right" (keep a long text's start) or "left" (keep its end); None takes the direction
            of `tokenizer`'s own truncation setting when it has one, else "right" (as PreTrainedTokenizerFast).

        Raises:
          ValueError: the vocabulary lacks the pad, unk, cls or sep token, or an unknown truncation side.
        """
        specials = {**BERT_SPECIAL_TOKENS, **(special_tokens or {})}
        self._tok = tokenizer
        own = tokenizer.truncation
        self.truncation_side = truncation_side or (own["direction"] if own else "right")
        self._tok.no_truncation()
        self._tok.no_padding()
        self.model_max_length = model_max_length
        self._warned_too_long = False
        _check_required(self._tok.get_vocab(), specials, "the tokenizer")
        additional = list(specials.pop("additional_special_tokens", None) or [])
        unknown = set(specials) - set(SPECIAL_TOKEN_KEYS)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}; expected {SPECIAL_TOKEN_KEYS}")
        self.special_tokens = {k: specials[k] for k in SPECIAL_TOKEN_KEYS if specials.get(k) is not None}
        self.additional_special_tokens = additional
        _add_tokens(
            self._tok,
            [*self.special_tokens.values(), *additional],
            _special_contents({**self.special_tokens, "additional_special_tokens": additional}),
        )
        self.pad_token_id = self._tok.token_to_id(_content(self.special_tokens["pad_token"]))
        self.cls_token_id = self._tok.token_to_id(_content(self.special_tokens["cls_token"]))
        self.sep_token_id = self._tok.token_to_id(_content(self.special_tokens["sep_token"]))

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def truncation_side(self) -> str:
        """Which end of a long text truncation cuts: "right" keeps the start, "left" keeps the end ([CLS] and [SEP]
        stay either way)."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, side: str) -> None:
        if side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side must be 'right' or 'left', got {side!r}")
        self._truncation_side = side

    def enable_truncation(self, max_length: int) -> None:
        """Turns the backend's truncation on at `max_length` tokens, on this tokenizer's side (until `no_truncation`
        on the backend)."""
        self._tok.enable_truncation(max_length, direction=self.truncation_side)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _normalizer_setting(self, name: str) -> Any:
        n = self._tok.normalizer
        return getattr(n, name) if isinstance(n, normalizers.BertNormalizer) else None

    @property
    def do_lower_case(self) -> bool | None:
        """Whether the text is lowercased; None when the normaliser is not BERT's."""
        return self._normalizer_setting("lowercase")

    @property
    def strip_accents(self) -> bool | None:
        """True/False; None: strip accents exactly when lowercasing (also None for a normaliser not BERT's)."""
        return self._normalizer_setting("strip_accents")

    @property
    def tokenize_chinese_chars(self) -> bool | None:
        """Whether CJK ideographs become separate words; None when the normaliser is not BERT's."""
        return self._normalizer_setting("handle_chinese_chars")

    @classmethod
    def from_vocab_file(
        cls,
        vocab_file: str,
        lowercase: bool = True,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        *,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        special_tokens: Mapping[str, Any] | None = None,
    ) -> RetriBertTokenizer:
        """HF's `BertTokenizerFast(vocab_file=..., do_lower_case=lowercase, ...)`; arguments as in
        `wordpiece_from_vocab` and `__init__`."""
        tok = wordpiece_from_vocab(
            vocab_file,
            lowercase,
            strip_accents=strip_accents,
            tokenize_chinese_chars=tokenize_chinese_chars,
            special_tokens=special_tokens,
        )
        return cls(tok, model_max_length, special_tokens)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RetriBertTokenizer:
        """From a checkpoint directory, a lone `tokenizer.json` or `vocab.txt` file, or a hub id.

        A directory is read as HF's BertTokenizerFast.from_pretrained reads it (see the module docstring). A lone
        `tokenizer.json` is taken as it is (its normaliser says what it does), a lone `vocab.txt` as uncased BERT.

        Raises:
          FileNotFoundError: neither tokenizer.json nor vocab.txt in the directory.
          ValueError: a malformed file, or a config key of the wrong type, naming the file and key.
        """
        from retribert_jax.hub import resolve_checkpoint

        path = resolve_checkpoint(path)
        if os.path.isfile(path):
            if path.endswith(".json"):
                return cls(_tokenizer_json(path))
            return cls.from_vocab_file(path)
        s = _directory_settings(path)
        tok_json = os.path.join(path, "tokenizer.json")
        vocab = os.path.join(path, "vocab.txt")
        if os.path.isfile(tok_json):
            tok = _tokenizer_json(tok_json)
            _configure_normalizer(tok, s["do_lower_case"], s["strip_accents"], s["tokenize_chinese_chars"])
            _check_required(tok.get_vocab(), s["special_tokens"], tok_json)
        elif os.path.isfile(vocab):
            tok = wordpiece_from_vocab(
                vocab,
                s["do_lower_case"],
                strip_accents=s["strip_accents"],
                tokenize_chinese_chars=s["tokenize_chinese_chars"],
                special_tokens=s["special_tokens"],
            )
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
        _add_tokens(tok, s["added_tokens"], _special_contents(s["special_tokens"]))
        tok.encode_special_tokens = s["split_special_tokens"]
        return cls(tok, s["model_max_length"], s["special_tokens"], s["truncation_side"])

    def save_pretrained(self, directory: str) -> None:
        """Writes `tokenizer.json`, `vocab.txt`, `special_tokens_map.json` and a `tokenizer_config.json` stating this
        tokenizer's settings, so that HF's BertTokenizerFast / AutoTokenizer load it to the same ids."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token, _ in vocab)
        specials: dict[str, Any] = {k: _content(v) for k, v in self.special_tokens.items()}
        if self.additional_special_tokens:
            specials["additional_special_tokens"] = [_content(t) for t in self.additional_special_tokens]
        config: dict[str, Any] = {"tokenizer_class": "BertTokenizer"}
        if isinstance(self._tok.normalizer, normalizers.BertNormalizer):
            config.update(
                do_lower_case=self.do_lower_case,
                strip_accents=self.strip_accents,
                tokenize_chinese_chars=self.tokenize_chinese_chars,
            )
        config.update(model_max_length=self.model_max_length, truncation_side=self.truncation_side, **specials)
        if self._tok.encode_special_tokens:
            config["split_special_tokens"] = True
        # HF takes the lstrip/rstrip/normalized flags of the special tokens from here.
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, **{k: getattr(t, k) for k in _FLAGS}}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2, ensure_ascii=False)
                f.write("\n")

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
            self.enable_truncation(max_length or self.model_max_length)
        else:
            self._tok.no_truncation()
        try:
            enc = self._tok.encode_batch(list(texts), add_special_tokens=True)
        finally:
            self._tok.no_truncation()
        longest = max((len(e.ids) for e in enc), default=0)
        if longest > self.model_max_length and not self._warned_too_long:
            # As HF's tokenizers do, once: the ids are returned, but a model with that many positions will refuse them.
            self._warned_too_long = True
            warnings.warn(
                f"a sequence of {longest} tokens is longer than this tokenizer's model_max_length "
                f"({self.model_max_length}); the model will refuse it: truncate with max_length <= "
                f"{self.model_max_length}",
                stacklevel=3,
            )
        return enc

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = True,
        truncation: bool = True,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
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
                raise ValueError(
                    "padding=False with texts of different lengths cannot make one array; use padding=True"
                )
            width = lengths[0] if lengths else 0
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if pad_to_multiple_of and width % pad_to_multiple_of:
            width += pad_to_multiple_of - width % pad_to_multiple_of
        ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.int32)
        for row, e in enumerate(enc):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}


def _special_contents(special_tokens: Mapping[str, Any]) -> set[str]:
    out = {_content(v) for k, v in special_tokens.items() if k in SPECIAL_TOKEN_KEYS and v is not None}
    return out | {_content(t) for t in special_tokens.get("additional_special_tokens") or []}


def _add_tokens(tok: Tokenizer, tokens: Sequence[Token], specials: set[str]) -> None:
    """Adds the tokens that are not yet added tokens of `tok` (by content), in order, as HF's
    PreTrainedTokenizerFast does: one in the vocabulary keeps its id, another gets the next free one."""
    have = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = []
    for t in tokens:
        content = _content(t)
        if content in have:
            continue
        have.add(content)
        if isinstance(t, AddedToken):
            new.append(
                AddedToken(
                    content,
                    single_word=t.single_word,
                    lstrip=t.lstrip,
                    rstrip=t.rstrip,
                    normalized=t.normalized,
                    special=t.special or content in specials,
                )
            )
        else:
            new.append(AddedToken(content, special=content in specials))
    tok.add_tokens(new)


def _configure_normalizer(tok: Tokenizer, lowercase: bool, strip_accents: bool | None, chinese: bool) -> None:
    # BertTokenizerFast.__init__: a BertNormalizer that disagrees with the config is rebuilt from the config (other
    # normalisers have none of these keys, so HF leaves them alone).
    n = tok.normalizer
    if isinstance(n, normalizers.BertNormalizer) and (n.lowercase, n.strip_accents, n.handle_chinese_chars) != (
        lowercase,
        strip_accents,
        chinese,
    ):
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=n.clean_text, handle_chinese_chars=chinese, strip_accents=strip_accents, lowercase=lowercase
        )


def _tokenizer_json(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None


def _json_object(path: str) -> dict:
    """The JSON object in `path`, {} if there is no such file."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _flag(d: dict, path: str, key: str, default: bool | None, allow_none: bool = False) -> bool | None:
    v = d.get(key, default)
    if isinstance(v, bool) or (v is None and allow_none):
        return v
    raise ValueError(f"{path}: key {key!r} is {v!r}, expected true or false" + (" or null" if allow_none else ""))


def _token(value: Any, path: str, key: str, special: bool = True) -> Token | None:
    """A token from a config value: a string, or HF's AddedToken object {"content": ..., "lstrip": ..., ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in _FLAGS if k in value}
        return AddedToken(value["content"], **{"special": special, **flags})
    raise ValueError(f"{path}: key {key!r} is {value!r}, expected a token string or an AddedToken object")


def _token_list(value: Any, path: str, key: str) -> list[Token]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{path}: key {key!r} is {value!r}, expected a list of tokens")
    return [_token(v, path, f"{key}[{i}]") for i, v in enumerate(value)]


def _directory_settings(directory: str) -> dict[str, Any]:
    """What HF's BertTokenizerFast.from_pretrained takes from a directory's tokenizer_config.json,
    special_tokens_map.json and added_tokens.json, with its defaults for what they leave out."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    cfg = _json_object(cfg_path)
    max_len = cfg.get("model_max_length", DEFAULT_MAX_LENGTH)
    # HF writes a huge sentinel for "no limit"; BERT's position embeddings stop at 512 anyway.
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len > 10**6:
        max_len = DEFAULT_MAX_LENGTH
    specials: dict[str, Any] = dict(BERT_SPECIAL_TOKENS)
    specials.update({k: _token(cfg[k], cfg_path, k) for k in SPECIAL_TOKEN_KEYS if k in cfg})
    additional = _token_list(cfg.get("additional_special_tokens"), cfg_path, "additional_special_tokens")
    added: list[Token] = []
    if "added_tokens_decoder" in cfg:
        decoder = cfg["added_tokens_decoder"]
        if not isinstance(decoder, dict) or not all(isinstance(k, str) and k.isdigit() for k in decoder):
            raise ValueError(f"{cfg_path}: key 'added_tokens_decoder' must map ids to AddedToken objects")
        added = [
            _token(decoder[k], cfg_path, f"added_tokens_decoder[{k}]", special=False) for k in sorted(decoder, key=int)
        ]
    else:
        # Only without added_tokens_decoder (HF's "legacy" branch) are these two files read.
        stm_path = os.path.join(directory, "special_tokens_map.json")
        for key, value in _json_object(stm_path).items():
            if key in SPECIAL_TOKEN_KEYS:
                specials[key] = _token(value, stm_path, key)
            elif key == "additional_special_tokens":
                seen = {_content(t) for t in additional}
                additional += [t for t in _token_list(value, stm_path, key) if _content(t) not in seen]
        at_path = os.path.join(directory, "added_tokens.json")
        index = _json_object(at_path)
        if not all(isinstance(v, int) for v in index.values()):
            raise ValueError(f"{at_path}: expected an object of token -> id")
        named = _special_contents({**specials, "additional_special_tokens": additional})
        added = [
            AddedToken(t, normalized=t not in named, special=t in named)
            for t, _ in sorted(index.items(), key=lambda kv: kv[1])
        ]
    specials["additional_special_tokens"] = additional
    side = cfg.get("truncation_side")
    if side is not None and side not in TRUNCATION_SIDES:
        raise ValueError(f"{cfg_path}: key 'truncation_side' is {side!r}, expected 'right' or 'left'")
    return {
        "do_lower_case": _flag(cfg, cfg_path, "do_lower_case", True),
        "strip_accents": _flag(cfg, cfg_path, "strip_accents", None, allow_none=True),
        "tokenize_chinese_chars": _flag(cfg, cfg_path, "tokenize_chinese_chars", True),
        "split_special_tokens": _flag(cfg, cfg_path, "split_special_tokens", False),
        "model_max_length": max_len,
        "special_tokens": specials,
        "added_tokens": added,
        "truncation_side": side,
    }


def check_vocabulary(ids: np.ndarray, vocab_size: int, backend: Tokenizer, text_of: Callable[[int], str]) -> None:
    """Refuses token ids outside the model's embedding table, [0, `vocab_size`): a tokenizer that is not the model's
    (or has tokens added without resizing the model). JAX's embedding lookup would give NaN for them without a word,
    where HF PyTorch raises IndexError.

    Args:
      ids: int token ids, any shape.
      vocab_size: the model's `RetriBertConfig.vocab_size`.
      backend: the tokenizer (`tokenizers.Tokenizer`) that made the ids, to name the token.
      text_of: a function from a flat index into `ids` to a description of its text ("text 12").

    Raises:
      ValueError: the first such id, its token and its text.
    """
    if ids.size == 0 or (0 <= ids.min() and ids.max() < vocab_size):
        return
    flat = np.ravel(ids)
    i = int(np.flatnonzero((flat < 0) | (flat >= vocab_size))[0])
    token = backend.id_to_token(int(flat[i]))
    raise ValueError(
        f"{text_of(i)}: token id {int(flat[i])} ({token!r}) is outside the model's vocabulary (vocab_size "
        f"{vocab_size}); the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens: use the "
        "model's own tokenizer, or a model whose vocab_size covers this one's"
    )


# What BERT's normalizer and pre-tokenizer count as whitespace: space, tab, newline, carriage return, Unicode Zs.
_BERT_SPACE = " \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"


def prefix_cutter(backend: Tokenizer, max_length: int, truncation_side: str):
    """For long texts and a BERT WordPiece tokenizer that truncates on the right: a function from a text to a prefix
    of it that tokenizes to the same first `max_length` tokens, so that the tokenizer never reads the rest (None for a
    text not long enough to bother); None for any other tokenizer.

    The prefix ends at the BERT whitespace after the text's first `max_length` pre-tokens (runs of characters that are
    neither whitespace nor ASCII punctuation, and single ASCII punctuation characters): BERT's normalizer works
    character by character, its pre-tokenizer splits at whitespace and punctuation, and WordPiece reads each word
    alone, so the words before a whitespace tokenize as they do in the whole text. A pre-token yields at least one
    token, except one that the normalizer removes whole (control or format characters, lone accents) or one inside an
    added token such as "[MASK]": a caller must check that the prefix was itself truncated (`Encoding.overflowing`)
    and tokenize the whole text when it was not. Counting punctuation, which is a token of its own, cuts the
    punctuation-dense texts of code and markup at about their truncation point rather than well past it. Pre-tokens
    are matched possessively, in time linear in the text: a text with fewer of them (a run of CJK characters) is
    simply not cut.
    """
    kinds = (type(backend.normalizer).__name__, type(backend.pre_tokenizer).__name__, type(backend.model).__name__)
    if (
        truncation_side != "right"
        or kinds[1:] != ("BertPreTokenizer", "WordPiece")
        or kinds[0] not in ("BertNormalizer", "NoneType")
    ):
        return None
    import re
    import string

    space = re.compile(f"[{_BERT_SPACE}]")
    if any(space.search(t.content) for t in backend.get_added_tokens_decoder().values()):
        return None  # an added token with whitespace inside could span the cut
    # Possessive quantifiers (`*+`, `++`): a word is never split into shorter "words" to reach the count, which with
    # backtracking takes time exponential in the text's length when it has fewer words than that.
    punctuation = re.escape(string.punctuation)  # what Rust's `is_ascii_punctuation` is, and BERT splits at
    prefix = re.compile(
        f"(?:[{_BERT_SPACE}]*+(?:[{punctuation}]|[^{_BERT_SPACE}{punctuation}]++)){{{max_length}}}[^{_BERT_SPACE}]*+"
    )
    # Characters: below this a text is rarely over max_length tokens (a token is about 4 characters of English), and
    # the match would cost more than it saves.
    long_text = 4 * max_length

    def cut(text: str) -> str | None:
        if len(text) <= long_text:
            return None
        m = prefix.match(text)
        return text[: m.end()] if m is not None and m.end() < len(text) else None

    return cut
