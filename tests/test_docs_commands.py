"""The command sequences in README.md and docs/*.md run as written (issue 22).

Every line of every ```bash block is a command. A `retribert-jax` command runs, in the block's order, with its own
arguments and relative paths, in a temporary directory that holds tiny inputs under the names the docs use; one doc
file is one sequence (a later block may read what an earlier one wrote). Only the programs in `SKIPPED` are passed
over and only the tokens in `STAND_INS` are replaced, so a command added to the docs is run by default, and a line
this test cannot run fails it until it is listed here.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass

import pytest

from tests.conftest import REPO
from tests.embed_helpers import WORDS, tiny_model_dir

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]

# Doc lines this test does not run, by how they start: installing, the whole test suite, the benchmarks (each has
# its own test: tests/test_benchmarks.py).
SKIPPED = ("pip install ", "python -m pytest", "python benchmarks/")

# The only tokens replaced, each naming what cannot exist here; every other token runs as the doc writes it.
STAND_INS = {
    "yjernite/retribert-base-uncased": "path/to/retribert-base-uncased",  # a hub id: tests never reach the hub
    "/shared/out": "shared/out",  # a file system shared by hosts
    "host0:12345": "127.0.0.1:{port}",  # another host: this one, on a free port
    "H": "1",  # H hosts: one
    "h": "0",  # host h of them: the first
}
# Appended to every `train` command, the one change to a command's arguments (argparse keeps the last value): the
# docs' runs are right, but a CPU takes minutes for steps of the default 512 pairs. These keep reading the data,
# loading the model, training with dropout and remat chunks, checkpointing and writing model/ as the doc's command does.
TRAIN_FOR_A_TEST = ["--batch-size", "64", "--max-steps", "2"]
# Scripts the docs run from the checkout's root; the test runs in another directory, so they are found in REPO.
SCRIPTS = {"convert/convert_pytorch_checkpoint.py"}


@dataclass
class Command:
    doc: str
    line: int  # 1-based, the command's first line in the doc
    text: str  # as written, continuation lines joined
    argv: list[str]  # after `retribert-jax`, or the script and its arguments
    stdout: str | None = None  # `> FILE`

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def bash_lines(doc: str) -> list[tuple[int, str]]:
    """(line number, text) of each logical line inside the ```bash blocks of `doc` (backslash continuations joined)."""
    out, inside, pending, start = [], False, "", 0
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if line.startswith("```"):
                inside = not inside and line[3:].strip() == "bash"
                continue
            if not inside:
                continue
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
    return out


def commands(doc: str) -> list[Command]:
    """The commands this test runs from `doc`, in order; an unknown program or shell syntax fails with its line."""
    found = []
    for number, line in bash_lines(doc):
        for part in re.split(r"\s&&\s", line):
            text, tokens = part.strip(), shlex.split(part, comments=True)
            if not tokens or text.startswith(SKIPPED):
                continue
            stdout = None
            if len(tokens) > 2 and tokens[-2] == ">":
                tokens, stdout = tokens[:-2], tokens[-1]
            odd = [t for t in tokens if t in ("|", ";", "<", ">", ">>", "&") or t.startswith("$")]
            if odd:
                raise ValueError(f"{doc}:{number}: `{text}`: shell syntax {odd} that this test does not run")
            if tokens[0] == "retribert-jax":
                argv = tokens[1:]
            elif tokens[0] == "python" and len(tokens) > 1 and tokens[1] in SCRIPTS:
                argv = tokens[1:]
            else:
                raise ValueError(
                    f"{doc}:{number}: `{text}` is neither a retribert-jax command nor skipped: run it in "
                    "tests/test_docs_commands.py or add it to SKIPPED"
                )
            found.append(Command(doc, number, text, argv, stdout))
    return found


def stand_ins(argv: list[str], port: int) -> list[str]:
    argv = [STAND_INS[t].format(port=port) if t in STAND_INS else t for t in argv]
    return argv + TRAIN_FOR_A_TEST if argv[0] == "train" else argv


def expected_outputs(argv: list[str]) -> list[str]:
    """The files a successful command leaves, found by its own parser: OUT, --output, --run-file."""
    from retribert_jax import cli

    if argv[0] not in cli.COMMANDS:
        return []
    args = cli.build_parser().parse_args(argv)
    paths = [
        p for p in (getattr(args, "out", None), getattr(args, "output", None), getattr(args, "run_file", None)) if p
    ]
    if argv[0] == "embed":
        paths.append(os.path.join(args.out, "manifest.json"))
    if argv[0] == "train":
        paths.append(os.path.join(args.out, "model", "config.json"))
    return paths


