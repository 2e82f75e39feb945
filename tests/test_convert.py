"""`retribert-jax convert`: parity with the HF PyTorch reference, both Flax layouts, dtype casts, no-torch loading."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from retribert_jax import RetriBertConfig, RetriBertModel, RetriBertTokenizer
from retribert_jax.checkpoint import convert_checkpoint
from retribert_jax.flax_files import FLAX_ORBAX, FLAX_SAFETENSORS
from retribert_jax.params import flat_params, param_table
from tests.conftest import REPO, hf_reference, random_batch, save_hf

torch = pytest.importorskip("torch")


def _write_tokenizer(directory: str, vocab_size: int) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_size - 5)]
    vocab = os.path.join(directory, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in tokens)
    RetriBertTokenizer.from_vocab_file(vocab).save_pretrained(directory)


def _assert_params_equal_hf(model: RetriBertModel, ref, cfg: RetriBertConfig, dtype=np.float32) -> None:
    """Every Flax parameter equals the HF tensor it came from (after the cast to `dtype`), bit for bit."""
    ours = flat_params(model)
    state = ref.state_dict()
    for e in param_table(cfg):
        want = state[e.torch_key].numpy()
        want = (want.T if e.transpose else want).astype(dtype).astype(np.float32)
        got = np.asarray(ours[e.flax_path])
        assert got.dtype == np.float32, f"{e.torch_key}: loaded as {got.dtype}, expected float32 on device"
        bad = int(np.sum(got != want))
        assert bad == 0, f"{e.torch_key}: {bad} of {want.size} entries differ (max {np.abs(got - want).max():.3g})"


def _embed_diff(model: RetriBertModel, ref, cfg: RetriBertConfig) -> float:
    ids, mask = random_batch(np.random.default_rng(1), 4, 9, cfg.vocab_size, pad_rows=2)
    with torch.no_grad():
        tq = ref.embed_questions(torch.tensor(ids, dtype=torch.long), torch.tensor(mask)).numpy()
        ta = ref.embed_answers(torch.tensor(ids, dtype=torch.long), torch.tensor(mask)).numpy()
    fq = np.asarray(model.embed_questions(ids, mask))
    fa = np.asarray(model.embed_answers(ids, mask))
    return float(max(np.abs(fq - tq).max(), np.abs(fa - ta).max()))


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_convert_matches_hf_exactly(hf_checkpoint, tmp_path, fmt):
    ref, src = hf_checkpoint
    cfg = RetriBertConfig.from_pretrained(src)
    out, _ = convert_checkpoint(src, str(tmp_path / "flax"), format=fmt)
    weights = FLAX_ORBAX if fmt == "orbax" else FLAX_SAFETENSORS
    assert os.path.exists(os.path.join(out, weights)), f"{fmt}: {weights} missing; OUT has {os.listdir(out)}"
    assert RetriBertConfig.from_pretrained(out) == cfg, "config.json changed in conversion"
    model = RetriBertModel.from_pretrained(out)
    _assert_params_equal_hf(model, ref, cfg)
    diff = _embed_diff(model, ref, cfg)
    assert diff <= 1e-5, f"{fmt}: embeddings differ from HF PyTorch by {diff:.3g}"


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_single_weight_file_with_config(tmp_path, tiny_cfg, suffix):
    ref = hf_reference(tiny_cfg)
    hf = save_hf(ref, str(tmp_path / "hf"), safe=suffix == ".safetensors")
    lone = tmp_path / "lone"
    lone.mkdir()
    name = "model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin"
    os.rename(os.path.join(hf, name), lone / f"weights{suffix}")
    out, _ = convert_checkpoint(
        str(lone / f"weights{suffix}"),
        str(tmp_path / "flax"),
        config=os.path.join(hf, "config.json"),
        format="safetensors",
    )
    _assert_params_equal_hf(RetriBertModel.from_pretrained(out), ref, tiny_cfg)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast(tmp_path, tiny_cfg, dtype):
    ref = hf_reference(tiny_cfg)
    src = save_hf(ref, str(tmp_path / "hf"))
    for fmt in ("orbax", "safetensors"):
        out, _ = convert_checkpoint(src, str(tmp_path / f"{fmt}-{dtype}"), format=fmt, dtype=dtype)
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(os.path.join(out, FLAX_SAFETENSORS), framework="numpy") as f:
                stored = {str(f.get_tensor(k).dtype) for k in f.keys()}
            assert stored == {dtype}, f"safetensors stored {stored}, expected {dtype}"
        else:
            import orbax.checkpoint as ocp

            meta = ocp.StandardCheckpointer().metadata(os.path.join(out, FLAX_ORBAX)).item_metadata
            stored = {str(m.dtype) for m in jax.tree_util.tree_leaves(dict(meta))}
            assert stored == {dtype}, f"orbax stored {stored}, expected {dtype}"
        # Loaded back as float32 holding exactly the rounded values.
        import ml_dtypes

        _assert_params_equal_hf(
            RetriBertModel.from_pretrained(out),
            ref,
            tiny_cfg,
            dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16,
        )


def test_save_pretrained_writes_the_same_layout(tmp_path, tiny_cfg):
    from retribert_jax import init_model

    model = init_model(tiny_cfg, seed=3)
    (tmp_path / "tok").mkdir()
    _write_tokenizer(str(tmp_path / "tok"), tiny_cfg.vocab_size)
    for fmt in ("orbax", "safetensors"):
        d = str(tmp_path / fmt)
        model.save_pretrained(d, format=fmt, tokenizer=str(tmp_path / "tok"))
        assert {"config.json", "tokenizer.json", "vocab.txt"} <= set(os.listdir(d)), os.listdir(d)
        back = flat_params(RetriBertModel.from_pretrained(d))
        for p, a in flat_params(model).items():
            assert np.array_equal(np.asarray(a), np.asarray(back[p])), f"{fmt}: {p} differs after save/load"
        with pytest.raises(FileExistsError, match="already exists"):
            model.save_pretrained(d, format=fmt)
        # Overwriting keeps the tokenizer files already there.
        model.save_pretrained(d, format=fmt, overwrite=True)
        assert "tokenizer.json" in os.listdir(d), f"{fmt}: overwrite dropped the tokenizer: {os.listdir(d)}"


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_loads_onto_a_sharding(tmp_path, tiny_cfg, fmt):
    from jax.sharding import NamedSharding, PartitionSpec

    from retribert_jax import init_model

    d = str(tmp_path / "ckpt")
    init_model(tiny_cfg).save_pretrained(d, format=fmt)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    model = RetriBertModel.from_pretrained(d, sharding=replicated)
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    wrong = [p for p, v in state if v.get_value().sharding != replicated]
    assert not wrong, f"{len(wrong)} parameters not on the requested sharding, e.g. {wrong[:2]}"


def _embed_error_line(tmp_path, model_dir: str) -> str:
    """`retribert-jax embed` on `model_dir` as a command (in its own process, so reports at exit count): it must
    fail with exit 2 and exactly one line on stderr, which is returned."""
    (tmp_path / "in.txt").write_text("a passage\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retribert_jax.cli",
            "embed",
            model_dir,
            str(tmp_path / "in.txt"),
            str(tmp_path / "out"),
            "--kind",
            "passages",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.count("\n") == 0, f"expected one line:\n{err}"
    return err


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_flax_directory_that_disagrees_with_its_config(tmp_path, tiny_cfg, fmt):
    """A Flax directory whose config.json was changed after saving is refused naming the parameter, by the loader
    and by export/re-conversion; from the command line that is one line on stderr and exit 2."""
    from retribert_jax import init_model
    from retribert_jax.checkpoint import read_flax_params
    from retribert_jax.errors import CheckpointError

    d = tmp_path / "ckpt"
    init_model(tiny_cfg).save_pretrained(str(d), format=fmt)
    saved = json.loads((d / "config.json").read_text())
    wrong_shape = r"parameter 'bert_query.encoder.layer.0.intermediate.dense.(bias|kernel)' has shape"
    wrong_names = r"missing \['bert_query.encoder.layer.2.|'bert_query.encoder.layer.2.\S+' is missing"
    for change, needle in (
        ({"intermediate_size": saved["intermediate_size"] + 4}, wrong_shape),
        ({"num_hidden_layers": saved["num_hidden_layers"] + 1}, wrong_names),
    ):
        (d / "config.json").write_text(json.dumps({**saved, **change}))
        for load in (RetriBertModel.from_pretrained, read_flax_params):
            with pytest.raises(CheckpointError, match=needle):
                load(str(d))
    err = _embed_error_line(tmp_path, str(d))
    assert re.search(wrong_names, err), err


def test_damaged_orbax_directory_names_it(tmp_path, tiny_cfg):
    from retribert_jax import init_model
    from retribert_jax.errors import CheckpointError

    good = tmp_path / "good"
    init_model(tiny_cfg).save_pretrained(str(good))

    def damaged(name: str, damage) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d / FLAX_ORBAX)
        return str(d)

    def truncate_largest(orbax_dir) -> None:  # the array data, not the metadata
        data = max((orbax_dir / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    with pytest.raises(CheckpointError, match=f"{FLAX_ORBAX}: not a readable orbax checkpoint .*missing or damaged"):
        RetriBertModel.from_pretrained(damaged("no-metadata", lambda o: (o / "_METADATA").unlink()))
    # Damaged array data fails inside orbax's concurrent reads, which leaves the others running to end on a closed
    # event loop, reported at exit: run it as the command, which must still say one line naming the array.
    err = _embed_error_line(tmp_path, damaged("truncated", truncate_largest))
    assert re.search(f'{FLAX_ORBAX}: not a readable orbax checkpoint .*"bert_query\\.', err), err


def test_cli_drops_asyncio_reports_only_after_orbax_failed():
    """The command's filter for asyncio's reports of orbax's abandoned reads (racy to provoke, so checked directly):
    "never retrieved" reports pass until an orbax read has failed in the process (flax_files logs it, the filter
    hears it and keeps it off the user's screen), other records always pass."""
    import logging

    from retribert_jax import cli, flax_files

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    never = [
        record("Task exception was never retrieved\nfuture: <Task finished>"),
        record("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished>"),
    ]
    other = record("Task was destroyed but it is pending!")
    keep = cli._OrbaxLeftovers()
    assert keep.FILES_LOGGER == flax_files.__name__
    files, asyncio_log = logging.getLogger(flax_files.__name__), logging.getLogger("asyncio")
    level = files.level
    keep.install()
    try:
        assert all(keep.filter(r) for r in [*never, other])
        heard, handler = [], logging.Handler()
        handler.emit = heard.append
        files.addHandler(handler)
        flax_files._orbax_error("x", ValueError("damaged"))
        files.removeHandler(handler)
        assert not any(keep.filter(r) for r in never) and keep.filter(other)
        assert not heard, "the failure's record reached a handler"
    finally:
        files.removeFilter(keep)
        asyncio_log.removeFilter(keep)
        files.setLevel(level)


def test_damaged_flax_safetensors_names_it(tmp_path, tiny_cfg):
    from retribert_jax import init_model
    from retribert_jax.errors import CheckpointError

    good = tmp_path / "good"
    init_model(tiny_cfg).save_pretrained(str(good), format="safetensors")
    weights = good / FLAX_SAFETENSORS
    whole = weights.read_bytes()
    for data in [whole[: len(whole) - 100], b"\xff" * 8 + whole[8:]]:  # truncated; a header length past the end
        weights.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{FLAX_SAFETENSORS}: not a readable safetensors file"):
            RetriBertModel.from_pretrained(str(good))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_load_reads_once_into_aligned_memory(tmp_path, tiny_cfg, dtype):
    """The safetensors reader's arrays are 64-byte-aligned views of one buffer, which the CPU device then uses in
    place (no second copy) for every tensor outside the encoder layers (those are stacked into one new buffer per
    parameter); stored bfloat16 is cast, hence copied. Values are the saved ones either way."""
    from retribert_jax import init_model
    from retribert_jax.checkpoint import build_model
    from retribert_jax.flax_files import _read_safetensors
    from retribert_jax.modeling import abstract_model

    model = init_model(tiny_cfg)
    model.save_pretrained(str(tmp_path / "m"), format="safetensors", dtype=dtype)
    arrays = _read_safetensors(str(tmp_path / "m" / FLAX_SAFETENSORS))
    unaligned = [p for p, a in arrays.items() if a.ctypes.data % 64]
    assert not unaligned, f"not 64-byte aligned: {unaligned[:3]}"

    def owner(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return id(a.obj if isinstance(a, memoryview) else a)

    owners = {owner(a) for a in arrays.values()}
    assert len(owners) == 1, f"expected views of one buffer, got {len(owners)} owners"
    built = build_model(abstract_model(tiny_cfg), arrays, alias_host=True)
    state = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(built, nnx.Param))}
    unstacked = [e.flax_path for e in param_table(tiny_cfg) if e.layer is None]
    in_place = [p for p in unstacked if state[p].unsafe_buffer_pointer() == arrays[p].ctypes.data]
    assert len(in_place) == (len(unstacked) if dtype == "float32" else 0), (
        f"{len(in_place)} of {len(unstacked)} in place"
    )
    placed = flat_params(built)
    for p, a in flat_params(model).items():
        want = np.asarray(a).astype(jax.numpy.dtype(dtype)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(placed[p]), want, err_msg=str(p))


