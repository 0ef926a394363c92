"""Reference corpora for corpus passes: the shipped corpus, the probes, or a user's file.

A corpus is read as a list of texts and packed into windows of the SAE's
context size: one token stream (texts joined with EOS) cut into windows, each
starting with BOS when the SAE expects one.
"""

from __future__ import annotations

import array
import gzip
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

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


TOKENIZE_TEXTS = 256  # texts tokenised at a time: their Python lists are all that is held


def pack_windows(
    tokenizer: Any, texts: list[str], *, prepend_bos: bool, max_length: int
) -> list[np.ndarray]:
    """``texts`` as one token stream cut into windows of ``max_length`` (BOS included).

    A stream shorter than one window becomes one shorter window. The stream is
    held as int32 (4 bytes a token), tokenised `TOKENIZE_TEXTS` texts at a time,
    and each window is a row of one array: a corpus pass holds O(tokens · 4 bytes)
    of ids, not a Python int per token.

    Example:
        >>> import aquin_nb
        >>> tokenizer = aquin_nb.load_model("tiny-gpt2").tokenizer
        >>> texts = ["Preheat the oven."] * 10  # 8 tokens and EOS each: 90 in the stream
        >>> windows = pack_windows(tokenizer, texts, prepend_bos=True, max_length=32)
        >>> [len(w) for w in windows], windows[0].dtype.name
        ([32, 32, 29], 'int32')
    """
    from ._activations import encode_prefixes

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = array.array("i")
    for start in range(0, len(texts), TOKENIZE_TEXTS):
        for ids in encode_prefixes(tokenizer, texts[start : start + TOKENIZE_TEXTS], 1 << 20):
            stream.extend(ids)
            stream.append(eos)
    bos = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
    bos = bos if prepend_bos else []
    width = max_length - len(bos)
    if width < 1:
        raise AquinError(f"context size {max_length} leaves no room for tokens")
    flat = np.frombuffer(stream, dtype=np.int32) if len(stream) else np.zeros(0, np.int32)
    full = len(flat) // width
    rows = np.empty((full, len(bos) + width), dtype=np.int32)
    rows[:, : len(bos)] = bos
    rows[:, len(bos) :] = flat[: full * width].reshape(full, width)
    windows = list(rows)
    if len(flat) > full * width:
        windows.append(np.concatenate([np.asarray(bos, np.int32), flat[full * width :]]))
    return windows
