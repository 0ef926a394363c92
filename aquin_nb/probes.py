"""Probe prompts: files, lists and the shipped probe set.

Example:
    >>> from aquin_nb.probes import load_prompts
    >>> prompts = load_prompts(["Return the sum of two numbers.", "Stir the sauce."])
    >>> len(prompts)
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import AquinError
from ._io import parse_json
from .catalog import EMBEDDED_DIR

SHIPPED_PROBES = EMBEDDED_DIR / "probes.json"


def format_row(instruction: str, response: str = "", tokenizer: Any = None) -> str:
    """One ``{"instruction", "response"}`` row as text.

    Uses the tokenizer's chat template where it has one, otherwise the plain join
    ``"Instruction: ...\\nResponse: ..."`` that the embedded fine-tune uses.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": instruction}]
        if response:
            messages.append({"role": "assistant", "content": response})
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not response
            )
        )
    return f"Instruction: {instruction}\nResponse: {response}".rstrip()


def load_prompts(
    source: str | Path | Sequence[Any] | None = None, tokenizer: Any = None
) -> list[str]:
    """Prompts as strings from a JSON array or JSONL file, a list, or the shipped set.

    Items may be strings, ``{"text": ...}`` or ``{"instruction", "response"}`` rows.
    """
    if source is None:
        source = SHIPPED_PROBES
    if isinstance(source, (str, Path)):
        items, where = read_json_items(Path(source)), str(source)
    else:
        items, where = list(source), "the prompt list"
    if not items:
        raise AquinError(f"{where} holds no prompts")
    return [_to_text(item, index, where, tokenizer) for index, item in enumerate(items)]


def read_json_items(path: Path, what: str = "prompts file") -> list[Any]:
    """Items of a JSON array or JSONL file, with errors that name the file and line.

    Hostile JSON (nesting deeper than the recursion limit, integers with more
    digits than Python converts) is refused as one `AquinError` naming the file.
    """
    if not path.is_file():
        raise AquinError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AquinError(
            f"{what} {path} is not UTF-8 text (bad byte at offset {error.start})"
        ) from None
    stripped = text.strip()
    if not stripped:
        raise AquinError(f"{what} {path} is empty")
    if stripped.startswith("["):
        items = parse_json(stripped, f"{what} {path}")
        if not isinstance(items, list):  # "[1] x" fails to parse; this is belt and braces
            raise AquinError(f"{what} {path} is not a JSON array")
        return items
    items = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        items.append(parse_json(line, f"{what} {path} line {line_number}"))
    return items


def _to_text(item: Any, index: int, where: str, tokenizer: Any) -> str:
    if isinstance(item, str):
        text = item
    elif isinstance(item, dict) and isinstance(item.get("text"), str):
        text = item["text"]
    elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
        response = item.get("response", "")
        if not isinstance(response, str):
            raise AquinError(f"prompt {index} in {where}: 'response' must be a string")
        text = format_row(item["instruction"], response, tokenizer)
    else:
        raise AquinError(
            f"prompt {index} in {where} must be a string, {{'text'}} or "
            f"{{'instruction', 'response'}}, got {type(item).__name__}"
        )
    if not text.strip():
        raise AquinError(f"prompt {index} in {where} is empty")
    return text
