"""The command line's shared face (`commands/common.py`): one-line argument errors found before JAX is imported,
--version, the run arguments on every command that encodes or trains, choices from the library's constants."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from retribert_jax import cli
from retribert_jax.config import COMPUTE_DTYPES, PRECISIONS
from tests.conftest import REPO

ENCODING_COMMANDS = ("embed", "search", "evaluate", "mine", "train", "verify")


def _actions(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: a for a in sub.choices[command]._actions for opt in a.option_strings}


@pytest.mark.parametrize("command", ENCODING_COMMANDS)
def test_every_command_that_encodes_or_trains_takes_dtype_and_precision(command):
    actions = _actions(command)
    assert tuple(actions["--dtype"].choices) == COMPUTE_DTYPES, f"{command} --dtype: {actions['--dtype'].choices}"
    assert tuple(actions["--precision"].choices) == PRECISIONS, f"{command} --precision"


def test_embed_names_the_stored_dtype_apart_from_the_compute_dtype():
    actions = _actions("embed")
    assert tuple(actions["--embedding-dtype"].choices) == ("float32", "float16")
    assert actions["--compute-dtype"].dest == actions["--dtype"].dest == "dtype"
    assert actions["--compute-dtype"].help == argparse.SUPPRESS, "--compute-dtype should be a hidden alias"


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # sys.modules is printed after main returns: whether JAX was imported to find the mistake.
    code = (
        "import sys; from retribert_jax import cli; sys.argv = ['retribert-jax', *sys.argv[1:]]\n"
        "try:\n    rc = cli.main()\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('jax imported' if 'jax' in sys.modules else 'no jax', rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (("embed", "m", "in.txt", "out", "--kind", "passages", "--batch-size", "0"), "--batch-size: must be positive"),
        (("search", "idx", "m", "q", "-k", "-3"), "-k: must be positive, got -3"),
        (("train", "m", "d.jsonl", "out", "--epochs", "ten"), "expected a positive integer, got 'ten'"),
        (("embed", "m", "missing.txt", "out", "--kind", "passages"), "missing.txt: no such input file"),
        (("evaluate", "idx", "m", "missing.jsonl", "qrels"), "missing.jsonl: no such queries file"),
        (("train", "m", "missing.jsonl", "out"), "missing.jsonl: no such data file"),
        (("search", "idx", "m", "--dtype", "float16"), "invalid choice: 'float16'"),
        # An output on one of the command's inputs was written over it (evaluate, mine), or replaced with it (embed).
        (
            ("evaluate", "idx", "m", "q.jsonl", "qrels.txt", "--output", "q.jsonl"),
            "--output q.jsonl is QUERIES q.jsonl: the output would overwrite an input",
        ),
        (
            (
                "evaluate",
                "idx",
                "m",
                "q.jsonl",
                "qrels.txt",
                "--run-file",
                "../x/../" + os.path.basename(REPO) + "/qrels.txt",
            ),
            "is QRELS qrels.txt",
        ),
        (("mine", "idx", "m", "p.jsonl", "./p.jsonl"), "OUT ./p.jsonl is PAIRS p.jsonl"),
        (("embed", "m", "out/in.jsonl", "out", "--kind", "passages"), "OUT out holds INPUT out/in.jsonl"),
        (("train", "m", "d.jsonl", "m/"), "OUT m/ is MODEL m"),
        (
            ("evaluate", "idx", "m", "q.jsonl", "qrels.txt", "--output", "r.txt", "--run-file", "r.txt"),
            "--output and --run-file are the same file r.txt",
        ),
        # A file output naming a directory failed only after the whole evaluation (or mining) had run.
        (("evaluate", "idx", "m", "q.jsonl", "qrels.txt", "--run-file", "tests"), "--run-file tests is a directory"),
        (("mine", "idx", "m", "p.jsonl", "tests"), "OUT tests is a directory; name the file to write"),
        (("embed", "m", "tests", "out", "--kind", "passages"), "tests: is a directory, not the input file"),
        # A quoted ~ was expanded in MODEL only; INPUT looked for ./~/..., and OUT created a directory named ~.
        (
            ("embed", "m", "~/no-such-corpus.txt", "out", "--kind", "passages"),
            f"{os.path.expanduser('~')}/no-such-corpus.txt: no such input file",
        ),
    ],
)
def test_mistakes_end_in_one_line_before_jax_is_imported(argv, says, tmp_path):
    r = _run(*argv)
    assert r.stdout.split() == ["no", "jax", "2"], f"{argv}: {r.stdout} {r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], f"{argv}: {r.stderr}"
    assert lines[0].startswith(f"retribert-jax {argv[0]}: error: "), lines[0]


def test_version():
    from retribert_jax import __version__

    r = _run("--version")
    assert r.stdout.splitlines()[0] == f"retribert-jax {__version__}", r.stdout


def test_search_shows_ids_as_people_read_them():
    from retribert_jax.commands.search import shown_id

    assert [shown_id(v) for v in ("zlib#0", 7, ["a", 1])] == ["zlib#0", "7", '["a", 1]']


def test_demo_cache_follows_xdg_cache_home(tmp_path):
    from retribert_jax.commands.demo import cache_dir

    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == os.path.join(str(tmp_path), "retribert_jax")
    assert cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "retribert_jax")


def test_verify_tolerance_follows_how_the_model_runs():
    from retribert_jax.verify import DEFAULT_ATOL, default_atol

    assert default_atol() == DEFAULT_ATOL[None]
    assert default_atol(None, "bfloat16") == DEFAULT_ATOL["bfloat16"]
    assert default_atol(None, "float32", "default") == DEFAULT_ATOL["bfloat16"]
    assert default_atol("float16", "float32", "highest") == DEFAULT_ATOL["float16"]


def test_out_of_memory_while_encoding_ends_in_one_line(tmp_path, monkeypatch, capsys):
    from retribert_jax.commands import search

    def runs_out(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\nmore")

    monkeypatch.setattr(search, "run", runs_out)
    assert cli.main(["search", str(tmp_path), "model", "why"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "retribert-jax search: error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to "
        "allocate 17179869184 bytes.); pass a smaller --batch-size"
    ], err


def test_ctrl_c_while_jax_imports_is_held_and_raised_after():
    """Ctrl-C in a command's first second was lost: inside a JAX extension's initialisation the KeyboardInterrupt
    became an ImportError, which an optional import took for "not available", and the job ran to the end (exit 0).
    The CLI holds SIGINT over the imports (and `train` over each checkpoint save) and raises it after them."""
    import signal

    from retribert_jax.io import interrupts_held

    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            try:  # what the extension did to it: had it been raised here, this would swallow it
                import time

                time.sleep(0.05)
            except BaseException:
                pass
            reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_lost_in_a_callback_is_delivered_again(monkeypatch):
    """Ctrl-C that landed in JAX's garbage-collection callback was printed as "Exception ignored in:
    <function _xla_gc_callback>" and lost; the command's unraisable hook delivers it again to the main thread."""
    import signal
    import types

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(cli._OrbaxLeftovers, "install", lambda self: None)
    cli._drop_orbax_leftovers()
    lost = types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(), object=print)
    with pytest.raises(KeyboardInterrupt):
        sys.unraisablehook(lost)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
