"""model_diff against two plain forward passes, and what the fast fit adds to sae_diff.

    python benchmarks/model_diff.py [--repeats 5]
    python benchmarks/model_diff.py --model DIR --checkpoint FILE [--prompts FILE]

With ``--model`` (a local model directory, e.g. one `benchmarks/real_size.py`
built) only the model_diff ratio is measured, on that model and checkpoint.

* model_diff / floor: ``aquin_nb.model_diff`` on loaded models against two plain
  full forward passes (base and checkpoint, the same batches, logits only:
  16 prompts a batch in order of length, as model_diff batches them). Target
  <= 1.2. The ratio against forwards batched in list order is printed beside it.
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
    parser.add_argument("--model", help="a local model directory instead of tiny-gpt2")
    parser.add_argument("--checkpoint", help="with --model: the checkpoint to diff")
    parser.add_argument("--prompts", help="a prompts file instead of the shipped probes")
    args = parser.parse_args()
    if bool(args.model) != bool(args.checkpoint):
        parser.error("--model and --checkpoint go together")

    import aquin_nb
    from aquin_nb._activations import token_batches, tokenize_prompts
    from aquin_nb._checkpoints import is_peft_adapter
    from aquin_nb._diff_core import load_pair
    from aquin_nb.demo.finetune import finetune_lora
    from aquin_nb.probes import load_prompts

    if args.model:
        model, checkpoint = args.model, args.checkpoint
    else:
        tmp = Path(tempfile.mkdtemp(prefix="aquin-bench-"))
        model = "tiny-gpt2"
        checkpoint = finetune_lora(model, run_dir=tmp / "run", steps=40, progress=False)
    torch.set_grad_enabled(False)
    base = aquin_nb.load_model(model)
    ckpt = aquin_nb.load_model(model, checkpoint)
    token_lists = tokenize_prompts(
        base.tokenizer, load_prompts(args.prompts), prepend_bos=True, max_length=1024
    )

    def floor(by_length: bool = True) -> None:
        for batch in token_batches(
            token_lists, batch_size=16, skip_first=True, by_length=by_length
        ):
            base(batch.tokens, return_type="logits")
            ckpt(batch.tokens, return_type="logits")

    diffed = (base, ckpt)
    if args.model and is_peft_adapter(Path(checkpoint)):
        # as model_diff loads an adapter from paths: one model, the adapter switched
        pair = load_pair(model, checkpoint, None, switch_adapter=True)
        diffed = (pair.base, pair.checkpoint)

    def ours() -> None:
        aquin_nb.model_diff(*diffed, args.prompts, progress=False)

    md = _median_times(
        {"model_diff": ours, "floor": floor, "in_order": lambda: floor(by_length=False)},
        args.repeats,
    )
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    print(
        f"model_diff {md['model_diff'] * 1000:.1f} ms, two plain forwards "
        f"{md['floor'] * 1000:.1f} ms: ratio {md['model_diff'] / md['floor']:.2f} (target <= 1.2); "
        f"against forwards batched in list order ({md['in_order'] * 1000:.1f} ms) "
        f"{md['model_diff'] / md['in_order']:.2f}"
    )
    if args.model:
        return

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
    for label, t in (("models loaded", loaded), ("end to end (as the demo)", end_to_end)):
        print(
            f"sae_diff {label}: fit=off {t['off'] * 1000:.1f} ms, fit=fast "
            f"{t['fast'] * 1000:.1f} ms: +{t['fast'] / t['off'] - 1:.0%} (target <= +25%)"
        )


if __name__ == "__main__":
    main()
