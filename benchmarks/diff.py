"""sae_diff against its floor and the naive route, measured side by side in one run.

    python benchmarks/diff.py [--repeats 3] [--prompts-scale 10]

* ours: ``aquin_nb.sae_diff(fit="off")`` with both models already loaded (loading is the
  same for every route and is left out).
* floor: the two truncated forwards plus the SAE encode, and nothing else.
* naive: SAELens ``HookedSAETransformer.run_with_cache_with_saes`` (full forward)
  for base and checkpoint, every token's feature vector gathered, then a pandas diff.

It prints the ratios ours/floor and naive/ours, and the peak RSS of a fresh
process running ``sae_diff`` at 1x and at ``--prompts-scale``x the probe set.
Absolute times on a shared machine mean little; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp: Path) -> Path:
    from aquin_nb.models import load_hf_model

    model, _, _ = load_hf_model("tiny-gpt2")
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.h.1.mlp.c_proj.bias"] += 0.5 * torch.randn(model.config.n_embd)
    path = tmp / "bench_checkpoint.pt"
    torch.save({"step": 1, "state_dict": state}, path)
    return path


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb(checkpoint: Path, prompts_file: Path) -> float:
    code = (
        "import resource, aquin_nb\n"
        f"aquin_nb.sae_diff('tiny-gpt2', {str(checkpoint)!r}, prompts={str(prompts_file)!r}, "
        "progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts-scale", type=int, default=10)
    parser.add_argument("--tmp", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    import pandas as pd

    from aquin_nb import load_model, load_sae, sae_diff
    from aquin_nb._activations import (
        context_length,
        prepare_bridge,
        residual,
        token_batches,
        tokenize_prompts,
    )
    from aquin_nb.demo.reference import hooked_tiny_gpt2
    from aquin_nb.models import apply_checkpoint, load_hf_model
    from aquin_nb.probes import load_prompts
    from aquin_nb.saes import sae_numerics

    checkpoint = _checkpoint(args.tmp)
    prompts = load_prompts(None)
    sae = load_sae("tiny-gpt2")
    numerics = sae_numerics(sae)
    base, ckpt = load_model("tiny-gpt2"), load_model("tiny-gpt2", checkpoint)
    prepare_bridge(base, numerics)
    prepare_bridge(ckpt, numerics)

    hf_ckpt = apply_checkpoint(load_hf_model("tiny-gpt2")[0], checkpoint)
    hooked_base = hooked_tiny_gpt2(None, **numerics.processing)
    hooked_ckpt = hooked_tiny_gpt2(hf_ckpt, **numerics.processing)
    feature_hook = f"{numerics.hook_name}.hook_sae_acts_post"

    def routes(prompt_list: list[str]):
        token_lists = tokenize_prompts(
            base.tokenizer, prompt_list, prepend_bos=True, max_length=context_length(base, numerics)
        )

        def ours() -> None:
            sae_diff(base, ckpt, prompts=prompt_list, sae=sae, fit="off", progress=False)

        def floor() -> None:
            for batch in token_batches(token_lists, batch_size=16, skip_first=True):
                for bridge in (base, ckpt):
                    sae.encode(residual(bridge, batch.tokens, numerics.hook_name)[batch.mask])

        def naive() -> None:
            frames = []
            for label, model in (("base", hooked_base), ("checkpoint", hooked_ckpt)):
                for index, ids in enumerate(token_lists):
                    _, cache = model.run_with_cache_with_saes(torch.tensor([ids]), saes=[sae])
                    frame = pd.DataFrame(cache[feature_hook][0, 1:].numpy())
                    frame["prompt"], frame["side"] = index, label
                    frames.append(frame)
            table = pd.concat(frames)
            means = table.drop(columns="prompt").groupby("side").mean()
            (means.loc["checkpoint"] - means.loc["base"]).abs().sort_values(ascending=False)

        return token_lists, {"ours": ours, "floor": floor, "naive": naive}

    timings: dict[int, dict[str, float]] = {}
    for scale in (1, args.prompts_scale):
        token_lists, fns = routes(prompts * scale)
        names = ("ours", "floor", "naive") if scale == 1 else ("ours", "floor")
        # Interleave the routes so machine noise hits them alike.
        results: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                results[name].append(_time(fns[name], 1))
        timings[scale] = {name: statistics.median(values) for name, values in results.items()}
        timings[scale]["tokens"] = sum(len(ids) - 1 for ids in token_lists)

    many = args.tmp / "prompts_scaled.json"
    many.write_text(json.dumps(prompts * args.prompts_scale))
    one = args.tmp / "prompts_one.json"
    one.write_text(json.dumps(prompts))
    rss_one, rss_many = _peak_rss_mb(checkpoint, one), _peak_rss_mb(checkpoint, many)

    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    for scale, t in timings.items():
        print(f"{len(prompts) * scale} prompts / {t['tokens']:.0f} tokens:")
        line = f"  ours {t['ours'] * 1000:8.1f} ms   floor {t['floor'] * 1000:8.1f} ms"
        if "naive" in t:
            line += f"   naive {t['naive'] * 1000:8.1f} ms"
        print(line)
        print(f"  ours/floor = {t['ours'] / t['floor']:.2f}  (target <= 1.2)")
        if "naive" in t:
            print(f"  naive/ours = {t['naive'] / t['ours']:.2f}  (target >= 2)")
    print(
        f"peak RSS 1x = {rss_one:.0f} MB, {args.prompts_scale}x = {rss_many:.0f} MB, "
        f"ratio {rss_many / rss_one:.3f}  (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
