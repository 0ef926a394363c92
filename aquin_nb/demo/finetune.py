"""The end-to-end fixture: a real LoRA fine-tune with PEFT, merged and checkpointed.

This is also a recipe: copy it to fine-tune your own model and write a
checkpoint that ``aquin-nb sae diff --checkpoint`` reads. The LoRA target modules
come from the architecture table (`aquin_nb._architectures`): every attention and
MLP projection of GPT-2, GPT-NeoX, Llama, Gemma 2, Qwen2 and Mistral models.

Example:
    >>> from aquin_nb.demo.finetune import finetune_lora
    >>> path = finetune_lora("tiny-gpt2", run_dir="runs/cooking", steps=2, progress=False)
    >>> path.name
    'checkpoint.pt'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._quiet import quiet_unless_progress
from .._rows import batches_of, encode_rows, read_training_rows
from ..catalog import EMBEDDED_DIR
from ..run import Run

logger = logging.getLogger(__name__)

FINETUNE_DATA = EMBEDDED_DIR / "finetune.jsonl"


@quiet_unless_progress
def finetune_lora(
    model: str | Path = "tiny-gpt2",
    data: str | Path = FINETUNE_DATA,
    run_dir: str | Path = "runs/lora",
    *,
    steps: int = 120,
    lr: float = 5e-5,
    batch_size: int = 16,
    rank: int = 8,
    seed: int = 0,
    target_modules: Sequence[str] | None = None,
    context_size: int | None = None,
    progress: bool = True,
) -> Path:
    """LoRA-fine-tune ``model`` on ``data``, merge the adapter, and checkpoint it.

    ``target_modules`` defaults to the architecture table's (every attention and
    MLP projection); name them for an architecture the table lacks. Rows are cut
    to ``context_size`` tokens (default 1,024, or the model's maximum if smaller).
    Returns the path of ``run_dir/checkpoints/checkpoint.pt`` (``{step, state_dict}``
    with plain Hugging Face names).
    """
    from peft import LoraConfig, get_peft_model

    from .._architectures import ARCHITECTURES, architecture_of, max_context, resolve_context_size
    from .._errors import AquinError
    from ..models import load_hf_model

    torch.manual_seed(seed)
    hf_model, tokenizer, label = load_hf_model(model)
    if target_modules is None:
        arch = architecture_of(hf_model, remedy="pass target_modules= (the modules to adapt)")
        targets, fan_in_fan_out = list(arch.lora_targets), arch.fan_in_fan_out
    else:
        known = ARCHITECTURES.get(str(getattr(hf_model.config, "model_type", "")))
        # Without an entry, PEFT sets fan_in_fan_out itself for Conv1D targets (and warns).
        targets = list(target_modules)
        fan_in_fan_out = known.fan_in_fan_out if known is not None else False
    window = resolve_context_size(
        context_size, sae_context=None, model_max=max_context(hf_model), label=label
    )
    rows = read_training_rows(data)
    encoded = encode_rows(tokenizer, rows, window)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
    )
    try:
        peft_model = get_peft_model(hf_model, config)
    except ValueError as error:  # PEFT: no module of the model matches the targets
        raise AquinError(
            f"cannot put LoRA on {label} with target_modules {targets}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    peft_model.train()
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="LoRA fine-tune", disable=not progress)
    for _ in bar:
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        input_ids, labels = next(
            batches_of([encoded[i] for i in picks], batch_size, tokenizer.eos_token_id)
        )
        loss = peft_model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    run = Run(run_dir)
    run.checkpoint(merged, step=steps)
    path = run.checkpoint_dir / "checkpoint.pt"
    logger.info("LoRA fine-tune done: final loss %.3f, checkpoint %s", loss.item(), path)
    return path
