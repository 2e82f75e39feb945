"""The resumable embedding job (`embedding_job.embed_corpus`, behind `embed` and `build_index`): progress kept in
pieces finer than a shard, what a rerun may discard, an empty input, and the model's weights recorded and checked."""

from __future__ import annotations

import json
import os

import pytest

from retribert_jax import RetriBertModel, RetriBertTokenizer, embedding_dir
from retribert_jax.embedding_job import NoRecords, embed_corpus
from retribert_jax.encode import Encoder
from retribert_jax.search import Index, build_index
from tests.embed_helpers import random_texts, tiny_model_dir


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    path = tiny_model_dir(str(tmp_path_factory.mktemp("model")))
    return Encoder(RetriBertModel.from_pretrained(path), RetriBertTokenizer.from_pretrained(path))


class Interrupting:
    """An Encoder that raises KeyboardInterrupt (a Ctrl-C) at its `at`-th encode call."""

    def __init__(self, encoder: Encoder, at: int):
        self.encoder, self.at, self.calls = encoder, at, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_passages(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.encoder.encode_passages(*args, **kwargs)


def visible(directory) -> dict[str, bytes]:
    return {
        n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)) if not n.startswith(".")
    }


def test_interrupted_job_keeps_its_pieces_and_resumes_to_the_same_bytes(encoder, tmp_path):
    records = [(None, t) for t in random_texts(230, seed=3)]
    options = dict(shard_size=100, piece_size=30, store_text=True, dtype="float16")
    fresh = embed_corpus(encoder, records, str(tmp_path / "fresh"), **options)
    assert fresh.embedded == 230 and fresh.manifest["num_shards"] == 3
    out = str(tmp_path / "out")
    # Calls: shard 0 takes 4 pieces (30, 30, 30, 10), shard 1 starts with piece 5: interrupted at its second.
    with pytest.raises(KeyboardInterrupt) as e:
        embed_corpus(Interrupting(encoder, 6), records, out, **options)
    assert f"{out} keeps 130 passages embedded (1 whole shard, 30 in pieces of up to 30)" in str(e.value)
    assert "rerunning the same job resumes" in str(e.value)
    assert sorted(n for n in os.listdir(out) if n.startswith(".piece-")) == [".piece-00001-000000000-000000030.npz"], (
        os.listdir(out)
    )
    resumed = embed_corpus(encoder, records, out, **options)
    assert (resumed.resumed, resumed.embedded) == (130, 100), "the kept shard and piece were embedded again"
    assert visible(out) == visible(str(tmp_path / "fresh")), "resumed output differs from an uninterrupted run"
    assert not [n for n in os.listdir(out) if n.startswith(".")], "pieces or settings left behind"
    again = embed_corpus(encoder, records, out, **options)
    assert again.already_complete and again.embedded == 0


def test_a_run_that_finished_nothing_is_no_obstacle_and_overwrite_replaces(encoder, tmp_path):
    out = str(tmp_path / "out")
    records = [(None, t) for t in random_texts(40, seed=4)]

    def failing():  # a typo in a field name: the reader fails on the first record
        raise ValueError("in.jsonl:1: missing text field 'body'")
        yield

    with pytest.raises(ValueError, match="missing text field"):
        embed_corpus(encoder, failing(), out, source={"text_field": "body"})
    assert not os.path.exists(out), "a run that failed before keeping anything left its directory"
    os.makedirs(out)  # a directory the user made is left in place, empty as it was
    with pytest.raises(ValueError, match="missing text field"):
        embed_corpus(encoder, failing(), out, source={"text_field": "body"})
    assert os.listdir(out) == []
    with pytest.raises(KeyboardInterrupt, match="interrupted before any passages were embedded"):
        embed_corpus(Interrupting(encoder, 1), records, out)
    assert os.listdir(out) == []
    embed_corpus(encoder, records, out, source={"text_field": "text"}, shard_size=20)  # not refused
    with pytest.raises(
        ValueError,
        match=r"holds embeddings made with other settings \(max_length: 128 there, 64 "
        r"now\); use another OUT or pass --overwrite",
    ):
        embed_corpus(encoder, records, out, source={"text_field": "text"}, shard_size=20, max_length=64)
    result = embed_corpus(
        encoder, records, out, source={"text_field": "text"}, shard_size=20, max_length=64, overwrite=True
    )
    assert result.embedded == 40 and embedding_dir.read_manifest(out)["max_length"] == 64
    # An unfinished run that did finish a shard is work: other settings are refused, not discarded.
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(Interrupting(encoder, 2), records, str(tmp_path / "half"), shard_size=20)
    with pytest.raises(ValueError, match="an unfinished run's embeddings made with other settings"):
        embed_corpus(encoder, records, str(tmp_path / "half"), shard_size=20, normalize=True)


def test_empty_input_is_refused_and_leaves_nothing(encoder, tmp_path):
    with pytest.raises(NoRecords, match="no records to embed"):
        embed_corpus(encoder, [], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="no passages to index"):
        build_index(encoder, [], str(tmp_path / "idx"))
    assert not os.path.exists(tmp_path / "idx")


def test_weights_are_recorded_and_another_models_are_refused(encoder, tmp_path):
    from retribert_jax.params import weights_fingerprint

    index = build_index(encoder, random_texts(20, seed=5), str(tmp_path / "idx"))
    m = index.manifest
    assert m["weights_fingerprint"] == weights_fingerprint(encoder.model)
    assert (m["compute_dtype"], m["precision"]) == (encoder.model.run_config.dtype, encoder.model.run_config.precision)
    index.check_model(encoder)
    index.check_model(encoder.model)
    other_dir = tiny_model_dir(str(tmp_path / "tuned"), seed=1)  # same architecture, other weights
    tuned = RetriBertModel.from_pretrained(other_dir)
    assert tuned.config.architecture_hash() == encoder.config.architecture_hash()
    with pytest.raises(ValueError, match=r"this model's weights differ \(fingerprint [0-9a-f]{16}\)"):
        index.check_model(tuned)
    index.check_model(tuned.config)  # a config alone: the architecture is all it can be checked for
    # Manifests written before the fingerprint are read, and checked for the architecture alone.
    path = os.path.join(index.directory, embedding_dir.MANIFEST)
    old = {k: v for k, v in m.items() if k not in embedding_dir.OPTIONAL_KEYS}
    with open(path, "w") as f:
        json.dump(old, f)
    Index(index.directory).check_model(tuned)


def test_fingerprint_ignores_how_the_model_runs_and_where_it_is_stored(encoder, tmp_path):
    from retribert_jax.params import weights_fingerprint

    bf16 = encoder.model.with_run_config(encoder.model.run_config.replace(dtype="bfloat16", precision="highest"))
    assert weights_fingerprint(bf16) == weights_fingerprint(encoder.model)
    saved = str(tmp_path / "saved")
    encoder.model.save_pretrained(saved, format="orbax")
    assert weights_fingerprint(RetriBertModel.from_pretrained(saved)) == weights_fingerprint(encoder.model)
    half = str(tmp_path / "half")
    encoder.model.save_pretrained(half, format="safetensors", dtype="float16")
    assert weights_fingerprint(RetriBertModel.from_pretrained(half)) != weights_fingerprint(encoder.model), (
        "weights rounded to float16 are other weights"
    )
