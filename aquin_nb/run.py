"""Checkpointing a fine-tune in the format aquin_nb reads: ``{step, state_dict}``.

Example:
    >>> from aquin_nb import Run
    >>> from aquin_nb.models import load_hf_model
    >>> model, _, _ = load_hf_model("tiny-gpt2")
    >>> path = Run("my_run").checkpoint(model, step=100)
    >>> path.name, sorted(p.name for p in path.parent.iterdir())
    ('step_100.pt', ['checkpoint.pt', 'step_100.pt'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._errors import AquinError
from ._io import atomic_torch_save


class Run:
    """A training run directory; ``checkpoint`` writes ``checkpoints/step_<N>.pt``.

    Each call also refreshes ``checkpoints/checkpoint.pt``, the latest step. The state
    dict carries plain Hugging Face names (LoRA adapters merged), the names a
    user's own trainer writes and the names ``load_model(..., checkpoint=)`` reads.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints"

    def checkpoint(self, model: Any, step: int) -> Path:
        """Write ``{"step": step, "state_dict": ...}`` atomically to ``step_<N>.pt`` (returned)
        and to ``checkpoint.pt`` (the latest)."""
        from .models import hf_state_dict

        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise AquinError(f"step must be a non-negative integer, got {step!r}")
        # detach() keeps tied tensors sharing storage, so torch.save stores them once.
        state = {key: value.detach().cpu() for key, value in hf_state_dict(model).items()}
        payload = {"step": step, "state_dict": state}
        path = atomic_torch_save(self.checkpoint_dir / f"step_{step}.pt", payload)
        atomic_torch_save(self.checkpoint_dir / "checkpoint.pt", payload)
        return path

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r})"
