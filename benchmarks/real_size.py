"""sae_diff at real model sizes: a gpt2-small-shaped GPT-2 and a 1B-Llama-shaped Llama.

    python benchmarks/real_size.py                                  # both shapes, 24,576 and 65,536 features
    python benchmarks/real_size.py --shape gpt2-small --sae-sizes 24576
    python benchmarks/real_size.py --shape llama-1b --prompts 8 --repeats 1 --prompts-scale 4
    python benchmarks/real_size.py --layers 4 --d-model 128 --sae-sizes 1024   # smoke run

Everything is built locally with random weights (no network) and cached under
``benchmarks/out/real_size/``: the model (``save_pretrained``, safetensors, the
embedded 4,096-token tokenizer), three checkpoints and random SAELens SAEs
(``--sae-arch standard`` or ``jumprelu``) on ``blocks.8.hook_resid_pre``, their
thresholds set so about ``--l0`` features fire per token. The checkpoints:

1. full: every tensor moved by ``--noise`` times its spread (a full fine-tune),
   one ``.safetensors`` file;
2. half: the embeddings and the first half of the blocks the SAE reads through
   (``layer // 2`` of the ``layer`` blocks before ``blocks.<layer>.hook_resid_pre``)
   exactly the base's, the rest moved as in (1);
3. adapter: a PEFT LoRA directory (rank 16) on the architecture's LoRA targets
   (`aquin_nb._architectures`), every ``lora_B`` random and nonzero.

What is measured, for each shape and SAE size (ratios; absolute times on a
shared machine mean little):

* ours/floor: ``sae_diff(fit="off")`` on the two models already loaded, against
  the floor: two plain Hugging Face forwards (default attention) stopped at the
  SAE's layer, batched as ``sae_diff`` batches, plus the SAE encode of both sides.
* naive/ours: the naive route, a full forward per prompt with
  ``output_hidden_states`` on each model, the hook's hidden state encoded and the
  per-feature means compared, against ours.
* RSS 10x/1x: peak RSS of a fresh process running ``sae_diff`` from paths at
  ``--prompts-scale`` times the prompts against 1x.
* adapter/one model: peak RSS of a fresh process diffing the adapter directory
  against a fresh process that does what one side of the diff does (imports the
  same stack, loads the model as a bridge with every weight resident, the SAE,
  runs the prompts through both); ``rss_one_plain_mb`` is a plain Hugging Face model running the floor
  forward, for reference (its weight files are mapped lazily, so blocks after
  the SAE's layer may never be paged in).
* half/full: the time of ``sae_diff`` from paths on checkpoint (2) against (1)
  (loading included); 1.0 means the unchanged blocks are recomputed, 0.75 is
  one prefix and two suffixes of the forwards alone.
* CLI/floor: ``aquin-nb sae diff --fit off -q`` end to end (its wall time) against
  the import of the stack it is built on (torch, transformers, TransformerLens,
  SAELens), plus one read of each weight file (base and checkpoint), plus the
  floor above. ``CLI/bare floor`` counts only ``aquin_nb``, torch and safetensors
  as the imports, what a script with no TransformerLens or SAELens would pay.

Peak RSS is the child's own ``VmHWM`` (a running maximum over all children
would hide the smaller runs). The SAE runs in float32 whatever ``--dtype``;
``--dtype`` loads the models in that dtype and is passed to ``sae_diff`` (and
the CLI) only where they take it. The 1B shape needs about 5 GB per model in
float32, and the timing loads two plain models and two bridges: it loads them
one pair at a time unless all four fit in the free memory.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diff import _synchronize  # benchmarks/diff.py

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab: int
    max_positions: int
    sae_context: int  # the SAE's context_size metadata, as its public namesake records

    @property
    def key(self) -> str:
        return f"{self.name}-l{self.n_layers}-d{self.d_model}-v{self.vocab}"


SHAPES = {
    "gpt2-small": Shape("gpt2-small", "gpt2", 12, 768, 12, 12, 3072, 50257, 1024, 128),
    # Llama 3.2 1B: tied embeddings, grouped-query attention, 128k context.
    "llama-1b": Shape("llama-1b", "llama", 16, 2048, 32, 8, 8192, 128256, 131072, 1024),
}
LORA_RANK = 16


def _shape(name: str, args: argparse.Namespace) -> Shape:
    shape = SHAPES[name]
    if args.layers:
        shape = replace(shape, n_layers=args.layers)
    if args.d_model:
        heads = max(1, args.d_model // 64)  # head width 64, as in both real models
        kv = heads if shape.n_kv_heads == shape.n_heads else max(1, heads // 4)
        shape = replace(
            shape, d_model=args.d_model, n_heads=heads, n_kv_heads=kv, d_mlp=4 * args.d_model
        )
    if args.vocab:
        shape = replace(shape, vocab=args.vocab)
    return shape


def _config(shape: Shape) -> Any:
    from transformers import GPT2Config, LlamaConfig

    ids = {"bos_token_id": 0, "eos_token_id": 0}  # the embedded tokenizer's
    if shape.model_type == "gpt2":
        return GPT2Config(
            n_layer=shape.n_layers,
            n_embd=shape.d_model,
            n_head=shape.n_heads,
            n_inner=shape.d_mlp,
            vocab_size=shape.vocab,
            n_positions=shape.max_positions,
            **ids,
        )
    return LlamaConfig(
        num_hidden_layers=shape.n_layers,
        hidden_size=shape.d_model,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.d_model // shape.n_heads,
        intermediate_size=shape.d_mlp,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        **ids,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- building


class _Stop(Exception):
    """Raised by a pre-hook to end a forward at the SAE's block."""


