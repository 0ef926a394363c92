"""Feature dashboards against one truncated forward pass, and their memory at 4x the corpus.

    python benchmarks/dashboards.py [--repeats 3] [--texts N]
    python benchmarks/dashboards.py --model DIR --sae DIR [--texts 50]

With ``--model`` and ``--sae`` (a local model and SAE, e.g. those
`benchmarks/real_size.py` built) only the time ratio is measured, on them.

* dashboards / forward: ``feature_dashboards`` of every feature of the embedded
  SAE over the reference corpus it uses by default (the whole shipped corpus and
  the probes, about 400k tokens; ``--texts N`` takes the first N documents, no
  cache) against one forward pass stopped at the SAE's hook over the same token
  windows. Target <= 1.5.
* peak RSS of a fresh process computing the dashboards over that corpus written
  out 4 times against once. Target <= 1.1.

Routes are interleaved so machine noise hits them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _peak_rss_mb(corpus: Path, cache: Path) -> float:
    code = (
        "import json, os, resource, sys, aquin_nb\n"
        f"os.environ['AQUIN_NB_CACHE'] = {str(cache)!r}\n"
        f"texts = json.load(open({str(corpus)!r}))\n"
        "aquin_nb.feature_dashboards('tiny-gpt2', corpus=texts, progress=False, cache=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=None, help="first N documents only")
    parser.add_argument("--model", help="a local model directory instead of tiny-gpt2")
    parser.add_argument("--sae", help="with --model: its SAE directory")
    args = parser.parse_args()
    if bool(args.model) != bool(args.sae):
        parser.error("--model and --sae go together")
    torch.set_grad_enabled(False)

    import aquin_nb
    from aquin_nb._activations import context_length, prepare_bridge, residual, token_batches
    from aquin_nb._corpus import pack_windows
    from aquin_nb.dashboards import reference_corpus
    from aquin_nb.saes import sae_numerics

    texts = reference_corpus(args.texts)
    base = aquin_nb.load_model(args.model or "tiny-gpt2")
    sae = aquin_nb.load_sae(args.sae or "tiny-gpt2")
    numerics = sae_numerics(sae)
    prepare_bridge(base, numerics)
    windows = pack_windows(
        base.tokenizer, texts, prepend_bos=True, max_length=context_length(base, numerics)
    )

    def forward() -> None:
        for batch in token_batches(windows, batch_size=16, skip_first=True):
            residual(base, batch.tokens, numerics.hook_name)

    def dashboards() -> None:
        aquin_nb.feature_dashboards(base, sae=sae, corpus=texts, progress=False, cache=False)

    fns = {"dashboards": dashboards, "forward": forward}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = sum(len(w) - 1 for w in windows)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    print(
        f"{tokens} tokens, {sae.cfg.d_sae} features: dashboards {median['dashboards']:.2f} s, "
        f"forward to the hook {median['forward']:.2f} s, ratio "
        f"{median['dashboards'] / median['forward']:.2f} (target <= 1.5)"
    )
    if args.model:
        return

    tmp = Path(tempfile.mkdtemp(prefix="aquin-bench-"))
    one, four = tmp / "one.json", tmp / "four.json"
    one.write_text(json.dumps(texts))
    four.write_text(json.dumps(4 * texts))
    rss_one, rss_four = _peak_rss_mb(one, tmp / "cache"), _peak_rss_mb(four, tmp / "cache")
    print(
        f"peak RSS 1x = {rss_one:.0f} MB, 4x = {rss_four:.0f} MB, ratio {rss_four / rss_one:.3f} "
        "(target <= 1.1)"
    )


if __name__ == "__main__":
    main()
