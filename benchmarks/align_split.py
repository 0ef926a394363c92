"""The assignment solver package against the single module it was split from, side by side.

    python benchmarks/align_split.py [--sizes 4096,16384] [--dims 512,2304] [--repeats 3]

The old ``aquin_nb/_assignment.py`` is read from git (the commit before the split)
into a temporary module; both solve the same problems in one process, interleaved,
so machine noise hits them alike. Printed per case: median seconds of each, the
ratio new/old, and that the matchings are identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE_SPLIT = "9e896d8"


def _old_module():
    source = subprocess.run(
        ["git", "show", f"{BEFORE_SPLIT}:aquin_nb/_assignment.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_assignment.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_assignment", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_assignment"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _problem(n: int, d: int, kind: str):
    generator = torch.Generator().manual_seed(0)

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)

    a = unit(torch.randn(n, d, generator=generator))
    if kind == "structured":
        perm = torch.randperm(n, generator=generator)
        b = unit(a[perm] + 0.5 * torch.randn(n, d, generator=generator) / d**0.5)
        unrelated = torch.rand(n, generator=generator) < 0.2
        b[unrelated] = unit(torch.randn(int(unrelated.sum()), d, generator=generator))
    else:
        b = unit(torch.randn(n, d, generator=generator))
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--dims", default="512,2304")
    parser.add_argument("--kinds", default="structured,random")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from aquin_nb._assignment import sparse_assignment

    old = _old_module()
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            for kind in args.kinds.split(","):
                a, b = _problem(n, d, kind)
                times: dict[str, list[float]] = {"new": [], "old": []}
                results = {}
                for _ in range(args.repeats):
                    for name, solve in (("new", sparse_assignment), ("old", old.sparse_assignment)):
                        start = time.perf_counter()
                        results[name] = solve(a, b, progress=False)
                        times[name].append(time.perf_counter() - start)
                new, was = statistics.median(times["new"]), statistics.median(times["old"])
                same = (results["new"].cols == results["old"].cols).all() and bool(
                    results["new"].optimal == results["old"].optimal
                )
                print(
                    f"n={n:>6} d={d:>4} {kind:<10} new {new:6.2f} s  old {was:6.2f} s  "
                    f"new/old {new / was:.2f}  identical {same}"
                )


if __name__ == "__main__":
    main()
