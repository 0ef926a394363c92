"""simulate at real size: peak memory against the weights it must hold, and time per batch.

    python benchmarks/simulate_memory.py [--small] [--rows 64] [--batch-size 8]
        [--layers 30 --d-model 576 --heads 9 --kv-heads 3 --intermediate 1536 --vocab 49152]
        [--sae-layer 15] [--d-sae 4608] [--join 1] [--dtype bfloat16]

A random-initialised Llama-architecture model shaped like SmolLM-135M (the
default flags, tied embeddings; ``--small`` is a seconds-long smoke shape) is
saved with the embedded tokenizer to a temporary directory, beside a random
SAELens SAE on ``blocks.<sae-layer>.hook_resid_pre``. ``simulate`` (the default
NTK-diagonal forecast, then its ``sae_diff``) runs on the first ``--rows``
shipped cooking rows (``--join K`` makes each response K shipped responses
long) in a fresh child process, whose resident set size a thread samples every
5 ms; the kernel's ``ru_maxrss`` is read beside it.

One JSON line: ``peak_rss_bytes`` and its ``ratio`` to ``model_bytes +
moved_bytes`` (the weights in the run's dtype and the parameters simulate
moves, by the default filter: attention and MLP matrices of the blocks before
the SAE's layer; the target is <= 3). ``import_rss_bytes`` is the child's RSS
once torch, transformers, TransformerLens and SAELens are imported (part of the
peak; ``ratio_above_imports`` leaves it out). ``forecast_peak_rss`` and
``diff_peak_rss`` split the peak at the checkpoint being written.
``seconds_per_batch``: from the call to the checkpoint being written (model
load and save included) over the number of batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {
    "layers": 4,
    "d_model": 64,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "vocab": 4096,
    "rows": 16,
}


def build_model(directory: Path, args: argparse.Namespace) -> dict[str, int | str]:
    """Save the random Llama and the embedded tokenizer; the byte counts the ratio divides by."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aquin_nb._dtypes import parse_dtype
    from aquin_nb.simulation import default_param_filter, select_params
    from tests.tiny_models import TOKENIZER_DIR

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # as SmolLM-135M
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(directory))
    element = torch.empty((), dtype=parse_dtype(args.dtype or "float32")).element_size()
    pattern = default_param_filter(model, args.sae_layer)
    moved = select_params(model, pattern)
    # named_parameters() lists a tied embedding once
    n_weights = sum(p.numel() for p in model.parameters())
    return {
        "model_bytes": n_weights * element,
        "moved_bytes": sum(p.numel() for p in moved.values()) * element,
        "n_weights": n_weights,
        "n_moved": sum(p.numel() for p in moved.values()),
        "params": pattern,
    }


def build_sae(directory: Path, d_model: int, d_sae: int, layer: int) -> None:
    import torch

    from aquin_nb.saes import sae_from_cfg_and_state

    generator = torch.Generator().manual_seed(1)
    decoder = torch.nn.functional.normalize(torch.randn(d_sae, d_model, generator=generator), dim=1)
    cfg = {
        "architecture": "standard",
        "d_in": d_model,
        "d_sae": d_sae,
        "metadata": {
            "hook_name": f"blocks.{layer}.hook_resid_pre",
            "prepend_bos": True,
            "context_size": 128,
        },
    }
    state = {
        "W_dec": decoder.clone(),
        "W_enc": decoder.T.clone(),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_model),
    }
    sae_from_cfg_and_state(cfg, state, source="benchmark").save_model(str(directory))


def training_rows(n_rows: int, join: int) -> list[dict[str, str]]:
    from aquin_nb.demo.finetune import FINETUNE_DATA

    shipped = [json.loads(line) for line in FINETUNE_DATA.read_text().splitlines()]
    rows = []
    for index in range(n_rows):
        picks = [shipped[(index * join + k) % len(shipped)] for k in range(join)]
        rows.append(
            {
                "instruction": picks[0]["instruction"],
                "response": " ".join(row["response"] for row in picks),
            }
        )
    return rows