def run(command: Command, port: int) -> tuple[int, str]:
    """Runs `command` in the current directory: (exit status, its stderr and stdout's end)."""
    argv = stand_ins(command.argv, port)
    if "--coordinator" in argv:  # jax.distributed must start before this process's JAX computes anything
        env = {**os.environ, "PYTHONPATH": REPO}
        r = subprocess.run(
            [sys.executable, "-m", "retribert_jax.cli", *argv], capture_output=True, text=True, env=env, timeout=300
        )
        return r.returncode, (r.stderr + r.stdout)[-3000:]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if argv[0] in SCRIPTS:
                sys_argv = sys.argv
                sys.argv = [os.path.join(REPO, argv[0]), *argv[1:]]
                try:
                    runpy.run_path(sys.argv[0], run_name="__main__")
                    rc = 0
                finally:
                    sys.argv = sys_argv
            else:
                from retribert_jax import cli

                rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        rc, err = 1, io.StringIO(err.getvalue() + traceback.format_exc())
    if command.stdout is not None:
        with open(command.stdout, "w", encoding="utf-8") as f:
            f.write(out.getvalue())
    return rc, (err.getvalue() + out.getvalue())[-3000:]


# ---- the inputs, under the names the docs use ----

MODEL_DIRS = ("path/to/retribert-base-uncased", "path/to/retribert", "SRC", "MODEL", "ckpt")


def _sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("docs") / "tiny"))


def prepare(directory: str, model: str) -> None:
    """Tiny inputs for every command in the docs: checkpoints, a corpus, questions, queries with qrels, pairs."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name in MODEL_DIRS:
        shutil.copytree(model, os.path.join(directory, name))
    _bin_checkpoint(model, directory)
    shutil.copy(os.path.join(model, "vocab.txt"), _mkdir(directory, "path/with/vocab"))

    passages = [_sentence(rng, 12) for _ in range(24)]
    _jsonl(os.path.join(directory, "corpus.jsonl"), [{"id": f"d{i}", "text": t} for i, t in enumerate(passages)])
    _jsonl(
        os.path.join(_mkdir(directory, "beir/scifact"), "corpus.jsonl"),
        [{"_id": f"d{i}", "title": "the sky", "text": t} for i, t in enumerate(passages)],
    )
    _jsonl(os.path.join(directory, "wiki_passages.jsonl"), [{"text": t} for t in passages])
    questions = [_sentence(rng, 5) + "?" for _ in range(6)]
    with open(os.path.join(directory, "questions.txt"), "w", encoding="utf-8") as f:
        f.writelines(q + "\n" for q in questions)
    _jsonl(os.path.join(directory, "queries.jsonl"), [{"id": f"q{i}", "text": q} for i, q in enumerate(questions)])
    with open(os.path.join(directory, "qrels.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"q{i} 0 d{i} 1\n" for i in range(len(questions)))

    # `train`'s default batch is 512 pairs, and it refuses data that makes no whole batch.
    pairs = [{"question": _sentence(rng, 5) + "?", "answer": _sentence(rng, 10)} for _ in range(512)]
    _jsonl(os.path.join(directory, "pairs.jsonl"), pairs)
    _jsonl(os.path.join(directory, "eli5_qa.jsonl"), pairs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "anchor": [p["question"] for p in pairs],
                "positive": [p["answer"] for p in pairs],
                "negative": [pairs[i - 1]["answer"] for i in range(len(pairs))],
            }
        ),
        os.path.join(directory, "triplets.parquet"),
    )


def _bin_checkpoint(model: str, directory: str) -> None:
    """pytorch_model.bin and config.json side by side, as a lone .bin checkpoint is often handed around."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    tensors = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(model, "model.safetensors")).items()}
    torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    shutil.copy(os.path.join(model, "config.json"), directory)


def _mkdir(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    os.makedirs(path, exist_ok=True)
    return path


def _jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the tests ----

RUN_DOCS = [doc for doc in DOCS if bash_lines(doc)]


def test_the_docs_with_commands_are_found():
    with_commands = {doc for doc in DOCS if commands(doc)}
    expected = {"README.md", "docs/convert.md", "docs/embed.md", "docs/evaluate.md", "docs/train.md"}
    assert expected <= with_commands, f"no retribert-jax commands found in {sorted(expected - with_commands)}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_doc_commands_run_as_written(doc, tiny_model, tmp_path, monkeypatch):
    doc_commands = commands(doc)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the demo builds its checkpoint there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare(str(tmp_path), tiny_model)
    port = _free_port()
    for command in doc_commands:
        rc, said = run(command, port)
        assert rc == 0, f"{command.where} exited {rc}:\n{said}"
        missing = [p for p in expected_outputs(stand_ins(command.argv, port)) if not os.path.exists(p)]
        if command.stdout is not None and not os.path.getsize(command.stdout):
            missing.append(f"{command.stdout} (empty)")
        assert not missing, f"{command.where} exited 0 but left no {missing}"
