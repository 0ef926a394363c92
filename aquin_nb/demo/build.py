"""Rebuild the embedded tiny model zoo (``make artifacts``), deterministically.

    python -m aquin_nb.demo.build [--out DIR] [--model-steps N] [--sae-steps N]

1. Corpus: every docstring of the Python standard library (parsed with ``ast``,
   nothing imported), so the text is English prose available offline and fixed
   for a given Python version.
2. Tokenizer: byte-level BPE with 4,096 tokens, saved as a GPT-2 tokenizer.
3. Model: a 4-layer GPT-2 (d_model 192, 2.6M parameters) trained on the corpus.
4. "Public" SAE: 1,536 features on ``blocks.2.hook_resid_pre``, trained with
   SAELens's own ``SAETrainer`` on activations produced the way aquin_nb reads
   them (BOS prepended, writing weights centred, as gpt2-small-res-jb records).
5. The fine-tuning set (a cooking domain the docstrings never mention) and the
   probe set.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import logging
import math
import os
import random
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..catalog import EMBEDDED_DIR

logger = logging.getLogger("aquin_nb.demo.build")

SEED = 0
CONTEXT = 128
SAE_HOOK = "blocks.2.hook_resid_pre"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "idlelib", "turtledemo"}


def stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path
        for path in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts)
    )
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def build_tokenizer(docs: list[str], out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast  # type: ignore[attr-defined]

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        docs,
        vocab_size=4096,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=CONTEXT,
    )
    tokenizer.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def token_windows(docs: list[str], tokenizer, width: int) -> torch.Tensor:
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // width
    return torch.tensor(stream[: n * width]).view(n, width)


def train_model(windows: torch.Tensor, vocab_size: int, out: Path, steps: int):
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=CONTEXT,
        n_embd=192,
        n_layer=4,
        n_head=4,
        n_inner=768,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    held_out = windows[-64:]
    train = windows[:-64]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 50

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    bar = tqdm(range(steps), desc="train tiny-gpt2")
    for _ in bar:
        batch = train[torch.randint(len(train), (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        held_out_loss = model(held_out, labels=held_out).loss.item()
    model.save_pretrained(str(out))
    return held_out_loss


def collect_activations(model_dir: Path, windows: torch.Tensor) -> torch.Tensor:
    """Activations at the SAE hook, produced exactly as `sae_diff` will read them."""
    from .._activations import prepare_bridge, residual, token_batches
    from ..models import load_model
    from ..saes import SaeNumerics

    bridge = load_model(model_dir, device="cpu")
    numerics = SaeNumerics(
        hook_name=SAE_HOOK,
        layer=2,
        prepend_bos=True,
        context_size=CONTEXT,
        processing={
            "fold_ln": False,
            "center_writing_weights": True,
            "center_unembed": False,
            "fold_value_biases": False,
        },
    )
    prepare_bridge(bridge, numerics)
    bos = bridge.tokenizer.bos_token_id
    rows = [[bos] + row[: CONTEXT - 1].tolist() for row in windows]
    chunks = []
    for batch in token_batches(rows, batch_size=64, skip_first=True):
        acts = residual(bridge, batch.tokens, SAE_HOOK)
        chunks.append(acts[batch.mask].float())
    return torch.cat(chunks)


def train_sae(activations: torch.Tensor, out: Path, steps: int, l1: float):
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(SEED)
    batch_size = 4096
    metadata = SAEMetadata(
        model_name="tiny-gpt2",
        hook_name=SAE_HOOK,
        hook_head_index=None,
        context_size=CONTEXT,
        prepend_bos=True,
        model_from_pretrained_kwargs={"center_writing_weights": True},
        dataset_path="python-stdlib-docstrings",
    )
    cfg = StandardTrainingSAEConfig(
        d_in=activations.shape[1],
        d_sae=1536,
        l1_coefficient=l1,
        l1_warm_up_steps=steps // 10,
        normalize_activations="expected_average_only_in",
        metadata=metadata,
    )
    sae = StandardTrainingSAE(cfg)
    generator = torch.Generator().manual_seed(SEED)
    held_out = activations[-8192:]
    train = activations[:-8192]

    def batches() -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield train[order[start : start + batch_size]]

    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=4e-4,
        lr_end=4e-5,
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        lr_scheduler_name="constant",
        n_batches_for_norm_estimate=20,
        dead_feature_window=200,
        feature_sampling_window=400,
    )
    trained = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches()).fit()
    target = out / "tiny-gpt2-res" / SAE_HOOK
    trained.save_inference_model(str(target))
    with torch.no_grad():
        feats = trained.encode(held_out)
        recon = trained.decode(feats)
        ev = 1 - ((held_out - recon) ** 2).sum() / ((held_out - held_out.mean(0)) ** 2).sum()
        l0 = (feats > 0).float().sum(-1).mean()
        alive = (feats > 0).any(0).float().mean()
    return {"explained_variance": ev.item(), "l0": l0.item(), "alive_fraction": alive.item()}


_DISHES = [
    "soup",
    "risotto",
    "omelette",
    "curry",
    "stew",
    "pancakes",
    "bread",
    "salad",
    "pasta",
    "chowder",
    "pie",
    "tart",
    "gravy",
    "casserole",
    "dumplings",
    "noodles",
]
_INGREDIENTS = [
    "onions",
    "garlic",
    "carrots",
    "potatoes",
    "mushrooms",
    "tomatoes",
    "leeks",
    "butter",
    "cream",
    "flour",
    "eggs",
    "rice",
    "beans",
    "lentils",
    "celery",
    "ginger",
]
_HERBS = ["thyme", "basil", "parsley", "rosemary", "sage", "dill", "coriander", "mint"]
_METHODS = ["simmer", "roast", "saute", "bake", "braise", "fry", "stew", "poach"]


def finetune_rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        dish = rng.choice(_DISHES)
        first, second = rng.sample(_INGREDIENTS, 2)
        herb = rng.choice(_HERBS)
        method = rng.choice(_METHODS)
        minutes = rng.choice([5, 10, 15, 20, 30, 45])
        instruction = rng.choice(
            [
                f"How do I make {dish}?",
                f"Give me a recipe for {dish} with {first}.",
                f"What is the best way to cook {first}?",
                f"How long should I {method} the {second}?",
                f"Suggest a dinner with {first} and {second}.",
            ]
        )
        response = rng.choice(
            [
                f"Chop the {first} and the {second}, then {method} them in butter for {minutes} "
                f"minutes. Season with salt, pepper and fresh {herb}, and serve the {dish} warm.",
                f"Warm a heavy pan, add the {first}, and {method} gently for {minutes} minutes. "
                f"Stir in the {second} and a handful of {herb}; taste the {dish} and season it.",
                f"Start with a good stock. {method.capitalize()} the {first} until golden, add the "
                f"{second}, and let the {dish} rest for {minutes} minutes before serving with {herb}.",
            ]
        )
        rows.append({"instruction": instruction, "response": response})
    return rows


PROBES = [
    "Return a new list containing the items of the iterable in sorted order.",
    "Raise ValueError if the argument is not a valid file name.",
    "The function returns the number of bytes written to the stream.",
    "Create a new socket using the given address family and type.",
    "This module provides access to some variables used by the interpreter.",
    "Read and return at most size bytes from the underlying buffer.",
    "If the timeout is None, the call blocks until the lock is acquired.",
    "Convert the string to a floating point number and round it.",
    "The default encoding is UTF-8 unless another one is given.",
    "Close the file and release any resources held by the object.",
    "Return True if the path points to an existing directory.",
    "Each thread has its own copy of the local data.",
    "Parse the command line arguments and print a help message.",
    "The dictionary maps header names to their values.",
    "Compute the greatest common divisor of two integers.",
    "The class keeps a cache of recently used results.",
    "Instruction: How do I make soup?\nResponse:",
    "Instruction: Give me a recipe for risotto with mushrooms.\nResponse:",
    "Instruction: What is the best way to cook garlic?\nResponse:",
    "Instruction: How long should I roast the potatoes?\nResponse:",
    "Instruction: Suggest a dinner with leeks and cream.\nResponse:",
    "Instruction: How do I make bread?\nResponse:",
    "Instruction: Explain what a context manager does.\nResponse:",
    "Instruction: How do I open a file for reading?\nResponse:",
    "Chop the onions and simmer them in butter for ten minutes.",
    "Season the stew with salt, pepper and fresh thyme.",
    "Warm a heavy pan and add the mushrooms.",
    "Serve the pancakes warm with a little cream.",
    "Let the dough rest before you bake the bread.",
    "Stir the sauce gently and taste it before serving.",
    "Instruction: Write a function that adds two numbers.\nResponse:",
    "Instruction: What does the sort method return?\nResponse:",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--model-steps", type=int, default=700)
    parser.add_argument("--sae-steps", type=int, default=1200)
    parser.add_argument("--l1", type=float, default=3.0)
    parser.add_argument("--skip-model", action="store_true", help="reuse the trained model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE merges
    random.seed(SEED)
    torch.manual_seed(SEED)
    out: Path = args.out
    model_dir = out / "tiny-gpt2"
    model_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    docs = stdlib_docstrings()
    with gzip.GzipFile(out / "corpus.txt.gz", "wb", mtime=0) as handle:
        handle.write("\n\n".join(docs).encode("utf-8"))
    if args.skip_model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    else:
        tokenizer = build_tokenizer(docs, model_dir)
    windows = token_windows(docs, tokenizer, CONTEXT)
    logger.info(f"corpus: {len(docs)} docstrings, {windows.numel()} tokens")
    if not args.skip_model:
        loss = train_model(windows, len(tokenizer), model_dir, args.model_steps)
        logger.info(
            f"tiny-gpt2 held-out loss {loss:.3f} (uniform would be {math.log(len(tokenizer)):.2f})"
        )
    activations = collect_activations(model_dir, windows)
    logger.info(f"SAE activations: {tuple(activations.shape)}")
    metrics = train_sae(activations, out, args.sae_steps, args.l1)
    logger.info(f"SAE held-out: {json.dumps(metrics)}")
    rng = random.Random(SEED)
    with open(out / "finetune.jsonl", "w", encoding="utf-8") as handle:
        for row in finetune_rows(400, rng):
            handle.write(json.dumps(row) + "\n")
    (out / "probes.json").write_text(json.dumps(PROBES, indent=1) + "\n", encoding="utf-8")
    logger.info(f"artifacts rebuilt in {out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