def measure(spec: dict) -> dict:
    """In the child: simulate once, sampling this process's RSS; phases split by its log."""
    import logging
    import resource
    import threading

    import psutil

    # Libraries first, so the baseline counts what any verb imports.
    import sae_lens  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from aquin_nb.simulation import simulate

    process = psutil.Process()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), process.memory_info().rss))
            done.wait(0.005)

    marks: dict[str, float] = {}

    class Mark(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("synthetic checkpoint"):
                marks["checkpoint"] = time.perf_counter()

    logger = logging.getLogger("aquin_nb.simulation")
    logger.addHandler(Mark())
    logger.setLevel(logging.INFO)
    import_rss = process.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    extra = {"dtype": spec["dtype"]} if spec["dtype"] else {}
    started = time.perf_counter()
    sim = simulate(
        spec["model_dir"],
        spec["rows"],
        sae=spec["sae_dir"],
        batch_size=spec["batch_size"],
        output=spec["output"],
        progress=False,
        **extra,
    )
    finished = time.perf_counter()
    done.set()
    thread.join()
    checkpoint_at = marks.get("checkpoint", finished)
    forecast = [rss for when, rss in samples if when <= checkpoint_at]
    diff = [rss for when, rss in samples if when > checkpoint_at]
    return {
        "peak_rss_sampled": max(rss for _, rss in samples),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "import_rss_bytes": import_rss,
        "forecast_peak_rss": max(forecast, default=0),
        "diff_peak_rss": max(diff, default=0),
        "forecast_seconds": checkpoint_at - started,
        "total_seconds": finished - started,
        "n_examples": sim.summary["n_examples"],
        "n_changed": int(sim.diff.summary["n_changed"]),
        "delta_norm": sim.summary["delta_norm"],
    }


def run(tmp: Path, args: argparse.Namespace) -> dict:
    sizes = build_model(tmp / "model", args)
    build_sae(tmp / "sae", args.d_model, args.d_sae, args.sae_layer)
    spec = {
        "model_dir": str(tmp / "model"),
        "sae_dir": str(tmp / "sae"),
        "rows": training_rows(args.rows, args.join),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "output": str(tmp / "sim.pt"),
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(tmp / "spec.json")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        sys.exit(f"the child failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    held = int(sizes["model_bytes"]) + int(sizes["moved_bytes"])
    peak = max(result["peak_rss_sampled"], result["ru_maxrss_bytes"])
    n_batches = -(-args.rows // args.batch_size)
    shape = {k: getattr(args, k) for k in ("layers", "d_model", "heads", "kv_heads")}
    shape.update(intermediate=args.intermediate, vocab=args.vocab, sae_layer=args.sae_layer)
    return {
        "shape": shape,
        "rows": args.rows,
        "join": args.join,
        "batch_size": args.batch_size,
        "dtype": args.dtype or "float32",
        **sizes,
        **result,
        "peak_rss_bytes": peak,
        "ratio": round(peak / held, 2),
        "ratio_above_imports": round((peak - result["import_rss_bytes"]) / held, 2),
        "seconds_per_batch": round(result["forecast_seconds"] / n_batches, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke shape")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--sae-layer", type=int, default=None, help="default: layers // 2")
    parser.add_argument("--d-sae", type=int, default=None, help="default: 8 x d_model")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--join", type=int, default=1, help="shipped responses per row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="passed to simulate when given")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(Path(args.child).read_text()))))
        return
    if args.small:
        for key, value in SMALL.items():
            setattr(args, key, value)
    args.sae_layer = args.layers // 2 if args.sae_layer is None else args.sae_layer
    args.d_sae = args.d_sae or 8 * args.d_model

    with tempfile.TemporaryDirectory(prefix="aquin-simmem-") as directory:
        report = run(Path(directory), args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
