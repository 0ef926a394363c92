"""Training rows shared by the LoRA fixture and simulate: reading, encoding, batching.

Rows are ``{"instruction", "response"}`` (the loss covers the response tokens
only), ``{"text"}`` or plain strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ._errors import AquinError


def read_training_rows(source: Any) -> list[dict[str, str]]:
    """JSONL (or a list) of ``{"instruction", "response"}``, ``{"text"}`` or strings."""
    from .probes import read_json_items

    if isinstance(source, (str, Path)):
        items, where = read_json_items(Path(source), "data file"), str(source)
    else:
        items, where = list(source), "the data list"
    if not items:
        raise AquinError(f"{where} holds no training rows")
    rows = []
    for index, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            rows.append({"text": item})
        elif isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip():
            rows.append({"text": item["text"]})
        elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
            response = item.get("response")
            if not isinstance(response, str) or not response.strip():
                raise AquinError(f"row {index} in {where} has an instruction but no response")
            rows.append({"instruction": item["instruction"], "response": response})
        else:
            raise AquinError(
                f"row {index} in {where} must be a string, {{'text'}} or "
                f"{{'instruction', 'response'}}"
            )
    return rows


def encode_rows(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[tuple]:
    """Token ids and labels; instruction rows put the loss on response tokens only.

    Only a prefix of each text is tokenised (`aquin_nb._activations.encode_prefixes`),
    so a 50 MB one-line row costs what its first ``max_length`` tokens cost.
    """
    from ._activations import encode_prefixes
    from .probes import format_row

    # Text rows need their text; instruction rows the prompt alone (to know where
    # the loss starts) and the whole row. One batched, cut tokenisation for all.
    texts: list[str] = []
    for row in rows:
        if "text" in row:
            texts.append(row["text"])
        else:
            texts.append(format_row(row["instruction"], "", tokenizer) + " ")
            texts.append(format_row(row["instruction"], row["response"], tokenizer))
    token_ids = iter(encode_prefixes(tokenizer, texts, max_length))
    encoded = []
    for row in rows:
        if "text" in row:
            ids = next(token_ids)[:max_length]
            encoded.append((ids, list(ids)))
            continue
        # A cut prompt still holds more than max_length ids, so the labels below
        # are those of the uncut prompt; so are the first max_length ids of the row.
        prompt_ids = next(token_ids)
        ids = (next(token_ids) + [tokenizer.eos_token_id])[:max_length]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        encoded.append((ids, labels))
    return encoded


def batches_of(encoded: list[tuple], batch_size: int, pad_id: int) -> Iterator[tuple]:
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
        yield input_ids, labels
