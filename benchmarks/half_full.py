"""``sae_diff`` on a checkpoint with half the blocks unchanged, against one with every
tensor changed (issue 14's half/full, without the rest of real_size.py).

    python benchmarks/half_full.py [--repeats 5]
    python benchmarks/half_full.py --model DIR --half FILE --full FILE --sae DIR --layer L

Defaults are the gpt2-small-shaped artefacts ``benchmarks/real_size.py`` builds
(run it once first): its base directory, ``full.safetensors``, the 24,576-feature
SAE at ``blocks.8.hook_resid_pre`` and the 32 probes. Two readings of "half the
blocks unchanged" are measured:

* ``half_L8.safetensors`` (real_size.py's): the embeddings and half the blocks the
  SAE reads through (4 of 8) exactly the base's. Forwards: 4 + 2 x 4 = 12 block
  passes against 16, so 0.75 is the bound with nothing else in the call.
* half of the model's blocks (6 of 12), built here from the base and the full
  checkpoint (``half_model.safetensors`` beside it, cached): 6 + 2 x 2 = 10 block
  passes against 16, 0.625.

Each is timed two ways: from paths, ``sae_diff(model_dir, checkpoint, fit="off")``
as real_size.py times it (loading included), and on models already loaded
(``aquin_nb.load_model``, the compute alone). Routes are interleaved; medians are
printed. Target <= 0.8.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).parent / "out" / "real_size"
SHAPE = ROOT / "gpt2-small-l12-d768-v50257"


def half_model_checkpoint(model_dir: Path, full: Path, out: Path) -> Path:
    """The full checkpoint with the embeddings and the first half of the model's blocks
    put back to the base's (GPT-2 names), written once."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    if out.is_file():
        return out
    n_layers = int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    base: dict = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        base.update(load_file(path))
    state = load_file(full)
    block = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")
    for key in state:
        match = block.match(key)
        keep = int(match.group(1)) < n_layers // 2 if match else "wte" in key or "wpe" in key
        if keep:
            state[key] = base[key]
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp))
    tmp.rename(out)
    return out


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
    half_model = half_model_checkpoint(
        Path(args.model), Path(args.full), Path(args.full).with_name("half_model.safetensors")
    )
    checkpoints = {"full": args.full, "half_sae": args.half, "half_model": str(half_model)}
    sae = aquin_nb.load_sae(args.sae)
    base = aquin_nb.load_model(args.model)
    loaded = {name: aquin_nb.load_model(args.model, path) for name, path in checkpoints.items()}

    def run(model: object, checkpoint: object, sae: object) -> None:
        diff = aquin_nb.sae_diff(
            model, checkpoint, prompts=prompts, layer=args.layer, sae=sae,
            fit="off", progress=False,
        )  # fmt: skip
        del diff

    routes = {}
    for name, path in checkpoints.items():
        routes[f"paths {name}"] = lambda path=path: run(args.model, path, args.sae)
        routes[f"loaded {name}"] = lambda name=name: run(base, loaded[name], sae)
    for route in routes.values():
        route()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(args.repeats):
        for name, route in routes.items():
            start = time.perf_counter()
            route()
            times[name].append(time.perf_counter() - start)
            gc.collect()  # outside the timing: it walks every loaded model's objects
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"repeats: {args.repeats} (medians), {len(prompts)} prompts")
    for way in ("paths", "loaded"):
        full = median[f"{way} full"]
        for half, what in (("half_sae", "4 of the SAE's 8 blocks"), ("half_model", "6 of 12")):
            value = median[f"{way} {half}"]
            print(
                f"{way}: {what} unchanged {value:.2f} s, full {full:.2f} s: "
                f"half/full {value / full:.3f} (target <= 0.8)"
            )


if __name__ == "__main__":
    main()
