"""``aquin-nb demo``: the main job on the embedded default, offline.

Fine-tunes tiny-gpt2 with the LoRA fixture, runs ``model_diff`` (where the
fine-tune acts, without a dictionary) and ``sae_diff`` on the result with
the shipped probes, trains a temporary SAE on the checkpoint (warm-started from
the public one), aligns the two dictionaries, and writes ``demo_out/``: one JSON
per result and ``report.html`` with their cards.

Example:
    >>> from aquin_nb.demo.run import run_demo
    >>> result = run_demo("demo_out")  # doctest: +SKIP
    >>> result.diff.summary["n_changed"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..align import sae_align
from ..dashboards import reference_corpus
from ..diff import sae_diff
from ..modeldiff import model_diff
from ..results import ModelDiff, SaeAlign, SaeDiff, TrainedSae
from ..train import sae_train
from .finetune import finetune_lora

DEMO_CORPUS_TEXTS = 300


@dataclass(frozen=True)
class DemoResult:
    checkpoint: Path
    signals: ModelDiff
    diff: SaeDiff
    trained: TrainedSae
    align: SaeAlign
    written: list[Path] = field(default_factory=list)


def run_demo(
    out: str | Path = "demo_out", *, steps: int = 120, progress: bool = True
) -> DemoResult:
    out = Path(out)
    checkpoint = finetune_lora("tiny-gpt2", run_dir=out / "run", steps=steps, progress=progress)
    # Where to look first, without a dictionary; then the SAE features at that layer.
    signals = model_diff("tiny-gpt2", checkpoint, name="cooking-lora", progress=progress)
    diff = sae_diff("tiny-gpt2", checkpoint, name="cooking-lora", progress=progress)
    # The report shows where the top features fire in the probes, and their dashboards
    # over a slice of the shipped corpus (the whole corpus takes minutes on a CPU).
    reference = reference_corpus(DEMO_CORPUS_TEXTS)
    diff = diff.with_token_views().with_dashboards(corpus=reference, progress=progress)
    trained = sae_train(
        "tiny-gpt2",
        diff.summary["layer"],
        checkpoint=checkpoint,
        quick=True,
        name="cooking-lora",
        output=out / "temp_sae",
        progress=progress,
    )
    align = sae_align("tiny-gpt2", trained.summary["path"], progress=progress)
    results: list[tuple[str, Any]] = [
        ("model_diff", signals),
        ("sae_diff", diff),
        ("sae_train", trained),
        ("sae_align", align),
    ]
    written = [result.to_json(out / f"{kind}.json") for kind, result in results]
    try:
        from ..cards import write_report
    except ImportError:
        pass
    else:
        written.append(write_report(out / "report.html", [result for _, result in results]))
    return DemoResult(
        checkpoint=checkpoint,
        signals=signals,
        diff=diff,
        trained=trained,
        align=align,
        written=written,
    )
