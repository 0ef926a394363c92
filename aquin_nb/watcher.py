"""``watch``: diff each new checkpoint of a run as the trainer writes it.

The base side is prepared once (as in `sae_trajectory`); then the run's
checkpoint folder is polled. A checkpoint is read once it is complete: its size
and modification time are the same at two polls in a row (a file renamed into
place, as `Run.checkpoint` writes them, passes at its second poll; one written
in place waits until the writer stops). Each diffed checkpoint is added to the
trajectory, the trajectory JSON is rewritten atomically, and the step is
reported through the verb seam as a ``sae_trajectory`` call, so a connected
mirror shows the trajectory growing, one row per checkpoint. ``watch`` itself is
not a verb, so that each step is.

A restart reads the trajectory JSON back and skips the steps it holds. A bad
checkpoint (unreadable, another architecture, a second file for a step already
diffed) is reported (a warning, and an error row on the mirror) and skipped,
and read again only if the file changes; a checkpoint deleted before or while
it is read is reported by name. Ctrl-C stops the watch between two polls or in
the middle of a diff, and returns the trajectory of the steps finished so far
(all of them already saved).

Example:
    >>> import aquin_nb
    >>> trajectory = aquin_nb.watch(run_dir, "tiny-gpt2", idle_timeout_s=0, progress=False)
    >>> trajectory.summary["n_steps"], (run_dir / "trajectory.json").is_file()
    (2, True)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._checkpoint_sets import LATEST_COPY, CheckpointRef, step_of
from ._errors import AquinError
from ._metrics import find_metrics, read_metrics
from ._quiet import quiet_unless_progress
from ._track import DEFAULT_MAX_FEATURES, DEFAULT_TOP_K, empty_trajectory
from ._verbs import verb
from .results import SaeTrajectory
from .trajectory import Comparison

logger = logging.getLogger(__name__)

__all__ = ["TRAJECTORY_FILE", "watch"]

TRAJECTORY_FILE = "trajectory.json"


def checkpoint_folder(run_dir: Path) -> Path:
    """Where a run's step checkpoints appear: ``run_dir/checkpoints`` (also before the
    trainer creates it), or ``run_dir`` itself when it already holds step files."""
    nested = run_dir / "checkpoints"
    if nested.is_dir() or run_dir.name == "checkpoints":
        return nested if nested.is_dir() else run_dir
    if any(_is_step_file(entry) for entry in _entries(run_dir)):
        return run_dir
    return nested


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _is_step_file(path: Path) -> bool:
    from ._checkpoint_sets import _RUN_ENTRY

    return path.name != LATEST_COPY and bool(_RUN_ENTRY.match(path.name))


def _signature(path: Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a file, summed over a directory's files; None once it is gone."""
    try:
        if path.is_dir():
            stats = [entry.stat() for entry in path.rglob("*") if entry.is_file()]
            return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns


@dataclass
class _Folder:
    """What the watch knows about the files of the checkpoint folder between polls."""

    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    bad: dict[Path, tuple[int, int]] = field(default_factory=dict)
    reported_duplicates: set[Path] = field(default_factory=set)
    waiting: set[Path] = field(default_factory=set)  # seen, not yet complete

    def complete(self, folder: Path) -> list[Path]:
        """Files whose size and mtime did not change since the last poll (and that are not
        known bad in their current state); reports files that vanished before being read."""
        now: dict[Path, tuple[int, int]] = {}
        for entry in _entries(folder):
            if _is_step_file(entry):
                signature = _signature(entry)
                if signature is not None:
                    now[entry] = signature
        ready = [
            path
            for path, signature in now.items()
            if self.seen.get(path) == signature and self.bad.get(path) != signature
        ]
        for gone in self.waiting - set(now):
            logger.warning("checkpoint %s was deleted before it was diffed", gone)
        for gone in set(self.bad) - set(now):
            self.bad.pop(gone)
        self.waiting = {path for path, signature in now.items() if self.seen.get(path) != signature}
        self.seen = now
        return ready


@verb("sae_trajectory", entry_point=False)
def _diff_new_checkpoint(
    checkpoint: str, step: int, *, comparison: Comparison, trajectory: SaeTrajectory
) -> SaeTrajectory:
    """One watched checkpoint added to the trajectory, reported like a `sae_trajectory` call."""
    ref = CheckpointRef(step, checkpoint, Path(checkpoint).stem)
    try:
        result = comparison.local_pass(ref)
    except AquinError:
        if not Path(checkpoint).exists():
            raise AquinError(
                f"checkpoint {checkpoint} (step {step}) was deleted while it was being read"
            ) from None
        raise
    return comparison.labelled(comparison.add(trajectory, ref, result))


