"""Where checkpoint files come from: a local path as it is, or a hub id downloaded with huggingface_hub."""

from __future__ import annotations

import os

# What a RetriBERT checkpoint directory may hold: HF configs and tokenizer files, weights, our orbax directory.
_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.bin", "flax_params/**"]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """A local file or directory for `path_or_id`: the path itself, or a hub snapshot (huggingface_hub's cache).

    Raises:
      FileNotFoundError: neither a local path nor a downloadable hub id (offline, unknown repo, ...).
    """
    path = os.path.expanduser(os.fspath(path_or_id))
    if os.path.exists(path):
        return os.path.abspath(path)
    if path.count("/") > 1 or path.startswith((".", "/", "~")) or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{path}: not a local path, and huggingface_hub is not installed") from None
    try:
        return snapshot_download(repo_id=path, allow_patterns=_PATTERNS)
    except Exception as e:  # network errors, unknown repo, offline mode: all mean "cannot get it"
        reason = " ".join(str(e).split())  # huggingface_hub's messages span lines; an error is one line
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise FileNotFoundError(
            f"{path}: not a local path, and the hub download failed ({type(e).__name__}: {reason})"
        ) from None
