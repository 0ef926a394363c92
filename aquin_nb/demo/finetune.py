"""The end-to-end fixture: a real LoRA fine-tune with PEFT, merged and checkpointed.

This is also a recipe: copy it to fine-tune your own model and write a
checkpoint that ``aquin-nb sae diff --checkpoint`` reads.

Example:
    >>> from aquin_nb.demo.finetune import finetune_lora
    >>> path = finetune_lora("tiny-gpt2", run_dir="runs/cooking", steps=2, progress=False)
    >>> path.name
    'checkpoint.pt'
"""

from __future__ import annotations

import logging
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
    progress: bool = True,
) -> Path:
    """LoRA-fine-tune ``model`` on ``data``, merge the adapter, and checkpoint it.

    Returns the path of ``run_dir/checkpoints/checkpoint.pt`` (``{step, state_dict}``
    with plain Hugging Face names).
    """
    from peft import LoraConfig, get_peft_model

    from ..models import load_hf_model

    torch.manual_seed(seed)
    hf_model, tokenizer, _ = load_hf_model(model)
    rows = read_training_rows(data)
    encoded = encode_rows(tokenizer, rows, int(hf_model.config.n_positions))
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2 stores Conv1D weights transposed
    )
    peft_model = get_peft_model(hf_model, config)
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