def test_tokenizer_files_carried_and_missing_ones_warned(tmp_path, tiny_cfg):
    ref = hf_reference(tiny_cfg)
    src = save_hf(ref, str(tmp_path / "hf"))
    out, warnings = convert_checkpoint(src, str(tmp_path / "no-tok"))
    assert len(warnings) == 1 and "--tokenizer" in warnings[0], f"expected one warning naming --tokenizer: {warnings}"
    _write_tokenizer(src, tiny_cfg.vocab_size)
    out, warnings = convert_checkpoint(src, str(tmp_path / "with-tok"))
    assert not warnings, warnings
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), f"{name} not copied verbatim"
    tok = RetriBertTokenizer.from_pretrained(out)
    assert tok(["w1 w2"])["input_ids"].tolist() == [[2, 6, 7, 3]]


def test_converted_checkpoint_loads_without_torch(tmp_path, tiny_cfg):
    ref = hf_reference(tiny_cfg)
    src = save_hf(ref, str(tmp_path / "hf"))
    ids, mask = random_batch(np.random.default_rng(2), 3, 8, tiny_cfg.vocab_size)
    with torch.no_grad():
        want = ref.embed_questions(torch.tensor(ids, dtype=torch.long), torch.tensor(mask)).numpy()
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask)
    dirs = [convert_checkpoint(src, str(tmp_path / fmt), format=fmt)[0] for fmt in ("orbax", "safetensors")]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import json, numpy as np, jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')\n"
        "from retribert_jax import RetriBertModel\n"
        f"b = np.load({str(tmp_path / 'batch.npz')!r})\n"
        f"out = [np.asarray(RetriBertModel.from_pretrained(d).embed_questions(b['ids'], b['mask'])).tolist() "
        f"for d in {dirs!r}]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"loading without torch failed:\n{proc.stderr[-2000:]}"
    for fmt, got in zip(("orbax", "safetensors"), json.loads(proc.stdout.splitlines()[-1]), strict=True):
        diff = np.abs(np.asarray(got) - want).max()
        assert diff <= 1e-5, f"{fmt} without torch: embeddings differ from HF by {diff:.3g}"