@quiet_unless_progress
def watch(
    run_dir: str | Path,
    model: Any,
    prompts: Any = None,
    layer: int | None = None,
    sae: Any = None,
    name: str | None = None,
    *,
    output: str | Path | None = None,
    metrics: Any = None,
    poll_s: float = 2.0,
    idle_timeout_s: float | None = None,
    max_new: int | None = None,
    stop: threading.Event | None = None,
    top_k: int = DEFAULT_TOP_K,
    max_features: int = DEFAULT_MAX_FEATURES,
    batch_size: int = 16,
    fdr: float = 0.05,
    min_rel_delta: float = 0.1,
    min_abs_delta: float = 1e-3,
    fit: str = "fast",
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> SaeTrajectory:
    """Diff each new checkpoint of ``run_dir`` against ``model`` until stopped.

    Args:
        run_dir: the run directory (its ``checkpoints/`` holds ``step_<N>.pt`` files,
            as `Run.checkpoint` writes them), or that ``checkpoints/`` folder.
        model, prompts, layer, sae, name, top_k, max_features, batch_size, fdr,
            min_rel_delta, min_abs_delta, fit, device, dtype: as in `sae_trajectory`.
        output: the trajectory JSON (default ``run_dir/trajectory.json``),
            rewritten atomically after each step and read back on a restart.
        metrics: the metrics JSONL to plot (default: the run's ``metrics.jsonl``,
            re-read at each step), or ``False``.
        poll_s: seconds between two looks at the folder.
        idle_timeout_s: stop once no checkpoint was diffed for this long (None:
            run until Ctrl-C or ``stop``); 0 diffs what is there and stops.
        max_new: stop after diffing this many new checkpoints.
        stop: a ``threading.Event``; setting it stops the watch at the next poll.

    Returns the trajectory of every step diffed, restored ones included.
    """
    if poll_s <= 0:
        raise AquinError(f"poll_s must be positive, got {poll_s}")
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise AquinError(f"run directory {run_dir} does not exist")
    run_name = name or (run_dir.parent.name if run_dir.name == "checkpoints" else run_dir.name)
    output = Path(output).expanduser() if output is not None else run_dir / TRAJECTORY_FILE
    metrics_file = _metrics_file(run_dir, metrics)
    comparison = Comparison(
        model,
        prompts,
        layer,
        sae,
        batch_size=batch_size,
        fdr=fdr,
        min_rel_delta=min_rel_delta,
        min_abs_delta=min_abs_delta,
        fit=fit,
        backend="local",
        prompt_shards=1,
        device=device,
        dtype=dtype,
        verb_name="watch",
    )
    trajectory = _restore(output, comparison)
    if trajectory is None:
        summary = comparison.summary(run_name, str(run_dir), top_k, max_features)
        summary["metrics"] = str(metrics_file) if metrics_file is not None else None
        trajectory = empty_trajectory(summary)
    else:
        logger.info("resuming %s: %d steps already diffed", output, trajectory.summary["n_steps"])
    folder_state = _Folder()
    diffed = 0
    last_activity = time.monotonic()
    try:
        while True:
            ready = folder_state.complete(checkpoint_folder(run_dir))
            for path in sorted(ready, key=_step_or_none):
                grown = _consider(path, trajectory, folder_state, comparison, metrics_file, output)
                if grown is None:
                    continue
                trajectory, diffed, last_activity = grown, diffed + 1, time.monotonic()
                if max_new is not None and diffed >= max_new:
                    return trajectory
            idle = time.monotonic() - last_activity
            if (stop is not None and stop.is_set()) or (
                idle_timeout_s is not None and not folder_state.waiting and idle >= idle_timeout_s
            ):
                return trajectory
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        logger.warning(
            "watch stopped (Ctrl-C): %d steps in %s", trajectory.summary["n_steps"], output
        )
        return trajectory


def _step_or_none(path: Path) -> int:
    try:
        return step_of(path)
    except AquinError:
        return -1


def _metrics_file(run_dir: Path, metrics: Any) -> Path | None:
    if metrics is False:
        return None
    if metrics is not None:
        return Path(metrics).expanduser()
    return (
        find_metrics(run_dir)
        or find_metrics(run_dir / "checkpoints")
        or (run_dir / "metrics.jsonl" if run_dir.name != "checkpoints" else None)
    )


def _restore(output: Path, comparison: Comparison) -> SaeTrajectory | None:
    """The trajectory a previous watch wrote to ``output``, checked to be this comparison's."""
    if not output.exists():
        return None
    trajectory = SaeTrajectory.from_json(output)
    comparison.check_summary(trajectory.summary, f"trajectory {output}")
    return trajectory


def _consider(
    path: Path,
    trajectory: SaeTrajectory,
    folder_state: _Folder,
    comparison: Comparison,
    metrics_file: Path | None,
    output: Path,
) -> SaeTrajectory | None:
    """Diff ``path`` if it is a new step; a bad checkpoint is reported and remembered."""
    signature = _signature(path)
    if signature is None:
        logger.warning("checkpoint %s was deleted before it was diffed", path)
        return None
    try:
        step = step_of(path)
    except AquinError as error:
        folder_state.bad[path] = signature
        logger.warning("skipped %s", error)
        return None
    done = trajectory.per_step.set_index("step")["checkpoint"].to_dict()
    if step in done:
        if str(path) != done[step] and path not in folder_state.reported_duplicates:
            folder_state.reported_duplicates.add(path)
            logger.warning(
                "skipped checkpoint %s: step %d is already in the trajectory (from %s)",
                path,
                step,
                done[step],
            )
        return None
    try:
        grown = _diff_new_checkpoint(str(path), step, comparison=comparison, trajectory=trajectory)
    except AquinError as error:
        folder_state.bad[path] = signature
        logger.warning("skipped checkpoint %s (step %d): %s", path, step, error)
        return None
    if metrics_file is not None and metrics_file.is_file():
        try:
            grown = dataclasses.replace(grown, metrics=read_metrics(metrics_file))
        except AquinError as error:
            logger.warning("metrics not updated: %s", error)
    grown.to_json(output)
    return grown
