"""The verbs on CUDA against the CPU on the embedded model: placement and agreement.

    python benchmarks/gpu_smoke.py [--device cuda]

Runs sae_diff, model_diff, feature_dashboards and sae_align on the device and on
the CPU with the same planted checkpoint and prints whether the top features,
the fit verdict and the suggested layer agree, and each verb's time on each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import aquin_nb
    from aquin_nb.dashboards import reference_corpus
    from aquin_nb.models import load_hf_model

    model, _, _ = load_hf_model("tiny-gpt2")
    sae = aquin_nb.load_sae("tiny-gpt2")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    direction = sae.W_dec[101].detach() - sae.W_dec[101].detach().mean()
    state["transformer.h.1.mlp.c_proj.bias"] += 8.0 * direction / direction.norm()
    path = Path(tempfile.mkdtemp()) / "planted.pt"
    torch.save({"step": 1, "state_dict": state}, path)
    corpus = reference_corpus(50)
    print(f"{torch.cuda.get_device_name(args.device)}; torch {torch.__version__}")
    results = {}
    for device in ("cpu", args.device):
        timings = {}
        start = time.perf_counter()
        diff = aquin_nb.sae_diff("tiny-gpt2", path, device=device, progress=False)
        timings["sae_diff"] = time.perf_counter() - start
        start = time.perf_counter()
        md = aquin_nb.model_diff("tiny-gpt2", path, device=device, progress=False)
        timings["model_diff"] = time.perf_counter() - start
        start = time.perf_counter()
        boards = aquin_nb.feature_dashboards(
            "tiny-gpt2", corpus=corpus, device=device, k=4, cache=False, progress=False
        )
        timings["dashboards"] = time.perf_counter() - start
        results[device] = (diff, md, boards)
        print(device, {k: round(v, 2) for k, v in timings.items()})
    (cpu_diff, cpu_md, cpu_boards), (gpu_diff, gpu_md, gpu_boards) = results.values()
    print(
        "top-10 by |delta| equal:",
        cpu_diff.top(10)["feature"].tolist() == gpu_diff.top(10)["feature"].tolist(),
    )
    print(
        "top by shift:",
        int(cpu_diff.top(1, by="shift")["feature"][0]),
        int(gpu_diff.top(1, by="shift")["feature"][0]),
    )
    print("fit verdicts:", cpu_diff.summary["fit"]["verdict"], gpu_diff.summary["fit"]["verdict"])
    print(
        "max |delta| cpu/gpu:", cpu_diff.summary["max_abs_delta"], gpu_diff.summary["max_abs_delta"]
    )
    print("suggested layer:", cpu_md.summary["suggested_layer"], gpu_md.summary["suggested_layer"])
    print("max KL cpu/gpu:", cpu_md.summary["max_kl"], gpu_md.summary["max_kl"])
    print(
        "density max |diff|:",
        float((cpu_boards.features["density"] - gpu_boards.features["density"]).abs().max()),
    )


if __name__ == "__main__":
    main()
