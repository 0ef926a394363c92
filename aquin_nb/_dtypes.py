"""The floating-point dtypes a model may run in, and whether a device can run them.

Every verb that runs a model takes ``dtype=`` (the CLI's ``--dtype``): the model's
weights and activations use it; SAE encoding runs in the SAE's own dtype and the
statistics accumulate in float64 whatever it is. A dtype is refused, naming the
device, when the device cannot run it: that is probed once per (device, dtype)
with a few operations every decoder runs, rather than guessed from a table.

Example:
    >>> from aquin_nb._dtypes import resolve_dtype
    >>> resolve_dtype("bf16", "cpu")
    torch.bfloat16
    >>> resolve_dtype(None, "cpu")
    torch.float32
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._errors import AquinError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(value: Any) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"`` or ``torch.bfloat16`` → ``torch.bfloat16``; others refused."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise AquinError(
            f"dtype {dtype_name(value)} is not supported: use one of {', '.join(DTYPES)}"
        )
    text = str(value).strip().lower().removeprefix("torch.")
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise AquinError(f"unknown dtype {value!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[text]


def resolve_dtype(value: Any, device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to run in (float32 when ``value`` is None), refused when ``device`` can't run it."""
    dtype = torch.float32 if value is None else parse_dtype(value)
    check_device(device)
    if dtype != torch.float32:
        problem = _probe(str(torch.device(device or default_device())), dtype)
        if problem is not None:
            raise AquinError(
                f"device {device or default_device()} cannot run dtype {dtype_name(dtype)} "
                f"({problem}); use --dtype float32"
            )
    return dtype


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device string torch does not know, or CUDA on a machine without it."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise AquinError(f"unknown device {device!r}: {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise AquinError(f"device {device} requested, but CUDA is not available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise AquinError(
                f"device {device} requested, but there are {torch.cuda.device_count()} CUDA "
                f"device(s)"
            )


@functools.cache
def _probe(device: str, dtype: torch.dtype) -> str | None:
    """``None`` when ``device`` runs a matmul, a norm and a softmax in ``dtype``, else why not."""
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16:
        if not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(torch.device(device))} has no bfloat16 support"
    try:
        x = torch.ones(2, 8, device=device, dtype=dtype)
        weight = torch.ones(8, 8, device=device, dtype=dtype)
        y = torch.nn.functional.layer_norm(x @ weight, (8,))
        torch.softmax(y, dim=-1).sum().item()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None