def _blocks(model: Any) -> Any:
    from aquin_nb._architectures import architecture_for

    return model.get_submodule(architecture_for(model.config.model_type).blocks)


def _resid_pre(model: Any, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """``blocks.<layer>.hook_resid_pre`` of a plain Hugging Face model: the input of
    block ``layer``, with nothing after it computed."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = _blocks(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(tokens)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"]


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _plain_model(
    model_dir: Path, checkpoint: Path | None, dtype: torch.dtype, device: str, attn: str
) -> Any:
    """The model as a plain Hugging Face script would load it, with a ``.safetensors``
    checkpoint's tensors assigned in place of the base's (no second copy)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    if checkpoint is not None:
        state = {key: value.to(dtype) for key, value in load_file(checkpoint).items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys
        model.tie_weights()
    return model.eval().to(device)


def _perturbed(base_files: list[Path], keep: Any, noise: float, seed: int) -> dict:
    """The base's tensors, each moved by ``noise`` times its spread unless ``keep(key)``."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path in base_files:
        state.update(load_file(path))
    for key in sorted(state):
        if keep(key):
            continue
        tensor = state[key]
        spread = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
        scale = noise * (spread or float(tensor.float().abs().mean()) or 1.0)
        tensor += scale * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    return state


def _save_atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename, so a half-written artefact is never reused."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    tmp.rename(path)


@dataclass(frozen=True)
class Artifacts:
    model: Path
    full: Path
    half: Path
    adapter: Path
    saes: dict[int, Path]


def _calibration(model: Any, layer: int, context: int) -> torch.Tensor:
    """Hook activations of the base on 16 probe prompts (BOS left out)."""
    from aquin_nb._activations import token_batches, tokenize_prompts
    from aquin_nb.probes import load_prompts

    tokenizer = _tokenizer()
    token_lists = tokenize_prompts(
        tokenizer, load_prompts(None)[:16], prepend_bos=True, max_length=context
    )
    rows = []
    with torch.no_grad():
        for batch in token_batches(token_lists, batch_size=16, skip_first=True):
            rows.append(_resid_pre(model, batch.tokens, layer)[batch.mask].float())
    return torch.cat(rows)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from aquin_nb.catalog import EMBEDDED_DIR

    return AutoTokenizer.from_pretrained(str(EMBEDDED_DIR / "tiny-gpt2"))


def _sae_cfg_and_state(
    activations: torch.Tensor,
    d_sae: int,
    args: argparse.Namespace,
    shape: Shape,
) -> tuple[dict, dict]:
    """A random dictionary with unit decoder rows, tied encoder, ``b_dec`` the mean
    activation, and per-feature thresholds so about ``args.l0`` features fire per token
    (pre-activations taken as Gaussian with the calibration set's spread)."""
    d_in = activations.shape[1]
    generator = torch.Generator().manual_seed(d_sae)
    decoder = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1)
    b_dec = activations.mean(0)
    spread = ((activations - b_dec) @ decoder.T).std(0)
    quantile = 1.0 - min(0.5, args.l0 / d_sae)
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile)))
    state = {"W_dec": decoder, "W_enc": decoder.T.contiguous(), "b_dec": b_dec}
    if args.sae_arch == "jumprelu":
        state.update(b_enc=torch.zeros(d_sae), threshold=z * spread)
    else:
        state.update(b_enc=-z * spread)
    processing = {"center_writing_weights": True} if args.center_writing_weights else {}
    cfg = {
        "architecture": args.sae_arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "model_name": shape.key,
            "hook_name": f"blocks.{args.layer_of[shape.name]}.hook_resid_pre",
            "prepend_bos": True,
            "context_size": shape.sae_context,
            "model_from_pretrained_kwargs": processing,
        },
    }
    return cfg, state


