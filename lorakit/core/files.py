"""Writing files so that nothing the user had is lost or half-written.

Every file goes to a temp path beside its target and is renamed over it only
when complete, with the permissions a plain open() would have given. An existing target is refused unless the caller was told to force.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LorakitError


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks (weight files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(path: str | os.PathLike, force: bool, *, folder: bool = False) -> None:
    """Raise unless `path` can be written: its parent folder exists and is writable, and `path` does not exist
    (or `force`, and it is of the kind to be written: a file, or with `folder` a folder)."""
    path = Path(path)
    if path.exists() and not force:
        raise LorakitError(f"{path} already exists", hint="pass --force to overwrite it, or choose another path")
    if path.exists() and path.is_dir() != folder:
        raise LorakitError(f"{path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}",
                           hint="choose another path; --force replaces only something of the same kind")
    if not path.parent.is_dir():
        raise LorakitError(f"folder {path.parent} does not exist", hint="create it first, or choose another path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LorakitError(f"cannot write into {path.parent}: permission denied",
                           hint="choose a folder you can write to")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temp file name beside `path` (same suffix, so writers can tell the format from it);
    renamed onto `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{path.suffix or '.tmp'}"
    # Created as open() would (0666 less the umask, applied by the kernel), exclusively, so that a
    # writer that replaces the file keeps those permissions; no umask round trip, so no thread race.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
