"""`retribert-jax`: one entry point, a subcommand per job.

The jobs: demo, convert, export-pytorch, verify, embed, search, train, evaluate, mine.

Each subcommand lives in `retribert_jax/commands/<name>.py` with `HELP`, `add_arguments(parser)`, `run(args)` and
optionally `check(args)`, the mistakes it can find without JAX (run first); what the commands share is in
`commands/common.py`. Heavy imports (jax, torch) happen inside `run`, so `--help` and a mistake are instant. A user
mistake (bad path, bad file, bad value, a missing optional dependency) ends with one line on stderr and exit status
2, never a traceback.

What the command line does for its process that a library must not do for its caller's: it turns on JAX's persistent
compilation cache (see `compilation_cache_dir`) and says in one line when the cache cannot be used, keeps flax from
importing IPython, and drops the leftover reports of orbax's abandoned reads (`_own_the_process`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import itertools
import logging
import os
import re
import signal
import sys
import time
import warnings

# Subcommand name -> module under retribert_jax.commands.
COMMANDS = {
    "demo": "demo",
    "convert": "convert",
    "export-pytorch": "export_pytorch",
    "verify": "verify",
    "embed": "embed",
    "compress": "compress",
    "search": "search",
    "train": "train",
    "evaluate": "evaluate",
    "mine": "mine",
}
CACHE_ENV = "RETRIBERT_JAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")


class _Parser(argparse.ArgumentParser):
    """argparse with README's promise: a mistake in the arguments ends in one line (usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from retribert_jax import __version__

    parser = _Parser(prog="retribert-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retribert-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"retribert_jax.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        g = p.add_argument_group("start-up")
        g.add_argument(
            "--compilation-cache",
            metavar="DIR",
            help=f"keep compiled programs in DIR (default: ${CACHE_ENV}, else "
            "$XDG_CACHE_HOME/retribert_jax/jax-compilation-cache, else ~/.cache/...)",
        )
        g.add_argument(
            "--no-compilation-cache",
            action="store_true",
            help=f"compile everything afresh and keep nothing (also: {CACHE_ENV}=off)",
        )
        g.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="report where the time goes before the first batch (imports, load, compilation, ...)",
        )
        # `check(args)`: the mistakes a command can find without JAX, found before JAX is imported (seconds).
        # `FILE_OUTPUTS`: a command's outputs that are files rather than directories (`mine`'s OUT).
        p.set_defaults(
            _run=module.run,
            _check=getattr(module, "check", None),
            _file_outputs=FILE_OUTPUTS + getattr(module, "FILE_OUTPUTS", ()),
        )
    return parser


def compilation_cache_dir(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str | None:
    """Where the command keeps compiled programs: --compilation-cache, else $RETRIBERT_JAX_COMPILATION_CACHE, else
    $XDG_CACHE_HOME/retribert_jax/jax-compilation-cache, else ~/.cache/retribert_jax/jax-compilation-cache; None
    with --no-compilation-cache or the variable set to off/0/false/no/none/empty."""
    environ = os.environ if environ is None else environ
    if args.no_compilation_cache:
        return None
    if args.compilation_cache:
        return os.path.expanduser(args.compilation_cache)
    if CACHE_ENV in environ:
        value = environ[CACHE_ENV]
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "retribert_jax", "jax-compilation-cache")


class Timings:
    """Wall time of each start-up phase of a command, printed to stderr with --verbose."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))

    def report(self, file=None) -> None:
        if self.verbose and self.phases:
            parts = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.phases)
            print(f"timings: {parts}", file=file or sys.stderr)


class _HiddenIPython:
    """An import finder under which IPython is not installed (one already imported is found before it is asked)."""

    def find_spec(self, name: str, path=None, target=None):
        if name.partition(".")[0] == "IPython":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _without_ipython() -> None:
    """Imports flax.nnx with IPython hidden. flax probes for IPython at import time (to colour reprs) and importing
    it costs ~0.5 s of every start; a command is never inside IPython, so the probe's answer is "no" either way."""
    hidden = _HiddenIPython()
    sys.meta_path.insert(0, hidden)
    try:
        import flax.nnx  # noqa: F401
    finally:
        sys.meta_path.remove(hidden)


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's "<Task|Future> exception was never retrieved" reports once orbax has left reads behind, which
    `flax_files` logs (at INFO, with `ORBAX_READS_ABANDONED` set) on its own logger, the filter's other post."""

    FILES_LOGGER = "retribert_jax.flax_files"  # flax_files' `__name__`: the module itself imports JAX

    def __init__(self):
        super().__init__()
        self.reads_abandoned = False

    def install(self) -> None:
        logging.getLogger("asyncio").addFilter(self)
        files = logging.getLogger(self.FILES_LOGGER)
        files.setLevel(min(files.getEffectiveLevel(), logging.INFO))
        files.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "orbax_reads_abandoned", False):
            self.reads_abandoned = True
            return False  # a signal to this filter, not a report for the user
        if not re.match(r"\w+ exception was never retrieved", record.getMessage()):
            return True
        return not self.reads_abandoned


