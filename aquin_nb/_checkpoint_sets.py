"""A run's checkpoints, ordered by step: a directory, a glob, a list or ``{step: checkpoint}``.

``Run(dir).checkpoint(model, step)`` writes ``checkpoints/step_<N>.pt`` and
refreshes ``checkpoints/checkpoint.pt``, a copy of the latest step; the copy is
never counted as a step of its own. The step of a file is read from its name
(``step_<N>``, ``checkpoint-<N>`` as Hugging Face's Trainer names its
directories, or any name ending in a number) and, failing that, from the
``step`` field of a ``{step, state_dict}`` file, read with the same safe loader
as every checkpoint.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import AquinError

LATEST_COPY = "checkpoint.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# step_100.pt, checkpoint-500 (a directory), step-7.safetensors
_RUN_ENTRY = re.compile(r"^(?:step|checkpoint)[_-](\d+)(?:\.(?:pt|pth|bin|safetensors))?$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: its step, what to load (a path or a loaded model), a label."""

    step: int
    source: Any
    label: str

    @property
    def where(self) -> str:
        """How messages name it: the file, or the step of a loaded model."""
        if isinstance(self.source, (str, Path)):
            return str(self.source)
        return f"the loaded model of step {self.step}"


def is_glob(text: str) -> bool:
    return bool(_GLOB_CHARS.search(text))


def run_checkpoint_dir(directory: Path) -> Path | None:
    """The folder that holds a run's step checkpoints, or None when ``directory`` is none.

    A Run's root (it has ``checkpoints/``) or the ``checkpoints/`` folder itself;
    a Hugging Face or PEFT directory is a single checkpoint, not a run.
    """
    if (directory / "checkpoints").is_dir():
        return directory / "checkpoints"
    if (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file():
        return None
    return directory


def names_a_set(value: Any) -> bool:
    """Whether ``value`` (a CLI ``--checkpoint``) names a set of checkpoints, not one."""
    if not isinstance(value, (str, Path)):
        return isinstance(value, (list, tuple, Mapping))
    text = os.path.expanduser(str(value))
    if is_glob(text) and not Path(text).exists():
        return True
    path = Path(text)
    if not path.is_dir():
        return False
    folder = run_checkpoint_dir(path)
    if folder is None:
        return False
    return folder != path or path.name == "checkpoints" or any(map(_is_run_entry, path.iterdir()))


def _is_run_entry(path: Path) -> bool:
    return bool(_RUN_ENTRY.match(path.name)) and path.name != LATEST_COPY


def step_of(path: Path) -> int:
    """The step a checkpoint file stands for: from its name, else its ``step`` field."""
    name = path.name if path.is_dir() else path.stem
    match = _TRAILING_NUMBER.search(name)
    if match:
        return int(match.group(1))
    if path.is_file():
        from ._checkpoints import read_checkpoint

        _, step = read_checkpoint(path)
        if step is not None:
            return int(step)
    raise AquinError(
        f"cannot tell the step of checkpoint {path}: its name does not end in a number "
        f"(step_<N>.pt) and it has no 'step' field; name it step_<N>.pt or pass {{step: path}}"
    )


def describe(checkpoints: Any) -> str:
    """What the summary records as the trajectory's source."""
    if isinstance(checkpoints, (str, Path)):
        return str(checkpoints)
    if isinstance(checkpoints, Mapping):
        return f"{len(checkpoints)} checkpoints by step"
    return f"{len(checkpoints)} checkpoints"


def resolve_checkpoints(checkpoints: Any) -> list[CheckpointRef]:
    """The checkpoints ``checkpoints`` names, ordered by step; every step appears once.

    ``checkpoints`` may be a Run directory (or its ``checkpoints/``), a glob, a
    list of paths, or a mapping ``{step: path or loaded model}``.
    """
    refs: list[CheckpointRef]
    if isinstance(checkpoints, Mapping):
        refs = []
        for step, source in checkpoints.items():
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise AquinError(f"steps must be non-negative integers, got {step!r}")
            refs.append(CheckpointRef(step, source, _label(source, step)))
    elif isinstance(checkpoints, (str, Path)):
        refs = [_ref(path) for path in _paths_of(checkpoints)]
    elif isinstance(checkpoints, (list, tuple)):
        refs = []
        for item in checkpoints:
            if not isinstance(item, (str, Path)):
                raise AquinError(
                    f"a list of checkpoints must hold paths; pass loaded models as "
                    f"{{step: model}} (got a {type(item).__name__})"
                )
            refs.append(_ref(Path(item).expanduser()))
    else:
        raise AquinError(
            f"checkpoints must be a run directory, a glob, a list of paths or {{step: "
            f"checkpoint}}, got {type(checkpoints).__name__}"
        )
    if not refs:
        raise AquinError(f"no checkpoints given ({describe(checkpoints)})")
    refs.sort(key=lambda ref: ref.step)
    for earlier, later in zip(refs, refs[1:], strict=False):
        if earlier.step == later.step:
            raise AquinError(
                f"step {later.step} appears twice: {earlier.where} and {later.where}; "
                f"each step may have one checkpoint"
            )
    return refs


def _label(source: Any, step: int) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.stem if path.suffix in CHECKPOINT_SUFFIXES else path.name
    return f"step_{step}"


def _ref(path: Path) -> CheckpointRef:
    if not path.exists():
        raise AquinError(f"checkpoint {path} does not exist")
    return CheckpointRef(step_of(path), str(path), _label(path, 0))


def _paths_of(spec: str | Path) -> list[Path]:
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_dir():
        folder = run_checkpoint_dir(path)
        if folder is None:
            return [path]  # one Hugging Face or PEFT directory
        found = sorted(entry for entry in folder.iterdir() if _is_run_entry(entry))
        if not found:
            raise AquinError(
                f"no checkpoints in {folder}: expected step_<N>.pt files (as Run.checkpoint "
                f"writes them) or checkpoint-<N> directories"
            )
        return found
    if path.exists():
        return [path]
    if not is_glob(text):
        raise AquinError(f"checkpoints {text} does not exist (a run directory or a glob)")
    found = sorted(
        Path(match)
        for match in glob.glob(text)
        if Path(match).name != LATEST_COPY
        and (Path(match).is_dir() or Path(match).suffix in CHECKPOINT_SUFFIXES)
    )
    if not found:
        raise AquinError(f"no checkpoints match {text}")
    return found
