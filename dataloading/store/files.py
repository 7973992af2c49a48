"""Atomic file writes: the one way this project replaces a file.

A reader (another process, a resumed run, a crash survivor) sees either the old content or
the whole new content, never a torn file: the bytes go to a temporary sibling (unique per
process, so two writers never share it), are flushed and fsync'ed, then renamed over the
target; the directory is fsync'ed so that the rename itself survives a power loss. On any
error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def resolved(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute with its symlinks followed; a symlink loop is a ValueError in one
    line naming ``path`` and ``what`` it is (pathlib raises RuntimeError before Python 3.13,
    OSError ELOOP after: both surfaced as tracebacks)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: a symlink loop ({what}); point it at a real file or directory") from None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where that is unsupported
    (some network file systems): the rename is still atomic there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary sibling an atomic write of ``path`` goes through (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object.

    ``durable=False`` skips the fsyncs (for files that are cheap to redo, e.g. plots); the
    replacement is still atomic.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """UTF-8, newlines written as given."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(data, *, indent: int | None = 2) -> str:
    """JSON text as this project writes it (numpy values become lists / numbers)."""
    return json.dumps(data, indent=indent, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2, durable: bool = True) -> Path:
    return atomic_write_text(path, to_json(data, indent=indent), durable=durable)
