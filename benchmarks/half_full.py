"""``sae_diff`` from paths on a checkpoint with half the SAE's blocks unchanged, against
one with every tensor changed (issue 14's half/full, without the rest of real_size.py).

    python benchmarks/half_full.py [--repeats 5]
    python benchmarks/half_full.py --model DIR --half FILE --full FILE --sae DIR --layer L

Defaults are the gpt2-small-shaped artefacts ``benchmarks/real_size.py`` builds
(run it once first): its base directory, ``half_L8.safetensors`` (embeddings and
blocks 0-3 exactly the base's), ``full.safetensors`` and the 24,576-feature SAE at
``blocks.8.hook_resid_pre``, over the 32 probes. Each call is what
real_size.py times: ``sae_diff(model_dir, checkpoint, fit="off")``, loading
included. Routes are interleaved; medians are printed. Target <= 0.8.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).parent / "out" / "real_size"
SHAPE = ROOT / "gpt2-small-l12-d768-v50257"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=str(SHAPE / "base"))
    parser.add_argument("--half", default=str(SHAPE / "half_L8.safetensors"))
    parser.add_argument("--full", default=str(SHAPE / "full.safetensors"))
    parser.add_argument("--sae", default=str(SHAPE / "sae_standard_raw_L8_24576_l064"))
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--prompts", default=str(ROOT / "prompts_32x1.json"))
    args = parser.parse_args()
    for path in (args.model, args.half, args.full, args.sae, args.prompts):
        if not Path(path).exists():
            parser.error(f"{path} does not exist: run benchmarks/real_size.py first")

    import aquin_nb

    prompts = json.loads(Path(args.prompts).read_text())
    logging.disable(logging.WARNING)  # the random SAE's fit warning, every call

    def run(checkpoint: str) -> None:
        diff = aquin_nb.sae_diff(
            args.model, checkpoint, prompts=prompts, layer=args.layer, sae=args.sae,
            fit="off", progress=False,
        )  # fmt: skip
        del diff
        gc.collect()

    routes = {"full": args.full, "half": args.half}
    for checkpoint in routes.values():
        run(checkpoint)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(args.repeats):
        for name, checkpoint in routes.items():
            start = time.perf_counter()
            run(checkpoint)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"repeats: {args.repeats} (medians), {len(prompts)} prompts")
    print(
        f"half {median['half']:.2f} s, full {median['full']:.2f} s: half/full "
        f"{median['half'] / median['full']:.3f} (target <= 0.8)"
    )


if __name__ == "__main__":
    main()
