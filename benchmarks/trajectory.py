"""sae_trajectory against separate sae_diff calls, its memory, and the Ray backend's overhead.

    python benchmarks/trajectory.py [--checkpoints 8] [--repeats 3] [--fit fast] [--no-ray]
    python benchmarks/trajectory.py --quick      # a smoke run: 3 checkpoints, 1 repeat

* trajectory vs separate: ``sae_trajectory`` over N loaded checkpoints against N
  ``sae_diff`` calls on the same loaded models, interleaved, median of
  ``--repeats`` (target <= 0.65 at N = 8: the floor is N + 1 truncated forwards
  instead of 2N). The same from paths (each checkpoint loaded from disk) is shown
  beside it.
* memory: the peak RSS of a fresh process running ``sae_trajectory`` over N and
  over 2 checkpoints from disk (target <= 1.1: one checkpoint is held at a time).
* Ray: the trajectory from paths with ``backend="ray"`` on a local runtime of
  ``--ray-cpus`` CPUs against the local backend, warm (a first Ray call starts the
  workers, reported separately), so the ratio is Ray's own overhead.

Absolute times on a shared machine mean little; the ratios are the result.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, steps: list[int]) -> Path:
    """A Run directory whose checkpoint at step s moves block 1's MLP bias by s/len * noise."""
    from aquin_nb.models import load_hf_model

    model, _, _ = load_hf_model("tiny-gpt2")
    generator = torch.Generator().manual_seed(0)
    push = torch.randn(model.config.n_embd, generator=generator)
    folder = tmp / f"run_{len(steps)}" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["transformer.h.1.mlp.c_proj.bias"] += 0.5 * step / steps[-1] * push
        torch.save({"step": step, "state_dict": state}, folder / f"step_{step}.pt")
    return folder.parent


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb(run: Path, fit: str) -> float:
    code = (
        "import resource, aquin_nb\n"
        f"aquin_nb.sae_trajectory('tiny-gpt2', {str(run)!r}, fit={fit!r}, progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit", choices=["fast", "full", "off"], default="fast")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray comparison")
    parser.add_argument("--quick", action="store_true", help="3 checkpoints, 1 repeat (smoke)")
    parser.add_argument("--tmp", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    if args.quick:
        args.checkpoints, args.repeats = 3, 1
    args.tmp.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    import logging

    logging.getLogger("aquin_nb").setLevel(logging.ERROR)  # fit warnings per step: not news here

    from aquin_nb import load_model, sae_diff, sae_trajectory

    steps = [100 * (index + 1) for index in range(args.checkpoints)]
    run = _run(args.tmp, steps)
    pair = _run(args.tmp, steps[:2])
    paths = {step: run / "checkpoints" / f"step_{step}.pt" for step in steps}
    base = load_model("tiny-gpt2")
    loaded = {step: load_model("tiny-gpt2", path) for step, path in paths.items()}
    fit = args.fit

    routes = {
        "trajectory (loaded)": lambda: sae_trajectory(base, loaded, fit=fit, progress=False),
        "separate (loaded)": lambda: [
            sae_diff(base, bridge, fit=fit, progress=False) for bridge in loaded.values()
        ],
        "trajectory (paths)": lambda: sae_trajectory("tiny-gpt2", run, fit=fit, progress=False),
        "separate (paths)": lambda: [
            sae_diff("tiny-gpt2", path, fit=fit, progress=False) for path in paths.values()
        ],
    }
    for fn in routes.values():  # warm-up: imports, kernels, the file cache
        fn()
    results: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(args.repeats):  # interleaved, so machine noise hits the routes alike
        for name, fn in routes.items():
            results[name].append(_median(fn, 1))
    timing = {name: statistics.median(values) for name, values in results.items()}

    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians), fit={fit}")
    print(f"{args.checkpoints} checkpoints of tiny-gpt2, 32 probe prompts:")
    for name, seconds in timing.items():
        print(f"  {name:<22} {seconds * 1000:8.1f} ms")
    loaded_ratio = timing["trajectory (loaded)"] / timing["separate (loaded)"]
    paths_ratio = timing["trajectory (paths)"] / timing["separate (paths)"]
    print(f"  trajectory/separate, loaded = {loaded_ratio:.2f}  (target <= 0.65 at 8)")
    print(f"  trajectory/separate, from paths = {paths_ratio:.2f}")

    rss_many, rss_two = _peak_rss_mb(run, fit), _peak_rss_mb(pair, fit)
    print(
        f"peak RSS {args.checkpoints} checkpoints = {rss_many:.0f} MB, 2 = {rss_two:.0f} MB, "
        f"ratio {rss_many / rss_two:.3f}  (target <= 1.1)"
    )

    if args.no_ray:
        return
    try:
        import ray
    except ImportError:
        print("ray: not installed (pip install 'aquin-nb[ray]'); skipped")
        return
    start = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    try:
        start = time.perf_counter()
        sae_trajectory("tiny-gpt2", run, fit=fit, backend="ray", progress=False)
        first = time.perf_counter() - start
        ray_routes = {
            "local": lambda: sae_trajectory("tiny-gpt2", run, fit=fit, progress=False),
            "ray": lambda: sae_trajectory("tiny-gpt2", run, fit=fit, backend="ray", progress=False),
        }
        ray_results: dict[str, list[float]] = {name: [] for name in ray_routes}
        for _ in range(args.repeats):
            for name, fn in ray_routes.items():
                ray_results[name].append(_median(fn, 1))
        local_s, ray_s = (statistics.median(ray_results[name]) for name in ("local", "ray"))
    finally:
        ray.shutdown()
    print(
        f"ray local runtime ({args.ray_cpus} CPUs): ray.init {started:.1f} s, first call "
        f"{first:.1f} s (starts the workers)"
    )
    print(
        f"  warm: local {local_s * 1000:.0f} ms, ray {ray_s * 1000:.0f} ms, "
        f"overhead ray/local = {ray_s / local_s:.2f}"
    )


if __name__ == "__main__":
    main()
