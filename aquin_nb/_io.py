"""Atomic file output and bounded JSON input.

Output: a failure never leaves half a file behind, the file gets the mode a
plain ``open(path, "w")`` would give it (``0o666 & ~umask``, or the mode of the
file it replaces), and temp files that a killed writer left behind are removed
on a later write to the same directory (swept at most every ten minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ._errors import AquinError

# Our temp files are ".NAME.PID.RANDOM.tmp"; the PID says whether the writer still runs.
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# A temp file untouched this long is stale even if a process with its PID runs
# (PIDs are reused, and another host may share the directory).
STALE_TEMP_SECONDS = 3600.0
# A temp file whose writer is gone is stale once untouched this long; the grace
# keeps a writer on another host (same PID space unknown) from losing its file.
DEAD_WRITER_GRACE_SECONDS = 60.0

# A directory is swept at most this often per process, so writing many files
# into one directory (activation shards) stays linear.
SWEEP_INTERVAL_SECONDS = 600.0

_umask_lock = threading.Lock()
_cached_umask: int | None = None
_sweep_lock = threading.Lock()
_last_sweep: dict[str, float] = {}


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which races with other threads
    creating files; Linux reports it in ``/proc/self/status`` instead. Elsewhere it
    is read once (set and restored under a lock) and cached.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    global _cached_umask
    with _umask_lock:
        if _cached_umask is None:
            _cached_umask = os.umask(0o022)
            os.umask(_cached_umask)
        return _cached_umask


def _open_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the existing file's, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def remove_stale_temp_files(directory: Path, *, now: float | None = None) -> list[Path]:
    """Delete temp files of our own pattern that a killed writer left in ``directory``.

    Only names matching ``.NAME.PID.RANDOM.tmp`` are considered. One is stale when
    it has not been touched for `STALE_TEMP_SECONDS`, or when its writer's PID no
    longer runs here and it has not been touched for `DEAD_WRITER_GRACE_SECONDS`.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        idle = now - info.st_mtime
        writer_gone = not _pid_running(int(match.group("pid")))
        if idle >= STALE_TEMP_SECONDS or (writer_gone and idle >= DEAD_WRITER_GRACE_SECONDS):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # it exists but belongs to someone else (or is not ours to judge)
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    directory = path.parent
    if path.is_dir():
        raise AquinError(f"cannot write {path}: it is a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        mode = _open_mode(path)
        handle = tempfile.NamedTemporaryFile(
            dir=directory, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise AquinError(f"cannot write {path}: {error.strerror or error}") from error
    temp_path = Path(handle.name)
    try:
        # mkstemp creates 0600; the rename would carry that onto the output.
        with contextlib.suppress(OSError):
            os.fchmod(handle.fileno(), mode)
        yield handle, temp_path
    except BaseException:
        handle.close()
        temp_path.unlink(missing_ok=True)
        raise
    _sweep(directory)


def _sweep(directory: Path) -> None:
    """`remove_stale_temp_files`, at most once per `SWEEP_INTERVAL_SECONDS` per directory."""
    key = os.path.abspath(directory)
    now = time.monotonic()
    with _sweep_lock:
        last = _last_sweep.get(key)
        if last is not None and now - last < SWEEP_INTERVAL_SECONDS:
            return
        _last_sweep[key] = now
    remove_stale_temp_files(directory)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` into a temp file, then rename it into place."""
    target = Path(path)
    with _temp_beside(target) as (handle, temp_path):
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.replace(temp_path, target)
        except OSError as error:
            raise AquinError(f"cannot write {target}: {error.strerror or error}") from None
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def check_not_same_file(
    output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None
) -> None:
    """Raise `AquinError` if writing ``output`` would replace one of ``inputs``.

    Compares resolved paths, and device and inode where both exist (hard links,
    bind mounts). ``None`` inputs are skipped.

    Example:
        >>> check_not_same_file("report.json", "checkpoint.pt")
    """
    target = Path(output).expanduser()
    if target.is_dir():
        raise AquinError(f"output {target} is a directory; name a file")
    for source in inputs:
        if source is None:
            continue
        candidate = Path(source).expanduser()
        same = False
        try:
            same = os.path.samefile(target, candidate)
        except OSError:  # one of them does not exist yet
            same = target.resolve() == candidate.resolve()
        if same:
            raise AquinError(
                f"output {target} is the input {candidate}; writing it would replace the "
                f"input, so choose another output path"
            )


# JSON inputs (configs, prompt files) are parsed whole; beyond this they are refused.
MAX_JSON_BYTES = 512 * 1024 * 1024


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is an `AquinError` naming ``where``.

    Besides syntax errors this covers nesting deeper than the interpreter's
    recursion limit and integers longer than Python's int-to-str digit limit.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        location = f" at line {error.lineno}" if "\n" in text else ""
        raise AquinError(f"{where} is not valid JSON: {error.msg}{location}") from None
    except RecursionError:
        raise AquinError(f"{where} is not usable JSON: it is nested too deeply") from None
    except ValueError as error:  # e.g. an integer past sys.get_int_max_str_digits()
        message = str(error).strip().splitlines()[0] if str(error).strip() else "bad value"
        raise AquinError(f"{where} is not usable JSON: {message}") from None


def read_json(path: str | os.PathLike[str], what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path``; every problem is one `AquinError` line naming it."""
    path = Path(path)
    where = f"{what} {path}"
    try:
        size = path.stat().st_size
    except OSError:
        raise AquinError(f"{where} does not exist") from None
    if not path.is_file():
        raise AquinError(f"{where} is not a file")
    if size > max_bytes:
        raise AquinError(
            f"{where} is {size:,} bytes; JSON inputs above {max_bytes:,} bytes are refused"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AquinError(f"{where} is not UTF-8 text (bad byte at offset {error.start})") from None
    except OSError as error:
        raise AquinError(f"cannot read {where}: {error.strerror or error}") from None
    if not text.strip():
        raise AquinError(f"{where} is empty")
    return parse_json(text, where)
