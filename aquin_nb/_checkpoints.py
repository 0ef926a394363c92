"""Reading fine-tuned checkpoints safely and matching them to a base model.

Checkpoints are untrusted input (DESIGN.md decision 7): tensors are read with
``torch.load(weights_only=True)`` or safetensors, never plain pickle. Key names
are normalised (``model.``, ``_orig_mod.``, ``module.``, ``base_model.model.``,
a ``TransformerBridge``'s ``._original_component`` segments) against the base
model's own names, and every mismatch names the tensor.

What is refused before any tensor reaches the model:

* a zip whose members declare more bytes than `checkpoint_byte_limit` allows
  for the model, or more than `MAX_INFLATION` times the file's size (a zip
  bomb: ``torch.save`` never compresses), checked before anything is inflated;
* a pickle that imports anything outside torch's weights-only allow-list, named
  by `aquin_nb._pickle_scan`;
* sparse, quantized, nested, ``meta`` and subclassed tensors (only dense
  tensors with data are read);
* NaN or inf, and finite values beyond `MAX_ABS_VALUE` or the model dtype's range.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._errors import AquinError
from ._pickle_scan import unsafe_import

# Prefixes that trainers and wrappers put in front of Hugging Face names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "base_model.model.", "model.")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# A TransformerBridge registers each Hugging Face module under this name.
_BRIDGE_SEGMENT = "_original_component"

# Finite values beyond this magnitude are refused. Trained weights stay far below
# it (the largest seen in released models are around 1e3), and it keeps a
# weight's square, which LayerNorm and RMSNorm compute, finite in float32 and
# bfloat16 (1e30 < 3.4e38); a checkpoint near it only produces inf and NaN.
MAX_ABS_VALUE = 1e15
# A checkpoint may declare up to this many bytes per model parameter: float32
# weights plus an optimizer's state (Adam's two moments and a master copy).
BYTES_PER_PARAMETER = 16
_ARCHIVE_SLACK_BYTES = 64 * 1024 * 1024
# torch.save stores zip members uncompressed; more inflation than this is a bomb.
MAX_INFLATION = 4


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def checkpoint_byte_limit(model_state: Mapping[str, torch.Tensor]) -> int:
    """The most bytes a checkpoint for this model may declare (see `BYTES_PER_PARAMETER`)."""
    seen: set[int] = set()
    parameters = 0
    for tensor in model_state.values():
        pointer = tensor.data_ptr()
        if pointer and pointer in seen:  # tied weights count once
            continue
        seen.add(pointer)
        parameters += tensor.numel()
    return parameters * BYTES_PER_PARAMETER + _ARCHIVE_SLACK_BYTES


def read_checkpoint(
    path: str | Path, *, max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], int | None]:
    """Read a checkpoint into ``(state_dict, step)`` without running any pickled code.

    Accepts a ``{step, state_dict}`` ``.pt``, a bare state dict, a ``.safetensors``
    file and a Hugging Face ``save_pretrained`` directory. (PEFT adapter
    directories are read and merged by `aquin_nb._adapters` instead.) With
    ``max_bytes`` (see `checkpoint_byte_limit`), larger files are refused unread.
    """
    path = Path(path)
    if not path.exists():
        raise AquinError(f"checkpoint {path} does not exist")
    if path.is_dir():
        state: dict[str, torch.Tensor] = _read_pretrained_dir(path, max_bytes)
        step = None
    elif path.suffix == ".safetensors":
        state, step = _read_safetensors(path, max_bytes), None
    else:
        state, step = _unwrap_payload(_torch_load(path, max_bytes), path)
    check_plain_tensors(state, f"checkpoint {path}")
    return state, step


def _read_safetensors(path: Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_size(path, path.stat().st_size, max_bytes)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise AquinError(
            f"cannot read checkpoint {path}: not a valid safetensors file ({error})"
        ) from None


def _torch_load(path: Path, max_bytes: int | None = None) -> Any:
    _check_archive(path, max_bytes)
    try:
        with warnings.catch_warnings():
            # torch's notes on old or odd files; what matters is reported as an AquinError.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable bytes
        unsafe = unsafe_import(path)
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


def _check_archive(path: Path, max_bytes: int | None) -> None:
    """Refuse a torch zip whose members would inflate past the bounds, before inflating."""
    try:
        on_disk = path.stat().st_size
        if not zipfile.is_zipfile(path):
            _check_size(path, on_disk, max_bytes)
            return
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # unreadable as a zip: torch.load reports it as corrupt
    if declared > MAX_INFLATION * on_disk + _ARCHIVE_SLACK_BYTES:
        raise AquinError(
            f"refused to load checkpoint {path}: its zip members declare {_size(declared)} "
            f"from {_size(on_disk)} on disk; torch.save never compresses, so this is a zip bomb"
        )
    _check_size(path, declared, max_bytes)


def _check_size(path: Path, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise AquinError(
            f"refused to load checkpoint {path}: it holds {_size(size)}, more than the "
            f"{_size(max_bytes)} a checkpoint of this model can need "
            f"({BYTES_PER_PARAMETER} bytes per parameter plus 64 MiB)"
        )


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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
    tensors = {str(key): value for key, value in payload.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        keys = sorted(str(key) for key in payload)[:5]
        raise AquinError(f"checkpoint {path} holds no tensors (keys: {keys})")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise AquinError(f"checkpoint {path}: 'step' is {step!r}, expected an integer")
    return dict(tensors), step


def _read_pretrained_dir(path: Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        _check_size(path, sum(shard.stat().st_size for shard in shards), max_bytes)
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(shard))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        _check_size(path, sum(shard.stat().st_size for shard in bins), max_bytes)
        state = {}
        for shard in bins:
            state.update(_unwrap_payload(_torch_load(shard, max_bytes), shard)[0])
        return state
    raise AquinError(
        f"checkpoint directory {path} has no *.safetensors or pytorch_model*.bin weights "
        f"(and no adapter_config.json for a PEFT adapter)"
    )


def check_plain_tensors(state: Mapping[str, Any], source: str) -> None:
    """Refuse tensors that are not plain dense tensors holding data, naming the first."""
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise AquinError(f"{source}: entry {key} is a {type(tensor).__name__}, not a tensor")
        problem = None
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            problem = f"a tensor subclass ({type(tensor).__name__})"
        elif tensor.layout != torch.strided:
            problem = f"a sparse tensor ({tensor.layout})"
        elif tensor.is_quantized:
            problem = f"a quantized tensor ({tensor.dtype})"
        elif tensor.is_nested:
            problem = "a nested tensor"
        elif tensor.is_meta or tensor.device.type == "meta":
            problem = "a meta tensor (a shape without data)"
        if problem is not None:
            raise AquinError(
                f"tensor {key} in {source} is {problem}; aquin_nb reads dense tensors only"
            )


def check_tensor_values(
    key: str, tensor: torch.Tensor, source: str, dtype: torch.dtype | None = None
) -> None:
    """Refuse NaN, inf and magnitudes beyond `MAX_ABS_VALUE` or ``dtype``'s range.

    ``dtype`` is the dtype the values will be copied into (the model's); integer
    targets are not range-checked.
    """
    target = dtype or tensor.dtype
    if tensor.is_complex() and not target.is_complex:
        raise AquinError(
            f"tensor {key} in {source} is complex ({tensor.dtype}); the model's is {target}"
        )
    if not target.is_floating_point or tensor.numel() == 0:
        return
    values = tensor.detach()
    if values.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        values = values.to(torch.float64)
    # one pass, no |values| copy (an embedding's size: 1 GB at a 1B Llama); NaN propagates
    low, high = (float(value) for value in torch.aminmax(values))
    peak = math.nan if math.isnan(low) or math.isnan(high) else max(high, -low)
    if not math.isfinite(peak):
        raise AquinError(f"tensor {key} in {source} holds NaN or inf values")
    limit = min(MAX_ABS_VALUE, torch.finfo(target).max)
    if peak > limit:
        raise AquinError(
            f"tensor {key} in {source} holds a value of magnitude {peak:.3g}, beyond the "
            f"{limit:.3g} aquin_nb accepts for {str(target).removeprefix('torch.')} weights "
            f"(the model would compute inf or NaN)"
        )


def normalise_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Strip or add the wrapper prefixes that make ``state``'s names match ``expected``.

    A prefix is only removed when that improves the match, so a Llama checkpoint's
    own ``model.layers...`` names are left alone. A ``TransformerBridge``'s state
    dict loses its ``._original_component`` segments, and its alias entries (the
    same weights again under bridge names such as ``ln1`` or ``attn.q``) are
    dropped when they share storage with, or equal (a slice of), a real weight,
    as is an all-zero bias the bridge adds to a layer that has none.
    """
    current, from_bridge = _strip_bridge_segments(state, source)
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
    if from_bridge:
        current = _drop_bridge_aliases(current, expected)
    return current


def _strip_bridge_segments(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], bool]:
    if not any(_BRIDGE_SEGMENT in key for key in state):
        return dict(state), False
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        clean = key.replace(f".{_BRIDGE_SEGMENT}", "").removeprefix(f"{_BRIDGE_SEGMENT}.")
        if clean == _BRIDGE_SEGMENT:
            continue
        if clean in merged:
            if not _same_values(merged[clean], tensor):
                raise AquinError(
                    f"checkpoint {source} holds two different tensors for {clean} "
                    f"(one of them under {key})"
                )
            continue
        merged[clean] = tensor
    return merged, True


