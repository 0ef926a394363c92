"""Reference corpora for corpus passes: the shipped corpus, the probes, or a user's file.

A corpus is read as a list of texts and packed into windows of the SAE's
context size: one token stream (texts joined with EOS) cut into windows, each
starting with BOS when the SAE expects one.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

from ._errors import AquinError
from .catalog import EMBEDDED_DIR

SHIPPED_CORPUS = EMBEDDED_DIR / "corpus.txt.gz"
TEXT_SUFFIXES = (".txt", ".md", ".text")


def shipped_texts() -> list[str]:
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as handle:
        return [text for text in handle.read().split("\n\n") if text.strip()]


def read_corpus(source: Any, tokenizer: Any = None) -> list[str]:
    """Texts of ``source``: ``None`` (the shipped corpus and the probes), a list of
    strings, or a file (plain text with documents separated by blank lines, or a
    JSON array / JSONL of strings, ``{"text"}`` or ``{"instruction", "response"}``)."""
    from .probes import load_prompts, read_json_items

    if source is None:
        return shipped_texts() + load_prompts(None, tokenizer)
    if isinstance(source, (list, tuple)):
        texts = load_prompts(list(source), tokenizer)
    else:
        path = Path(source)
        if not path.is_file():
            raise AquinError(f"corpus {path} does not exist")
        if path.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as error:
                raise AquinError(
                    f"corpus {path} is not UTF-8 text (bad byte at offset {error.start})"
                ) from None
            texts = [part for part in text.split("\n\n") if part.strip()]
        else:
            items = read_json_items(path, "corpus")
            texts = load_prompts(items, tokenizer) if items else []
    if not any(text.strip() for text in texts):
        raise AquinError(f"corpus {source} is empty")
    return texts


def corpus_digest(texts: list[str]) -> str:
    """A short content hash of the corpus, part of every cache key."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def pack_windows(
    tokenizer: Any, texts: list[str], *, prepend_bos: bool, max_length: int
) -> list[list[int]]:
    """``texts`` as one token stream cut into windows of ``max_length`` (BOS included).

    A stream shorter than one window becomes one shorter window.
    """
    from ._activations import encode_prefixes

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for ids in encode_prefixes(tokenizer, texts, 1 << 20):
        stream.extend(ids)
        stream.append(eos)
    bos = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
    bos = bos if prepend_bos else []
    width = max_length - len(bos)
    if width < 1:
        raise AquinError(f"context size {max_length} leaves no room for tokens")
    return [bos + stream[start : start + width] for start in range(0, len(stream), width)]
