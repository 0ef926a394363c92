"""``aquin-nb demo``: the main job on the embedded default, offline.

Fine-tunes tiny-gpt2 with the LoRA fixture, runs ``sae_diff`` on the result with
the shipped probes, and writes ``demo_out/``.

Example:
    >>> from aquin_nb.demo.run import run_demo
    >>> result = run_demo("demo_out")  # doctest: +SKIP
    >>> result.diff.summary["n_changed"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..diff import SaeDiff, sae_diff
from .finetune import finetune_lora


@dataclass(frozen=True)
class DemoResult:
    checkpoint: Path
    diff: SaeDiff
    written: list[Path] = field(default_factory=list)


def run_demo(
    out: str | Path = "demo_out", *, steps: int = 120, progress: bool = True
) -> DemoResult:
    out = Path(out)
    checkpoint = finetune_lora("tiny-gpt2", run_dir=out / "run", steps=steps, progress=progress)
    diff = sae_diff("tiny-gpt2", checkpoint, name="cooking-lora", progress=progress)
    written = [diff.to_json(out / "sae_diff.json")]
    try:
        from ..cards import write_report
    except ImportError:
        pass
    else:
        written.append(write_report(out / "report.html", [diff]))
    return DemoResult(checkpoint=checkpoint, diff=diff, written=written)
