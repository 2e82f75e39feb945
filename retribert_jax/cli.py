"""`retribert-jax`: one entry point, a subcommand per job (demo, convert, export-pytorch, verify, embed, search, train).

Each subcommand lives in `retribert_jax/commands/<name>.py` with `HELP`, `add_arguments(parser)` and `run(args)`;
heavy imports (jax, torch) happen inside `run`, so `--help` is instant. A user mistake (bad path, bad file, bad
value) ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
import sys

# Subcommand name -> module under retribert_jax.commands.
COMMANDS = {
    "demo": "demo",
    "convert": "convert",
    "export-pytorch": "export_pytorch",
    "verify": "verify",
    "embed": "embed",
    "search": "search",
    "train": "train",
    "evaluate": "evaluate",
    "mine": "mine",
}


class UserError(Exception):
    """A mistake in the command's input; its message is all the user needs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retribert-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"retribert_jax.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"retribert_jax.commands.{module_name}":
                raise
            continue  # a command not built yet in this checkout
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _AbandonedOrbaxReads(logging.Filter):
    """asyncio's "<Task|Future> exception was never retrieved" reports, once orbax has left reads behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not re.match(r"\w+ exception was never retrieved", record.getMessage()):
            return True
        checkpoints = sys.modules.get("retribert_jax.flax_checkpoint")
        return not (checkpoints is not None and checkpoints.orbax_reads_abandoned())


def _drop_orbax_leftovers() -> None:
    """Keeps a damaged orbax checkpoint's error to one line. When one of orbax's concurrent reads fails it raises at
    once and leaves the others running; they finish on its closed event loop, and Python reports each of them, as
    an ignored exception or through asyncio's logger ("exception was never retrieved"), after or even before our
    error. The command owns its process: those reports are dropped, every other one is passed on."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        late = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        abandoned = inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename
        if not (late or abandoned):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedOrbaxReads())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # run as the command, not called from Python
        _drop_orbax_leftovers()
    from retribert_jax.checkpoint import CheckpointError

    try:
        return int(args._run(args) or 0)
    except (UserError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError) as e:
        print(f"retribert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retribert-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
