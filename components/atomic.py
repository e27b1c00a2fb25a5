"""Atomic writes: every artifact is written under a temporary name, then renamed into place.

A crash (even SIGKILL) therefore leaves either the old output or no output, never a half-written one
that DVC would cache. ``file_sha256`` is the one checksum of a written file (shards, exports, bundles, champions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _temporary_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    return Path(name)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is renamed to ``path``.

    ``suffix`` keeps an extension for writers that insist on one (e.g. ``.npy``, ``.zip``).
    """
    target = Path(path)
    temporary = _temporary_sibling(target, suffix)
    try:
        yield temporary
        with contextlib.suppress(OSError):
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield temporary
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
        _fsync_directory(target.parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write torch tensors to a safetensors file atomically."""
    from safetensors.torch import save_file  # here, so that atomic (and params, which uses it) loads without torch

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(contiguous, str(temporary), metadata=metadata)


def json_sha256(value: Any) -> str:
    """The sha256 (hex) of ``value`` as JSON with sorted keys (``default=str`` for paths and the like)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 of the file at ``path`` (hex), read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