def test_cli_and_script_convert(tmp_path, tiny_cfg):
    """The console entry and the thin script both convert, with a real exit status."""
    src = save_hf(hf_reference(tiny_cfg), str(tmp_path / "hf"))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    script = os.path.join(REPO, "convert", "convert_pytorch_checkpoint.py")
    proc = subprocess.run(
        [sys.executable, script, src, str(tmp_path / "out"), "--format", "safetensors"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / FLAX_SAFETENSORS), os.listdir(tmp_path / "out")
    assert "warning" in proc.stderr and "tokenizer" in proc.stderr, f"no tokenizer warning: {proc.stderr!r}"
    proc = subprocess.run(
        [sys.executable, "-m", "retribert_jax.cli", "convert", src, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, f"existing OUT: exit {proc.returncode}, stderr {proc.stderr!r}"
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "already exists" in proc.stderr, proc.stderr


def test_reconvert_a_flax_directory(tmp_path, tiny_cfg):
    """A converted directory converts again into the other layout and dtype, keeping tokenizer and values."""
    ref = hf_reference(tiny_cfg)
    src = save_hf(ref, str(tmp_path / "hf"))
    _write_tokenizer(src, tiny_cfg.vocab_size)
    first, _ = convert_checkpoint(src, str(tmp_path / "orbax"))
    second, warnings = convert_checkpoint(first, str(tmp_path / "st"), format="safetensors", dtype="float16")
    assert not warnings and "tokenizer.json" in os.listdir(second), (warnings, os.listdir(second))
    _assert_params_equal_hf(RetriBertModel.from_pretrained(second), ref, tiny_cfg, dtype=np.float16)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_checkpoint(tmp_path, tiny_cfg, safe):
    ref = hf_reference(tiny_cfg)
    src = str(tmp_path / "hf")
    ref.save_pretrained(src, safe_serialization=safe, max_shard_size="20KB")
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    assert os.path.isfile(os.path.join(src, index)), f"HF wrote no shards: {os.listdir(src)}"
    out, _ = convert_checkpoint(src, str(tmp_path / "flax"))
    _assert_params_equal_hf(RetriBertModel.from_pretrained(out), ref, tiny_cfg)
