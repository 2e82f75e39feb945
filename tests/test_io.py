"""Atomic outputs are durable: everything is flushed to disk before it is published under its name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from retribert_jax import io

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc")


@dataclass
class Flushes:
    published: str  # the output's final name
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (path flushed, did `published` exist then)


def _recording(monkeypatch, published: str) -> Flushes:
    flushes, real = Flushes(published), os.fsync

    def record(fd: int) -> None:
        flushes.calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(published)))
        real(fd)

    monkeypatch.setattr(io.os, "fsync", record)
    return flushes


def test_atomic_directory_flushes_everything_before_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "out"
    flushes = _recording(monkeypatch, str(out))
    with io.atomic_directory(str(out)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        for name in ("a.bin", "sub/b.bin"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"x" * 10)
    before = sorted(os.path.relpath(p, tmp) for p, seen in flushes.calls if not seen and p.startswith(tmp))
    assert before == [".", "a.bin", "sub", "sub/b.bin"], flushes.calls
    assert (str(tmp_path), True) in flushes.calls, f"parent not flushed after the rename: {flushes.calls}"


def test_atomic_file_flushes_file_then_its_directory(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    flushes = _recording(monkeypatch, str(out))
    with io.atomic_file(str(out), "w") as f:
        f.write("done\n")
    assert [seen for _, seen in flushes.calls] == [False, True], flushes.calls
    assert flushes.calls[-1][0] == str(tmp_path), flushes.calls
    assert out.read_text() == "done\n"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    """Directories and files of an atomic output get the modes the umask gives, whoever wrote them privately
    (mkdtemp's 0700, safetensors' 0600)."""
    import numpy as np
    from safetensors.numpy import save_file

    previous = os.umask(umask)
    try:
        with io.atomic_directory(str(tmp_path / "ckpt")) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            save_file({"w": np.zeros(2, np.float32)}, os.path.join(tmp, "sub", "model.safetensors"))
        with io.atomic_file(str(tmp_path / "one.json"), "w") as f:
            f.write("{}")
    finally:
        os.umask(previous)
    modes = {
        os.path.relpath(os.path.join(d, n), tmp_path): os.stat(os.path.join(d, n)).st_mode & 0o777
        for d, dirs, files in os.walk(tmp_path)
        for n in dirs + files
    }
    want = {
        "ckpt": 0o777 & ~umask,
        "ckpt/sub": 0o777 & ~umask,
        "ckpt/sub/model.safetensors": 0o666 & ~umask,
        "one.json": 0o666 & ~umask,
    }
    assert {k: oct(v) for k, v in modes.items()} == {k: oct(v) for k, v in want.items()}


def test_saved_checkpoints_follow_the_umask(tmp_path):
    from retribert_jax import RetriBertConfig, init_model

    previous = os.umask(0o022)
    try:
        model = init_model(RetriBertConfig.tiny())
        for fmt in ("safetensors", "orbax"):
            model.save_pretrained(str(tmp_path / fmt), format=fmt)
    finally:
        os.umask(previous)
    private = [
        os.path.relpath(os.path.join(d, n), tmp_path)
        for d, dirs, files in os.walk(tmp_path)
        for n in dirs + files
        if not os.stat(os.path.join(d, n)).st_mode & 0o044
    ]
    assert not private, f"written unreadable to group and others under umask 022: {private}"