def _drop_orbax_leftovers() -> None:
    """Keeps a damaged orbax checkpoint's error to one line. When one of orbax's concurrent reads fails it raises at
    once and leaves the others running; they finish on its closed event loop, and Python reports each of them, as
    an ignored exception or through asyncio's logger ("exception was never retrieved"), after or even before our
    error. The command owns its process: those reports are dropped, every other one is passed on."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl-C that landed in a callback Python cannot raise from (JAX's garbage-collection callback): it was
            # printed as "Exception ignored" and lost. Delivered again, it interrupts the main thread as it should.
            signal.raise_signal(signal.SIGINT)
            return
        late = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        abandoned = inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename
        if not (late or abandoned):
            previous(unraisable)

    sys.unraisablehook = hook
    _OrbaxLeftovers().install()


def _one_line_cache_warnings() -> None:
    """JAX warns once per program, in Python's multi-line form, when the persistent compilation cache cannot be
    written or read (a full disk, say); the command says it once, in one line, and goes on compiling afresh."""
    from retribert_jax.compilation import CACHE_WARNINGS

    previous, said = warnings.showwarning, False

    def show(message, category, filename, lineno, file=None, line=None):
        nonlocal said
        text = str(message)
        if not text.startswith(CACHE_WARNINGS):
            previous(message, category, filename, lineno, file, line)
        elif not said:
            said = True
            print(
                f"retribert-jax: warning: the compilation cache could not be used "
                f"({text.split(': ', 1)[-1][:200]}); programs are compiled afresh",
                file=sys.stderr,
            )

    warnings.showwarning = show


def _own_the_process() -> None:
    """What a command does for its process and a library must not do for its caller's (run first, as a command)."""
    _without_ipython()
    _drop_orbax_leftovers()
    _one_line_cache_warnings()


# The commands' arguments by role: what they read, and what they write (a file, or a directory they replace).
INPUT_ARGUMENTS = ("index", "model", "queries", "qrels", "pairs", "input", "data", "src", "config", "tokenizer")
OUTPUT_ARGUMENTS = ("out", "output", "run_file")
FILE_OUTPUTS = ("output", "run_file")  # every command's; OUT is a directory unless the command says otherwise
OPTION_ARGUMENTS = ("output", "run_file", "config", "tokenizer")  # the rest are positional


def expand_user_paths(args: argparse.Namespace) -> None:
    """`~` at the start of a path argument means the home directory in every argument (as a shell would expand it
    unquoted), not only in those the loaders happen to expand."""
    for name in INPUT_ARGUMENTS + OUTPUT_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def _argument_name(name: str) -> str:
    return "--" + name.replace("_", "-") if name in OPTION_ARGUMENTS else name.upper()


def check_outputs_spare_inputs(args: argparse.Namespace) -> None:
    """Refuses a command whose output would overwrite one of its own inputs: the same path (`evaluate --output
    QUERIES`, `mine PAIRS PAIRS --overwrite`), or an output directory that holds an input (replaced, or filled,
    around it), or two outputs on one path. Checked before anything is read or written.

    Raises:
      UserError: naming both arguments and the path.
    """
    from retribert_jax.errors import UserError

    real = os.path.realpath  # after `expand_user_paths`
    inputs = [(n, getattr(args, n)) for n in INPUT_ARGUMENTS if isinstance(getattr(args, n, None), str)]
    outputs = [(n, getattr(args, n)) for n in OUTPUT_ARGUMENTS if isinstance(getattr(args, n, None), str)]
    for name, path in outputs:
        if name in getattr(args, "_file_outputs", FILE_OUTPUTS) and os.path.isdir(path):
            raise UserError(f"{_argument_name(name)} {path} is a directory; name the file to write")
    for (a, first), (b, second) in itertools.combinations(outputs, 2):
        if real(first) == real(second):
            raise UserError(
                f"{_argument_name(a)} and {_argument_name(b)} are the same file {first}: one would overwrite the other"
            )
    for out_name, out in outputs:
        target = real(out)
        for in_name, path in inputs:
            source = real(path)
            if source == target or source.startswith(target.rstrip(os.sep) + os.sep):
                relation = "is" if source == target else "holds"
                raise UserError(
                    f"{_argument_name(out_name)} {out} {relation} {_argument_name(in_name)} {path}: the output would "
                    "overwrite an input; write somewhere else"
                )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.timings = Timings(args.verbose)
    from retribert_jax.errors import CheckpointError, MissingDependency, UserError, is_out_of_memory
    from retribert_jax.io import interrupts_held

    try:
        expand_user_paths(args)
        check_outputs_spare_inputs(args)
        if args._check is not None:
            args._check(args)
        # A KeyboardInterrupt inside a JAX extension's initialisation comes out as an ImportError, which an optional
        # import takes for "not available": Ctrl-C in a command's first second was lost, and the job ran to the end.
        with args.timings.phase("import jax and flax"), interrupts_held():
            if argv is None:  # run as the command, not called from Python
                _own_the_process()
            import flax.nnx  # noqa: F401 - every command needs it; timed here so that the phases below are our own
        from retribert_jax.compilation import enable_compilation_cache

        cache = compilation_cache_dir(args)
        if cache is not None:
            enable_compilation_cache(cache)
        return int(args._run(args) or 0)
    except (
        UserError,
        CheckpointError,
        MissingDependency,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ValueError,
    ) as e:
        print(f"retribert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        # `train` names its own remedy (OutOfMemory, above); the encoding commands' is fewer rows per call.
        hint = "; pass a smaller --batch-size" if hasattr(args, "batch_size") else ""
        print(
            f"retribert-jax {args.command}: error: out of memory ({str(e).splitlines()[0][:200]}){hint}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        # A resumable job says what it kept and how to go on (the exception's message); others say nothing more.
        print(f"retribert-jax {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    finally:
        if argv is None:
            # The process is about to exit, and the interpreter's last garbage collection would walk every object
            # JAX and Flax made (0.25 s of a short command on a 2-core VM) with nothing left to reclaim. Frozen
            # objects are left out of it; atexit handlers and module teardown still run.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
