"""Compiled programs are kept: the command line's persistent compilation cache, where it lives, how to turn it off,
and that a second run of a job loads every program instead of compiling it (JAX's cache-hit events)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from retribert_jax.cli import CACHE_ENV, compilation_cache_dir
from tests.conftest import REPO
from tests.embed_helpers import random_texts, tiny_model_dir


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"compilation_cache": None, "no_compilation_cache": False, **kw})


def test_where_the_cache_lives():
    home = os.path.expanduser("~")
    assert compilation_cache_dir(_args(), {}) == os.path.join(home, ".cache", "retribert_jax", "jax-compilation-cache")
    assert compilation_cache_dir(_args(), {"XDG_CACHE_HOME": "/x"}) == "/x/retribert_jax/jax-compilation-cache"
    assert compilation_cache_dir(_args(), {CACHE_ENV: "/y/c", "XDG_CACHE_HOME": "/x"}) == "/y/c"
    for off in ("off", "0", "false", "", "NONE"):
        assert compilation_cache_dir(_args(), {CACHE_ENV: off}) is None, off
    assert compilation_cache_dir(_args(compilation_cache="/z"), {CACHE_ENV: "off"}) == "/z"
    assert compilation_cache_dir(_args(compilation_cache="/z", no_compilation_cache=True), {}) is None
    assert compilation_cache_dir(_args(no_compilation_cache=True), {CACHE_ENV: "/y"}) is None


def _embed(model_dir: str, corpus: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop(CACHE_ENV, None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "retribert_jax.cli",
            "embed",
            model_dir,
            corpus,
            out,
            "--kind",
            "passages",
            "--no-progress",
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _programs(stderr: str) -> tuple[int, int]:
    """(programs obtained, of which loaded from the cache) from embed's summary line."""
    m = re.search(r"; (\d+) programs(?: \((\d+) from the compilation cache\))?, compiled in", stderr)
    assert m, f"no summary line in:\n{stderr}"
    return int(m.group(1)), int(m.group(2) or 0)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in random_texts(40, seed=11)), encoding="utf-8")
    return tiny_model_dir(str(root / "model")), str(corpus), root


@pytest.mark.slow
def test_second_run_of_a_job_compiles_nothing(job):
    model_dir, corpus, root = job
    cache = str(root / "cache")
    first = _embed(model_dir, corpus, str(root / "out1"), "--compilation-cache", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    n1, cached1 = _programs(first.stderr)
    assert n1 >= 1 and cached1 == 0, f"a fresh cache served {cached1} of {n1} programs"
    second = _embed(model_dir, corpus, str(root / "out2"), "--compilation-cache", cache)
    assert second.returncode == 0, second.stderr[-2000:]
    n2, cached2 = _programs(second.stderr)
    assert (n2, cached2) == (n1, n1), f"second run: {cached2} of {n2} programs from the cache, first run had {n1}"
    off = _embed(model_dir, corpus, str(root / "out3"), "--no-compilation-cache")
    assert off.returncode == 0 and _programs(off.stderr)[1] == 0, "--no-compilation-cache still used the cache"


def test_unwritable_cache_gives_one_warning_and_the_job_goes_on(job):
    model_dir, corpus, root = job
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    run = _embed(model_dir, corpus, str(root / "out-unwritable"), "--compilation-cache", str(blocker / "cache"))
    assert run.returncode == 0, run.stderr[-2000:]
    warnings = [ln for ln in run.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0], f"expected one warning line: {warnings}"
    assert os.path.isfile(root / "out-unwritable" / "manifest.json"), "the job did not finish"


FULL_DISK = r"""
import errno, os, sys
import jax, jax.numpy as jnp
from jax._src import lru_cache
from retribert_jax import cli
from retribert_jax.compilation import enable_compilation_cache

def full(self, key, value):
    raise OSError(errno.ENOSPC, "No space left on device")

lru_cache.LRUCache.put = full
cli._one_line_cache_warnings()  # what the command does for its process
assert enable_compilation_cache(sys.argv[1])
for n in (3, 4, 5):  # three programs, three failed writes
    jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(n)).compile()
print("done")
"""


def test_full_cache_gives_one_warning_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "cache")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "No space left" in lines[0], f"expected one warning line, got: {lines}"
