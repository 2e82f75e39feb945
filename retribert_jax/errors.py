"""The package's own errors. Each message is written for a person: it names the file, line, key or shape that is
wrong, or what to install; the command line prints it as one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a command's input that no built-in exception type describes; the message is all the user needs."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a RetriBERT; the message names the file and what is wrong."""


class MissingDependency(ImportError):
    """An optional dependency a feature needs is not installed; the message says what to `pip install`."""


class OutOfMemory(UserError):
    """A job did not fit the device's memory; the message says which setting to lower, and to what."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception is a device or host allocation failure (XLA's RESOURCE_EXHAUSTED, numpy's MemoryError)."""
    text = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