def build(shape: Shape, args: argparse.Namespace) -> Artifacts:
    """Build (or reuse) the model, the three checkpoints and the SAEs for ``shape``."""
    from safetensors.torch import save_file

    from aquin_nb._architectures import architecture_for
    from aquin_nb.saes import sae_from_cfg_and_state

    folder = args.out / "real_size" / shape.key
    folder.mkdir(parents=True, exist_ok=True)
    layer = args.layer_of[shape.name]
    processing = "cww" if args.center_writing_weights else "raw"
    art = Artifacts(
        model=folder / "base",
        full=folder / "full.safetensors",
        half=folder / f"half_L{layer}.safetensors",
        adapter=folder / "adapter",
        saes={
            d_sae: folder / f"sae_{args.sae_arch}_{processing}_L{layer}_{d_sae}_l0{args.l0}"
            for d_sae in args.sae_sizes
        },
    )
    arch = architecture_for(shape.model_type)
    model = None
    if not art.model.is_dir():
        from transformers import AutoModelForCausalLM

        _log(f"[{shape.key}] building the base model")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(shape))

        def write_model(tmp: Path) -> None:
            model.save_pretrained(str(tmp), max_shard_size="100GB")
            _tokenizer().save_pretrained(str(tmp))

        _save_atomic(art.model, write_model)
    base_files = _weight_files(art.model)
    block_index = re.compile(rf"^{re.escape(arch.blocks)}\.(\d+)\.")

    def unchanged_in_half(key: str) -> bool:
        match = block_index.match(key)
        if match is not None:
            return int(match.group(1)) < max(1, layer // 2)
        return any(name in key for name in ("wte", "wpe", "embed_tokens"))

    for path, keep, seed in ((art.full, lambda key: False, 1), (art.half, unchanged_in_half, 2)):
        if not path.is_file():
            _log(f"[{shape.key}] building checkpoint {path.name}")
            state = _perturbed(base_files, keep, args.noise, seed)
            _save_atomic(path, lambda tmp, state=state: save_file(state, str(tmp)))
            del state
    missing_saes = [d_sae for d_sae, path in art.saes.items() if not path.is_dir()]
    if art.adapter.is_dir() and not missing_saes:
        return art
    if model is None:
        model = _plain_model(art.model, None, torch.float32, "cpu", "eager")
    if not art.adapter.is_dir():
        from peft import LoraConfig, get_peft_model

        _log(f"[{shape.key}] building the LoRA adapter")
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=list(arch.lora_targets),
            fan_in_fan_out=arch.fan_in_fan_out,
            lora_dropout=0.0,
        )
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        _save_atomic(art.adapter, lambda tmp: peft_model.save_pretrained(str(tmp)))
        model = peft_model.unload()
    if missing_saes:
        activations = _calibration(model.eval(), layer, shape.sae_context)
        del model
        for d_sae in missing_saes:
            _log(f"[{shape.key}] building the {d_sae}-feature SAE")
            cfg, state = _sae_cfg_and_state(activations, d_sae, args, shape)
            sae = sae_from_cfg_and_state(cfg, state, source="real_size")
            _save_atomic(art.saes[d_sae], lambda tmp, sae=sae: sae.save_model(str(tmp)))
    return art


# ---------------------------------------------------------------- measuring


def _prompts(args: argparse.Namespace) -> list[str]:
    from aquin_nb.probes import load_prompts

    shipped = load_prompts(None)
    if args.prompts is None:
        return shipped
    return [shipped[i % len(shipped)] for i in range(args.prompts)]


