"""Atomic file output: a failure never leaves half a file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ._errors import AquinError


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            dir=directory, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise AquinError(f"cannot write {path}: {error.strerror or error}") from error
    temp_path = Path(handle.name)
    try:
        yield handle, temp_path
    except BaseException:
        handle.close()
        temp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` into a temp file, then rename it into place."""
    target = Path(path)
    with _temp_beside(target) as (handle, temp_path):
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
