"""sae_align's matcher against SciPy dense, on synthetic dictionaries, one process per case.

    python benchmarks/align.py [--sizes 4096,16384,65536,131072] [--dims 512,2304]
                               [--kinds structured,random] [--max-n-wide 16384]
                               [--device cuda] [--dtype bfloat16]

* structured: B is a noisy permutation of A (noise 0.5/sqrt(d) per coordinate),
  with 20% of B's rows replaced by unrelated random directions;
* random: A and B unrelated;
* rectangular (not run by default): B has 2n rows, a noisy permutation of A's
  (20% of them unrelated) among n unrelated ones.

Each case runs in a fresh process so its peak RSS is its own. SciPy dense
(``linear_sum_assignment`` on the float64 cosine matrix) runs beside ours
wherever the matrix fits (n <= 16,384 here: 2 GB). Printed: wall time, peak RSS,
total cosine, whether ours is proven optimal, and ours/SciPy.

``--device`` and ``--dtype`` make both dictionaries there, in that dtype, before
they are matched, as an SAE on a GPU hands them over. The matching itself runs
on the CPU in float32 whatever they are (see `aquin_nb.align.match`): on a GPU
machine this measures the hand-over plus the same CPU solver.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASE = r"""
import json, resource, sys, time
import numpy as np, torch
from aquin_nb.align import match
n, d, kind, solver = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
device, dtype = sys.argv[5], getattr(torch, sys.argv[6])
generator = torch.Generator().manual_seed(0)
unit = lambda x: torch.nn.functional.normalize(x, dim=1)
a = unit(torch.randn(n, d, generator=generator))
if kind == "structured":
    perm = torch.randperm(n, generator=generator)
    b = unit(a[perm] + 0.5 * torch.randn(n, d, generator=generator) / d ** 0.5)
    unrelated = torch.rand(n, generator=generator) < 0.2
    b[unrelated] = unit(torch.randn(int(unrelated.sum()), d, generator=generator))
elif kind == "rectangular":
    b = unit(torch.randn(2 * n, d, generator=generator))
    perm = torch.randperm(2 * n, generator=generator)[:n]
    partner = unit(a + 0.5 * torch.randn(n, d, generator=generator) / d ** 0.5)
    related = torch.rand(n, generator=generator) >= 0.2
    b[perm[related]] = partner[related]
else:
    b = unit(torch.randn(n, d, generator=generator))
a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
if device.startswith("cuda"):
    torch.cuda.synchronize()
start = time.perf_counter()
result = match(a, b, solver, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    "total": float(result.cosine.sum()),
    "optimal": bool(result.optimal),
    "gap": result.gap,
    "rounds": result.rounds,
}))
"""

DENSE_MAX_N = 16384


def run_case(
    n: int, d: int, kind: str, solver: str, device: str = "cpu", dtype: str = "float32"
) -> dict:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(n), str(d), kind, solver, device, dtype],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1], "wall": time.perf_counter() - started}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536,131072")
    parser.add_argument("--dims", default="512,2304")
    parser.add_argument("--kinds", default="structured,random")
    parser.add_argument(
        "--max-n-wide", type=int, default=16384, help="largest n run at d > 512 (time)"
    )
    parser.add_argument("--device", default="cpu", help="where the dictionaries are made")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    kinds = args.kinds.split(",")
    header = (
        f"{'kind':<11}{'d':>6}{'n':>8}  {'ours s':>8} {'ours GB':>8} {'optimal':>8}"
        f" {'scipy s':>8} {'scipy GB':>9} {'speedup':>8} {'rel diff':>9}"
    )
    print(f"dictionaries on {args.device} in {args.dtype}; matched on the CPU in float32")
    print(header, flush=True)
    for d in dims:
        for n in sizes:
            if d > 512 and n > args.max_n_wide:
                continue
            for kind in kinds:
                where = (args.device, args.dtype)
                ours = run_case(n, d, kind, "sparse" if n > 4096 else "auto", *where)
                dense = run_case(n, d, kind, "dense", *where) if n <= DENSE_MAX_N else None
                if "error" in ours:
                    print(f"{kind:<11}{d:>6}{n:>8}  ours failed: {ours['error']}", flush=True)
                    continue
                proof = "yes" if ours["optimal"] else f"gap {ours['gap']:.2g}"
                line = (
                    f"{kind:<11}{d:>6}{n:>8}  {ours['seconds']:8.1f} {ours['rss_gb']:8.2f}"
                    f" {proof:>8}"
                )
                if dense and "error" not in dense:
                    rel = abs(ours["total"] - dense["total"]) / abs(dense["total"])
                    line += (
                        f" {dense['seconds']:8.1f} {dense['rss_gb']:9.2f}"
                        f" {dense['seconds'] / ours['seconds']:7.1f}x {rel:9.1e}"
                    )
                else:
                    line += f" {'-':>8} {'-':>9} {'-':>8} {'-':>9}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
