"""sae_diff against its floor and the naive route, measured side by side in one run.

    python benchmarks/diff.py [--repeats 3] [--prompts-scale 10] [--device cuda] [--dtype bfloat16]

* ours: ``aquin_nb.sae_diff(fit="off")`` with both models already loaded (loading is the
  same for every route and is left out).
* floor: the two truncated forwards plus the SAE encode, and nothing else.
* naive: SAELens ``HookedSAETransformer.run_with_cache_with_saes`` (full forward)
  for base and checkpoint, every token's feature vector gathered, then a pandas diff.

It prints the ratios ours/floor and naive/ours, and the peak RSS (and, on CUDA,
the peak GPU memory) of a fresh process running ``sae_diff`` at 1x and at
``--prompts-scale``x the probe set. Absolute times on a shared machine mean
little; the ratios are the result.

``--device`` and ``--dtype`` put both models, the SAE and the naive route's
HookedTransformers on that device in that dtype (default: cpu, float32);
``benchmarks/gpu.sh`` runs this on CUDA in bfloat16.
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)  # CUDA runs asynchronously: time the work, not its launch
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PEAK = r"""
import json, resource, sys, torch, aquin_nb
checkpoint, prompts, device, dtype = sys.argv[1:5]
dtype = getattr(torch, dtype)
base = aquin_nb.load_model("tiny-gpt2", device=device, dtype=dtype)
ckpt = aquin_nb.load_model("tiny-gpt2", checkpoint, device=device, dtype=dtype)
sae = aquin_nb.load_sae("tiny-gpt2").to(device=device, dtype=dtype)
aquin_nb.sae_diff(base, ckpt, prompts=prompts, sae=sae, progress=False)
gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu": gpu}))
"""


def _peak_mb(checkpoint: Path, prompts_file: Path, device: str, dtype: str) -> dict:
    """Peak RSS (and peak GPU memory on CUDA) of a fresh process loading both models and
    running ``sae_diff`` on ``prompts_file``."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(checkpoint), str(prompts_file), device, dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts-scale", type=int, default=10)
    parser.add_argument("--tmp", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    device, dtype = args.device, DTYPES[args.dtype]

    import pandas as pd

    from aquin_nb import load_model, load_sae, sae_diff
    from aquin_nb._activations import (
        context_length,
        prepare_bridge,
        residual,
        token_batches,
        tokenize_prompts,
    )
    from aquin_nb.demo.reference import hooked_reference
    from aquin_nb.models import apply_checkpoint, load_hf_model
    from aquin_nb.probes import load_prompts
    from aquin_nb.saes import sae_numerics

    checkpoint = _checkpoint(args.tmp)
    prompts = load_prompts(None)
    sae = load_sae("tiny-gpt2").to(device=device, dtype=dtype)
    numerics = sae_numerics(sae)
    base = load_model("tiny-gpt2", device=device, dtype=dtype)
    ckpt = load_model("tiny-gpt2", checkpoint, device=device, dtype=dtype)
    prepare_bridge(base, numerics)
    prepare_bridge(ckpt, numerics)

    hf_base = load_hf_model("tiny-gpt2")[0]
    hf_ckpt = apply_checkpoint(load_hf_model("tiny-gpt2")[0], checkpoint)
    hooked_base, hooked_ckpt = (
        hooked_reference(hf, numerics.processing, device=device, dtype=dtype)
        for hf in (hf_base, hf_ckpt)
    )
    feature_hook = f"{numerics.hook_name}.hook_sae_acts_post"

    def routes(prompt_list: list[str]):
        token_lists = tokenize_prompts(
            base.tokenizer, prompt_list, prepend_bos=True, max_length=context_length(base, numerics)
        )

        def ours() -> None:
            sae_diff(base, ckpt, prompts=prompt_list, sae=sae, fit="off", progress=False)

        def floor() -> None:
            # batched as sae_diff batches: in order of length
            batches = token_batches(token_lists, batch_size=16, skip_first=True, by_length=True)
            for batch in batches:
                mask = batch.mask.to(device)
                for bridge in (base, ckpt):
                    acts = residual(bridge, batch.tokens, numerics.hook_name)[mask]
                    sae.encode(acts.to(sae.W_dec.dtype))

        def naive() -> None:
            frames = []
            for label, model in (("base", hooked_base), ("checkpoint", hooked_ckpt)):
                for index, ids in enumerate(token_lists):
                    _, cache = model.run_with_cache_with_saes(torch.tensor([ids]), saes=[sae])
                    frame = pd.DataFrame(cache[feature_hook][0, 1:].float().cpu().numpy())
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
                results[name].append(_time(fns[name], 1, device))
        timings[scale] = {name: statistics.median(values) for name, values in results.items()}
        timings[scale]["tokens"] = sum(len(ids) - 1 for ids in token_lists)

    many = args.tmp / "prompts_scaled.json"
    many.write_text(json.dumps(prompts * args.prompts_scale))
    one = args.tmp / "prompts_one.json"
    one.write_text(json.dumps(prompts))
    peak_one = _peak_mb(checkpoint, one, device, args.dtype)
    peak_many = _peak_mb(checkpoint, many, device, args.dtype)

    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"device: {where}, dtype: {args.dtype}")
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
    rss_one, rss_many = peak_one["rss"], peak_many["rss"]
    print(
        f"peak RSS 1x = {rss_one:.0f} MB, {args.prompts_scale}x = {rss_many:.0f} MB, "
        f"ratio {rss_many / rss_one:.3f}  (target <= 1.1)"
    )
    if peak_one["gpu"] is not None:
        gpu_one, gpu_many = peak_one["gpu"], peak_many["gpu"]
        print(
            f"peak GPU memory 1x = {gpu_one:.0f} MB, {args.prompts_scale}x = {gpu_many:.0f} MB, "
            f"ratio {gpu_many / gpu_one:.3f}  (target <= 1.1)"
        )


if __name__ == "__main__":
    main()
