"""simulate against a real fine-tune on the embedded zoo: does the forecast name the same features?

    python benchmarks/simulate.py [--lr 0.002] [--steps 100] [--batch-size 8] [--rows 200]

The real fine-tune is plain SGD on every parameter of tiny-gpt2 with the same
learning rate, steps and batch size as the forecast, on the same cooking rows;
both checkpoints are diffed with sae_diff on the shipped probes. Printed per
estimator: the overlap of the top-20 features by |Δ| with the real diff, the
Spearman correlation of the deltas over the features changed in either, and
the wall-time ratio simulate / real (each including its diff).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def real_finetune(rows, lr: float, steps: int, batch_size: int, out: Path) -> Path:
    from aquin_nb import Run
    from aquin_nb._rows import batches_of, encode_rows
    from aquin_nb.models import load_hf_model

    torch.manual_seed(0)
    model, tokenizer, _ = load_hf_model("tiny-gpt2")
    encoded = encode_rows(tokenizer, rows, model.config.n_positions)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        input_ids, labels = next(
            batches_of([encoded[i] for i in picks], batch_size, tokenizer.eos_token_id)
        )
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return Run(out).checkpoint(model, step=steps)


def compare(real, forecast, k: int = 20) -> tuple[float, float]:
    from scipy.stats import spearmanr

    top_real = set(real.top(k)["feature"])
    top_forecast = set(forecast.top(k)["feature"])
    overlap = len(top_real & top_forecast) / k
    left = real.features.set_index("feature")
    right = forecast.features.set_index("feature")
    either = left.index[left["changed"] | right.loc[left.index, "changed"]]
    if len(either) < 3:
        return overlap, float("nan")
    rho = spearmanr(left.loc[either, "delta"], right.loc[either, "delta"]).statistic
    return overlap, float(rho)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "simulate")
    args = parser.parse_args()

    from aquin_nb import sae_diff
    from aquin_nb.demo.finetune import FINETUNE_DATA
    from aquin_nb.simulation import simulate

    rows = [json.loads(line) for line in FINETUNE_DATA.read_text().splitlines()][: args.rows]
    start = time.perf_counter()
    checkpoint = real_finetune(rows, args.lr, args.steps, args.batch_size, args.out / "real")
    real = sae_diff("tiny-gpt2", checkpoint, name="real-sgd", progress=False)
    real_seconds = time.perf_counter() - start
    print(
        f"real SGD fine-tune (lr {args.lr}, {args.steps} steps, batch {args.batch_size}, "
        f"{len(rows)} rows): nChanged={real.summary['n_changed']} "
        f"meanAbsDelta={real.summary['mean_abs_delta']:.5g}, {real_seconds:.1f}s"
    )
    for label, exact in (("ntk-diagonal (default)", False), ("exact-linear", True)):
        start = time.perf_counter()
        forecast = simulate(
            "tiny-gpt2",
            rows,
            lr=args.lr,
            steps=args.steps,
            batch_size=args.batch_size,
            exact_linear=exact,
            output=args.out / f"{'linear' if exact else 'ntk'}.pt",
            progress=False,
        )
        seconds = time.perf_counter() - start
        overlap, rho = compare(real, forecast.diff)
        print(
            f"{label:<24} nChanged={forecast.diff.summary['n_changed']:<5} "
            f"top-20 overlap {overlap:.2f}  spearman {rho:.3f}  "
            f"simulate/real time {seconds / real_seconds:.2f}"
        )


if __name__ == "__main__":
    main()
