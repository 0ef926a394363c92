"""model_diff against two plain forward passes, and what the fast fit adds to sae_diff.

    python benchmarks/model_diff.py [--repeats 5]

* model_diff / floor: ``aquin_nb.model_diff`` on loaded models against two plain
  full forward passes (base and checkpoint, the same batches, logits only).
  Target <= 1.2.
* fast fit: ``sae_diff(fit="fast")`` against ``sae_diff(fit="off")`` on the
  demo's LoRA checkpoint, end to end from the slug and checkpoint path (as the
  demo calls it) and with the models already loaded. Target: adds <= 25%.

Routes are interleaved so machine noise hits them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import aquin_nb
    from aquin_nb._activations import token_batches, tokenize_prompts
    from aquin_nb.demo.finetune import finetune_lora
    from aquin_nb.probes import load_prompts

    tmp = Path(tempfile.mkdtemp(prefix="aquin-bench-"))
    checkpoint = finetune_lora("tiny-gpt2", run_dir=tmp / "run", steps=40, progress=False)
    torch.set_grad_enabled(False)
    base = aquin_nb.load_model("tiny-gpt2")
    ckpt = aquin_nb.load_model("tiny-gpt2", checkpoint)
    token_lists = tokenize_prompts(
        base.tokenizer, load_prompts(None), prepend_bos=True, max_length=1024
    )

    def floor() -> None:
        for batch in token_batches(token_lists, batch_size=16, skip_first=True):
            base(batch.tokens, return_type="logits")
            ckpt(batch.tokens, return_type="logits")

    def ours() -> None:
        aquin_nb.model_diff(base, ckpt, progress=False)

    md = _median_times({"model_diff": ours, "floor": floor}, args.repeats)

    fresh_base = aquin_nb.load_model("tiny-gpt2")
    fresh_ckpt = aquin_nb.load_model("tiny-gpt2", checkpoint)
    loaded = _median_times(
        {
            "off": lambda: aquin_nb.sae_diff(fresh_base, fresh_ckpt, fit="off", progress=False),
            "fast": lambda: aquin_nb.sae_diff(fresh_base, fresh_ckpt, fit="fast", progress=False),
        },
        args.repeats,
    )
    end_to_end = _median_times(
        {
            "off": lambda: aquin_nb.sae_diff("tiny-gpt2", checkpoint, fit="off", progress=False),
            "fast": lambda: aquin_nb.sae_diff("tiny-gpt2", checkpoint, fit="fast", progress=False),
        },
        args.repeats,
    )
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    print(
        f"model_diff {md['model_diff'] * 1000:.1f} ms, two plain forwards "
        f"{md['floor'] * 1000:.1f} ms: ratio {md['model_diff'] / md['floor']:.2f} (target <= 1.2)"
    )
    for label, t in (("models loaded", loaded), ("end to end (as the demo)", end_to_end)):
        print(
            f"sae_diff {label}: fit=off {t['off'] * 1000:.1f} ms, fit=fast "
            f"{t['fast'] * 1000:.1f} ms: +{t['fast'] / t['off'] - 1:.0%} (target <= +25%)"
        )


if __name__ == "__main__":
    main()
