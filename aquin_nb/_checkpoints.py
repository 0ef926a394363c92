"""Reading fine-tuned checkpoints safely and matching them to a base model.

Checkpoints are untrusted input (DESIGN.md decision 7): tensors are read with
``torch.load(weights_only=True)`` or safetensors, never plain pickle. Key names
are normalised (``model.``, ``_orig_mod.``, ``module.``, ``base_model.model.``)
against the base model's own names, and every mismatch names the tensor.
"""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._errors import AquinError

# Prefixes that trainers and wrappers put in front of Hugging Face names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "base_model.model.", "model.")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """Read a checkpoint into ``(state_dict, step)`` without running any pickled code.

    Accepts a ``{step, state_dict}`` ``.pt``, a bare state dict, a ``.safetensors``
    file and a Hugging Face ``save_pretrained`` directory. (PEFT adapter
    directories are merged by `aquin_nb.models.load_model` instead.)
    """
    path = Path(path)
    if not path.exists():
        raise AquinError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_pretrained_dir(path), None
    if path.suffix == ".safetensors":
        return _read_safetensors(path), None
    payload = _torch_load(path)
    return _unwrap_payload(payload, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise AquinError(
            f"cannot read checkpoint {path}: not a valid safetensors file ({error})"
        ) from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable bytes
        unsafe = _unsafe_import(path)
        if unsafe is not None:
            raise AquinError(
                f"refused to load checkpoint {path}: it would import {unsafe}, and aquin_nb "
                f"never runs code from a checkpoint (weights_only=True)"
            ) from None
        message = str(error).strip()
        detail = next(
            (line.strip() for line in message.splitlines() if "Unsupported" in line),
            message.splitlines()[0] if message else type(error).__name__,
        )
        raise AquinError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({detail})"
        ) from None


# What torch's weights-only unpickler allows; anything else in a pickle is code.
_SAFE_IMPORT_PREFIXES = (
    "torch.",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "_codecs.encode",
    "numpy.",
)


def _unsafe_import(path: Path) -> str | None:
    """The first non-tensor import a pickle (plain or inside torch's zip) asks for, if any.

    Reads opcodes with pickletools, which never executes anything.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith(".pkl")]
                streams = [archive.read(name) for name in names]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):
        return None
    for data in streams:
        strings: list[str] = []
        try:
            for opcode, argument, _ in pickletools.genops(data):
                if opcode.name in ("GLOBAL", "INST") and isinstance(argument, str):
                    name = argument.replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    if isinstance(argument, str):
                        strings.append(argument)
                    continue
                if not name.startswith(_SAFE_IMPORT_PREFIXES):
                    return name
        except Exception:  # a truncated or garbled opcode stream: corrupt, not malicious
            continue
    return None


def _unwrap_payload(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    if not isinstance(payload, Mapping):
        raise AquinError(
            f"checkpoint {path} holds a {type(payload).__name__}, expected a state dict "
            f"or {{'step', 'state_dict'}}"
        )
    step = payload.get("step")
    for key in _STATE_DICT_KEYS:
        inner = payload.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(value, torch.Tensor) for value in inner.values())
        ):
            payload = inner
            break
    tensors = {key: value for key, value in payload.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise AquinError(f"checkpoint {path} holds no tensors (keys: {sorted(payload)[:5]})")
    if step is not None and not isinstance(step, int):
        raise AquinError(f"checkpoint {path}: 'step' is {step!r}, expected an integer")
    return dict(tensors), step


def _read_pretrained_dir(path: Path) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(shard))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for shard in bins:
            state.update(_unwrap_payload(_torch_load(shard), shard)[0])
        return state
    raise AquinError(
        f"checkpoint directory {path} has no *.safetensors or pytorch_model*.bin weights "
        f"(and no adapter_config.json for a PEFT adapter)"
    )


def normalise_keys(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Strip or add the wrapper prefixes that make ``state``'s names match ``expected``.

    A prefix is only removed when that improves the match, so a Llama checkpoint's
    own ``model.layers...`` names are left alone.
    """
    current = dict(state)
    top_levels = sorted({key.split(".", 1)[0] + "." for key in expected if "." in key})
    for _ in range(4):
        best = current
        best_score = _match_score(current, expected)
        for prefix in _WRAPPER_PREFIXES:
            candidate = {key.removeprefix(prefix): value for key, value in current.items()}
            if (score := _match_score(candidate, expected)) > best_score:
                best, best_score = candidate, score
        for prefix in top_levels:
            candidate = {
                (key if key in expected else prefix + key): value for key, value in current.items()
            }
            if (score := _match_score(candidate, expected)) > best_score:
                best, best_score = candidate, score
        if best is current:
            break
        current = best
    return current


def _match_score(state: Mapping[str, Any], expected: Mapping[str, Any]) -> int:
    return sum(1 for key in state if key in expected)


def check_against_model(
    state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    *,
    source: str,
    model_name: str,
) -> None:
    """Raise `AquinError` naming the first missing, unexpected or mis-shaped tensor.

    A tensor missing from ``state`` is fine when the model ties it to one that is
    present (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``).
    """
    unexpected = sorted(key for key in state if key not in model_state)
    present_storage = {model_state[key].data_ptr() for key in state if key in model_state}
    missing = sorted(
        key
        for key, tensor in model_state.items()
        if key not in state and tensor.data_ptr() not in present_storage
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
        hint = ""
        if len(missing) + len(unexpected) > len(model_state) // 2:
            hint = "; it looks like a checkpoint of another architecture"
        raise AquinError(f"checkpoint {source} does not fit {model_name}: {', '.join(parts)}{hint}")
    for key, tensor in state.items():
        expected_shape = tuple(model_state[key].shape)
        if tuple(tensor.shape) != expected_shape:
            raise AquinError(
                f"tensor {key} has shape {tuple(tensor.shape)} in checkpoint {source} "
                f"but {expected_shape} in {model_name}"
            )
        if not torch.isfinite(tensor).all() and tensor.is_floating_point():
            raise AquinError(f"tensor {key} in checkpoint {source} holds NaN or inf values")