def _drop_bridge_aliases(
    state: dict[str, torch.Tensor], expected: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    canonical = {key: value for key, value in state.items() if key in expected}
    storages = {
        value.untyped_storage().data_ptr() for value in canonical.values() if value.numel() > 0
    }
    kept = dict(canonical)
    for key, value in state.items():
        if key in canonical:
            continue
        if value.numel() > 0 and value.untyped_storage().data_ptr() in storages:
            continue  # a view of a real weight, as torch.save kept it
        parent, _, leaf = key.rpartition(".")
        module_parent = parent.rpartition(".")[0]
        relatives = [
            tensor
            for name, tensor in canonical.items()
            if name.startswith(f"{module_parent}.") and name.rpartition(".")[2] == leaf
        ]
        if any(_is_slice_of(value, tensor) for tensor in relatives):
            continue  # a copy of (part of) a real weight, e.g. attn.q of a fused c_attn
        if leaf == "bias" and f"{parent}.weight" in canonical and not value.any():
            continue  # the zero bias a bridge adds to a bias-free layer (GPT-2's lm_head)
        kept[key] = value
    return kept


def _same_values(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (
        first.shape == second.shape and first.dtype == second.dtype and torch.equal(first, second)
    )


def _is_slice_of(alias: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether ``alias`` (or its transpose) equals ``whole`` or one equal chunk of it."""
    candidates = [alias] + ([alias.T] if alias.ndim == 2 else [])
    for candidate in candidates:
        if candidate.ndim != whole.ndim or candidate.dtype != whole.dtype:
            continue
        if candidate.shape == whole.shape:
            if torch.equal(candidate, whole):
                return True
            continue
        differing = [dim for dim in range(whole.ndim) if candidate.shape[dim] != whole.shape[dim]]
        if len(differing) != 1:
            continue
        dim = differing[0]
        size = candidate.shape[dim]
        if size == 0 or whole.shape[dim] % size:
            continue
        if any(torch.equal(candidate, chunk) for chunk in whole.split(size, dim=dim)):
            return True
    return False


def _match_score(state: Mapping[str, Any], expected: Mapping[str, Any]) -> int:
    return sum(1 for key in state if key in expected)


def check_against_model(
    state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    *,
    source: str,
    model_name: str,
) -> None:
    """Raise `AquinError` naming the first missing, unexpected, mis-shaped or bad tensor.

    A tensor missing from ``state`` is fine when the model ties it to one that is
    present (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``). Values
    are checked by `check_plain_tensors` and `check_tensor_values`.
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
    check_plain_tensors(state, f"checkpoint {source}")
    for key, tensor in state.items():
        expected_shape = tuple(model_state[key].shape)
        if tuple(tensor.shape) != expected_shape:
            raise AquinError(
                f"tensor {key} has shape {tuple(tensor.shape)} in checkpoint {source} "
                f"but {expected_shape} in {model_name}"
            )
        check_tensor_values(key, tensor, f"checkpoint {source}", model_state[key].dtype)
