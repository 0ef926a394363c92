"""The end-to-end fixture: a real LoRA fine-tune with PEFT, merged and checkpointed.

This is also a recipe: copy it to fine-tune your own model and write a
checkpoint that ``aquin-nb sae diff --checkpoint`` reads.

Example:
    >>> from aquin_nb.demo.finetune import finetune_lora
    >>> path = finetune_lora("tiny-gpt2", run_dir="runs/cooking")  # doctest: +SKIP
    >>> path.name
    'checkpoint.pt'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._errors import AquinError
from ..catalog import EMBEDDED_DIR
from ..probes import format_row
from ..run import Run

logger = logging.getLogger(__name__)

FINETUNE_DATA = EMBEDDED_DIR / "finetune.jsonl"


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """``{"instruction", "response"}`` rows from a JSON or JSONL file."""
    from ..probes import read_json_items

    rows = read_json_items(Path(path), "fine-tuning data")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("instruction") or not row.get("response"):
            raise AquinError(f"{path} row {index}: expected instruction and response")
    if not rows:
        raise AquinError(f"{path} holds no rows")
    return rows


def _encode_rows(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[tuple]:
    """Token ids and labels per row; the loss covers the response tokens only."""
    encoded = []
    for row in rows:
        prompt = format_row(row["instruction"], "", tokenizer) + " "
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = format_row(row["instruction"], row["response"], tokenizer)
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        full_ids = (full_ids + [tokenizer.eos_token_id])[:max_length]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
        encoded.append((full_ids, labels))
    return encoded


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
    rows = read_rows(data)
    encoded = _encode_rows(tokenizer, rows, int(hf_model.config.n_positions))
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
        width = max(len(encoded[i][0]) for i in picks)
        input_ids = torch.full((batch_size, width), tokenizer.eos_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, index in enumerate(picks):
            ids, row_labels = encoded[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
        loss = peft_model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    path = Run(run_dir).checkpoint(merged, step=steps)
    logger.info("LoRA fine-tune done: final loss %.3f, checkpoint %s", loss.item(), path)
    return path