def _dtype_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """``{"dtype": ...}`` for ``sae_diff`` if it takes it; None when it does not and a
    dtype other than float32 was asked for (the path runs are then skipped)."""
    from aquin_nb import sae_diff

    if "dtype" in inspect.signature(sae_diff).parameters:
        return {"dtype": args.dtype}
    return {} if args.dtype == "float32" else None


def _child(job: dict[str, Any]) -> float:
    """Run one job in a fresh process; its peak RSS in MB."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise Failed(f"{job['kind']} child: {_last_line(out.stderr)}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"])


def run_child(job: dict[str, Any]) -> None:
    """The body of a ``--child`` process: a ``diff`` from paths, or a ``floor`` forward
    on one model (``checkpoint`` None) or two."""
    from aquin_nb._dtypes import DTYPES

    torch.set_grad_enabled(False)
    if job["kind"] == "bridge":  # what one side of sae_diff holds: the stack, a bridge, the SAE
        from aquin_nb import load_model, load_sae
        from aquin_nb._activations import prepare_bridge, residual, token_batches
        from aquin_nb.saes import sae_numerics

        bridge = load_model(job["model"], device=job["device"], dtype=job["dtype"])
        for parameter in bridge.original_model.parameters():
            parameter.sum()  # the whole model resident (safetensors are mapped lazily)
        sae = load_sae(job["sae"]).to(job["device"])
        numerics = sae_numerics(sae)
        prepare_bridge(bridge, numerics)
        prompts = json.loads(Path(job["prompts"]).read_text())
        token_lists = _token_lists(prompts, sae)
        for batch in token_batches(token_lists, batch_size=16, skip_first=True, by_length=True):
            x = residual(bridge, batch.tokens, numerics.hook_name)
            sae.encode(x[batch.mask.to(x.device)].to(sae.W_dec.dtype))
    elif job["kind"] == "diff":
        from aquin_nb import sae_diff

        sae_diff(
            job["model"],
            job["checkpoint"],
            prompts=job["prompts"],
            layer=job["layer"],
            sae=job["sae"],
            fit="off",
            device=job["device"],
            progress=False,
            **job["kwargs"],
        )
    else:
        from aquin_nb import load_sae

        dtype = DTYPES[job["dtype"]]
        models = [_plain_model(Path(job["model"]), None, dtype, job["device"], job["attn"])]
        if job["checkpoint"]:
            models.append(
                _plain_model(
                    Path(job["model"]), Path(job["checkpoint"]), dtype, job["device"], job["attn"]
                )
            )
        sae = load_sae(job["sae"]).to(job["device"])
        prompts = json.loads(Path(job["prompts"]).read_text())
        _floor(models, sae, _token_lists(prompts, sae), job["layer"], job["device"])()
    print(json.dumps({"rss_mb": _peak_rss_mb()}))


def _token_lists(prompts: list[str], sae: Any) -> list[list[int]]:
    from aquin_nb._activations import tokenize_prompts

    context = sae.cfg.metadata.context_size
    return tokenize_prompts(_tokenizer(), prompts, prepend_bos=True, max_length=context)


def _floor(models: list[Any], sae: Any, token_lists: list, layer: int, device: str) -> Any:
    from aquin_nb._activations import token_batches

    def floor() -> None:
        # batched as sae_diff batches: in order of length
        batches = token_batches(token_lists, batch_size=16, skip_first=True, by_length=True)
        for batch in batches:
            tokens, mask = batch.tokens.to(device), batch.mask.to(device)
            for model in models:
                sae.encode(_resid_pre(model, tokens, layer)[mask].to(sae.W_dec.dtype))

    return floor


def _naive(models: list[Any], sae: Any, token_lists: list, layer: int, device: str) -> Any:
    def naive() -> None:
        means = []
        for model in models:
            total = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64, device=device)
            count = 0
            for ids in token_lists:
                out = model(torch.tensor([ids], device=device), output_hidden_states=True)
                features = sae.encode(out.hidden_states[layer][0, 1:].to(sae.W_dec.dtype))
                total += features.double().sum(0)
                count += len(features)
            means.append(total / count)
        (means[1] - means[0]).abs().sort(descending=True)

    return naive


class Failed(Exception):
    """A measurement that failed; its row gets a note and the rest goes on."""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _interleaved(
    fns: dict[str, Any], repeats: int, device: str, notes: list[str]
) -> dict[str, float]:
    """Median seconds per route: one warm-up each, then the routes in turn ``repeats``
    times so machine noise hits them alike. A route whose warm-up raises is left out,
    with a note."""
    fns = dict(fns)
    for name, fn in list(fns.items()):
        try:
            fn()
        except Exception as error:  # MemoryError included: note it, time the others
            note = f"{name} failed: {type(error).__name__}: {_last_line(str(error))}"
            notes.append(note)
            _log(f"  {note}")
            del fns[name]
            _free()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _free() -> None:
    gc.collect()  # the last run's models go before the next ones load
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(shape: Shape, art: Artifacts, d_sae: int, args: argparse.Namespace) -> dict[str, Any]:
    import aquin_nb
    from aquin_nb._dtypes import DTYPES

    layer, device, dtype = args.layer_of[shape.name], args.device, DTYPES[args.dtype]
    sae_dir = art.saes[d_sae]
    row: dict[str, Any] = {"shape": asdict(shape), "d_sae": d_sae, "layer": layer, "notes": []}
    prompts = _prompts(args)
    prompt_files = {}
    for scale in (1, args.prompts_scale):
        prompt_files[scale] = args.out / "real_size" / f"prompts_{len(prompts)}x{scale}.json"
        prompt_files[scale].write_text(json.dumps(prompts * scale))
    dtype_kwargs = _dtype_kwargs(args)
    if dtype_kwargs is None:
        row["notes"].append(f"sae_diff takes no dtype=: path runs skipped in {args.dtype}")
    tag = f"[{shape.key} d_sae={d_sae}]"

    # Memory first, while this process holds no model.
    common = {"model": str(art.model), "layer": layer, "sae": str(sae_dir), "device": device}
    if dtype_kwargs is not None:
        for name, checkpoint, scale in (
            ("rss_1x_mb", art.full, 1),
            ("rss_scaled_mb", art.full, args.prompts_scale),
            ("rss_adapter_mb", art.adapter, 1),
        ):
            _log(f"{tag} {name}")
            job = {"kind": "diff", "checkpoint": str(checkpoint), "kwargs": dtype_kwargs}
            job.update(common, prompts=str(prompt_files[scale]))
            _guarded(row, name, lambda job=job: _child(job))
    floor_job = {"kind": "floor", "prompts": str(prompt_files[1]), "attn": args.floor_attn}
    floor_job.update(common, dtype=args.dtype)
    for name, checkpoint in (("rss_one_plain_mb", None), ("rss_floor_two_mb", str(art.full))):
        _log(f"{tag} {name}")
        _guarded(
            row, name, lambda checkpoint=checkpoint: _child({**floor_job, "checkpoint": checkpoint})
        )
    _log(f"{tag} rss_one_model_mb")
    _guarded(row, "rss_one_model_mb", lambda: _child({**floor_job, "kind": "bridge"}))

    # Compute: the plain pair (floor, naive) and the bridges (ours), interleaved when all
    # four models fit in memory, else one pair at a time.
    sae = aquin_nb.load_sae(sae_dir).to(device)
    token_lists = _token_lists(prompts, sae)
    row["n_prompts"], row["n_tokens"] = len(prompts), sum(len(ids) - 1 for ids in token_lists)
    _log(f"{tag} timing floor, naive and ours ({row['n_tokens']} tokens)")
    model_bytes = sum(path.stat().st_size for path in _weight_files(art.model))
    model_bytes = model_bytes * dtype.itemsize // 4
    fits = 4.5 * model_bytes < _available_bytes()
    plain = [
        _plain_model(art.model, checkpoint, dtype, device, args.floor_attn)
        for checkpoint in (None, art.full)
    ]
    fns = {
        "floor": _floor(plain, sae, token_lists, layer, device),
        "naive": _naive(plain, sae, token_lists, layer, device),
    }
    bridges: list[Any] = []

    def ours() -> None:
        aquin_nb.sae_diff(
            *bridges, prompts=prompts, layer=layer, sae=sae, fit="off", progress=False
        )

    def load_bridges() -> None:
        bridges.extend(
            aquin_nb.load_model(art.model, checkpoint, device=device, dtype=dtype)
            for checkpoint in (None, art.full)
        )

    if fits:
        load_bridges()
        row["check_max_abs"] = _check(plain, bridges, sae, token_lists, layer, device)
        times = _interleaved({**fns, "ours": ours}, args.repeats, device, row["notes"])
    else:
        row["notes"].append("the plain models and the bridges were timed one pair at a time")
        times = _interleaved(fns, args.repeats, device, row["notes"])
        del plain, fns
        _free()
        load_bridges()
        times.update(_interleaved({"ours": ours}, args.repeats, device, row["notes"]))
    row.update({f"{name}_s": value for name, value in times.items()})
    plain, fns = [], {}
    bridges.clear()
    _free()

    # Checkpoint (2) against (1), from paths.
    if dtype_kwargs is not None:
        _log(f"{tag} timing the half checkpoint against the full one")
        results: dict[str, Any] = {}

        def from_path(name: str, checkpoint: Path) -> Any:
            def run() -> None:
                diff = aquin_nb.sae_diff(
                    art.model,
                    checkpoint,
                    prompts=prompts,
                    layer=layer,
                    sae=sae_dir,
                    fit="off",
                    device=device,
                    progress=False,
                    **dtype_kwargs,
                )
                results[name] = (diff.summary["n_changed"], diff.summary["max_abs_delta"])
                del diff
                _free()

            return run

        times = _interleaved(
            {"full": from_path("full", art.full), "half": from_path("half", art.half)},
            args.repeats,
            device,
            row["notes"],
        )
        row.update({f"path_{name}_s": value for name, value in times.items()})
        for name, (n_changed, max_abs_delta) in results.items():
            row[f"n_changed_{name}"], row[f"max_abs_delta_{name}"] = n_changed, max_abs_delta

    # The CLI end to end against import + one read of each weight file + the floor.
    cli_flags = _cli_help()
    if dtype_kwargs is None or (args.dtype != "float32" and "--dtype" not in cli_flags):
        row["notes"].append(f"the CLI takes no --dtype: its run skipped in {args.dtype}")
    else:
        _log(f"{tag} timing the CLI")
        command = [sys.executable, "-m", "aquin_nb", "sae", "diff", "--model", str(art.model)]
        command += ["--checkpoint", str(art.full), "--sae", str(sae_dir), "--layer", str(layer)]
        command += ["--prompts", str(prompt_files[1]), "--fit", "off", "-q", "--device", device]
        if "--dtype" in cli_flags:
            command += ["--dtype", args.dtype]
        _guarded(
            row, "cli_s", lambda: statistics.median(_wall(command) for _ in range(args.repeats))
        )
        row["import_s"] = statistics.median(
            _wall([sys.executable, "-c", FLOOR_IMPORTS]) for _ in range(args.repeats)
        )
        row["import_stack_s"] = statistics.median(
            _wall([sys.executable, "-c", STACK_IMPORTS]) for _ in range(args.repeats)
        )
        row["read_weights_s"] = _read_weights([*_weight_files(art.model), art.full])
        if "floor_s" in row:
            reads = row["read_weights_s"] + row["floor_s"]
            row["e2e_floor_s"] = row["import_stack_s"] + reads
            row["e2e_bare_floor_s"] = row["import_s"] + reads
    return row


# The end-to-end floor's imports: aquin_nb (which imports nothing heavy) and what any
# script that reads the weights and runs them needs. The rest of what the CLI imports
# (transformers, TransformerLens, SAELens) is timed beside it, outside the floor.
FLOOR_IMPORTS = "import aquin_nb, torch, safetensors.torch"
STACK_IMPORTS = "import torch, transformers, transformer_lens, sae_lens"


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _check(plain: list, bridges: list, sae: Any, token_lists: list, layer: int, device: str):
    """Largest |difference| between the floor's and the bridge's hook activations on
    the first batch (0 up to attention-kernel rounding when no weights are processed)."""
    from aquin_nb._activations import residual, token_batches

    batch = next(token_batches(token_lists[:4], batch_size=4, skip_first=True))
    tokens, mask = batch.tokens.to(device), batch.mask.to(device)
    hook = sae.cfg.metadata.hook_name
    worst = 0.0
    for model, bridge in zip(plain, bridges, strict=True):
        ours = residual(bridge, tokens, hook)[mask].float()
        worst = max(
            worst, float((ours - _resid_pre(model, tokens, layer)[mask].float()).abs().max())
        )
    return worst


def _cli_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "aquin_nb", "sae", "diff", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return out.stdout


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise Failed(f"{' '.join(command[1:4])}: {_last_line(out.stderr)}")
    return elapsed


def _guarded(row: dict[str, Any], name: str, measure: Any) -> None:
    """``row[name] = measure()``, or a note saying why it failed."""
    try:
        row[name] = measure()
    except Failed as error:
        row["notes"].append(f"{name} failed: {error}")
        _log(f"  {name} failed: {error}")


def _read_weights(files: list[Path]) -> float:
    from safetensors.torch import load_file

    start = time.perf_counter()
    for path in files:
        # load_file maps the file; the sums read every byte once.
        for tensor in load_file(path).values():
            tensor.sum()
    return time.perf_counter() - start


# ---------------------------------------------------------------- reporting


def _ratio(row: dict[str, Any], top: str, bottom: str) -> float | None:
    if row.get(top) is None or not row.get(bottom):
        return None
    return row[top] / row[bottom]


RATIOS = {
    "ours/floor": ("ours_s", "floor_s"),
    "naive/ours": ("naive_s", "ours_s"),
    "RSS 10x/1x": ("rss_scaled_mb", "rss_1x_mb"),
    "adapter/one model": ("rss_adapter_mb", "rss_one_model_mb"),
    "half/full": ("path_half_s", "path_full_s"),
    "CLI/floor": ("cli_s", "e2e_floor_s"),
    "CLI/bare floor": ("cli_s", "e2e_bare_floor_s"),
}


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    names = [name.replace("10x", f"{args.prompts_scale}x") for name in RATIOS]
    header = ["shape", "d_sae", "tokens", *names]
    print(f"dtype {args.dtype}, device {args.device}, torch threads {torch.get_num_threads()}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        shape = row["shape"]
        cells = [f"{shape['name']} ({shape['n_layers']}x{shape['d_model']})", str(row["d_sae"])]
        cells.append(str(row["n_tokens"]))
        for top, bottom in RATIOS.values():
            value = _ratio(row, top, bottom)
            cells.append("-" if value is None else f"{value:.2f}")
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        figures = {k: round(v, 3) for k, v in row.items() if k.endswith(("_s", "_mb"))}
        print(f"{row['shape']['name']} d_sae={row['d_sae']}: {figures}")
        for note in row["notes"]:
            print(f"  note: {note}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--sae-sizes", nargs="+", type=int, default=[24576, 65536])
    parser.add_argument("--sae-arch", choices=["standard", "jumprelu"], default="standard")
    parser.add_argument("--l0", type=int, default=64, help="features firing per token (about)")
    parser.add_argument(
        "--center-writing-weights",
        action="store_true",
        help="record center_writing_weights in the SAE's metadata (as gpt2-small-res-jb does)",
    )
    parser.add_argument("--layer", type=int, help="SAE layer (default 8, or n_layers - 1)")
    parser.add_argument("--layers", type=int, help="override the shape's block count")
    parser.add_argument("--d-model", type=int, help="override the width (heads of width 64)")
    parser.add_argument("--vocab", type=int, help="override the vocabulary size")
    parser.add_argument("--prompts", type=int, help="N prompts (the probe set cycled)")
    parser.add_argument("--prompts-scale", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.01, help="checkpoint noise / spread")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--floor-attn", default="sdpa", help="the floor's attn_implementation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # Random dictionaries explain little variance by construction: the fit warning is noise.
    logging.getLogger("aquin_nb").setLevel(logging.ERROR)
    # The children (and the CLI) import this checkout, whichever aquin_nb is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    shapes = [_shape(name, args) for name in args.shape]
    args.layer_of = {s.name: args.layer or min(8, s.n_layers - 1) for s in shapes}
    rows = []
    for shape in shapes:
        art = build(shape, args)
        for d_sae in args.sae_sizes:
            rows.append(measure(shape, art, d_sae, args))
            (args.out / "real_size.json").write_text(json.dumps(rows, indent=2))
    report(rows, args)


if __name__ == "__main__":
    main()
