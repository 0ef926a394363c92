"""PEFT LoRA adapters: validated, read by our own readers, then merged.

A separate module because an adapter directory is a second checkpoint format
with its own untrusted parts: a JSON config that PEFT would pass straight to
its constructors and regex matcher, and tensors that PEFT would load with no
value checks. `aquin_nb.models.apply_checkpoint` hands adapter directories here;
everything else about checkpoints lives in `aquin_nb._checkpoints`.

An adapter gets the checks a plain checkpoint gets: its config is validated
before PEFT sees it (types, ranks, and every regex bounded against catastrophic
backtracking by `regex_path_bound`), its tensors are read by our own readers
(weights_only or safetensors), and they must be exactly the tensors the config
implies, finite and in range, before anything is merged.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._checkpoints import (
    _read_safetensors,
    _torch_load,
    _unwrap_payload,
    check_plain_tensors,
    check_tensor_values,
)
from ._errors import AquinError
from ._io import read_json

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_ADAPTER_CONFIG_BYTES = 16 * 1024 * 1024
# PEFT matches adapter regexes with Python's backtracking `re` against every
# module name; a pattern such as "(.|.)*Q" takes minutes. A pattern is accepted
# when a bound on the paths the matcher can try for one name (see
# `regex_path_bound`) stays under this; that is well under a second per name.
MAX_REGEX_PATHS = 10**6


def merge_peft_adapter(
    model: PreTrainedModel, path: Path, model_name: str, max_bytes: int
) -> PreTrainedModel:
    """``model`` with the adapter directory ``path`` merged in; untouched on any refusal.

    ``max_bytes`` bounds the adapter's weight file (see `checkpoint_byte_limit`).
    """
    merged = attach_peft_adapter(model, path, model_name, max_bytes).merge_and_unload()
    logger.info("merged PEFT adapter %s", path)
    return merged


def attach_peft_adapter(
    model: PreTrainedModel, path: Path, model_name: str, max_bytes: int
) -> PeftModel:
    """A ``PeftModel`` over ``model`` with the checked adapter ``path`` loaded, not merged.

    The LoRA layers are injected into ``model`` in place; on any refusal they are
    taken out again and ``model`` is left as it was.
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config_path = path / _ADAPTER_CONFIG
    raw = read_json(config_path, "PEFT adapter config", max_bytes=_MAX_ADAPTER_CONFIG_BYTES)
    module_names = [name for name, _ in model.named_modules() if name]
    config = check_adapter_config(raw, config_path, module_names, _max_rank(model))
    weights_path, state = _read_adapter_weights(path, max_bytes)
    where = f"PEFT adapter {weights_path}"
    # Our own tensors replace whatever PEFT would initialise; an initialiser such
    # as "pissa" or "loftq" would rewrite the base weights or need data.
    config["init_lora_weights"] = True
    config["inference_mode"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_config = PeftConfig.from_peft_type(**config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise AquinError(
            f"PEFT adapter config {config_path} is invalid: {_first_line(error)}"
        ) from None
    try:
        peft_model = PeftModel(model, peft_config)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        raise AquinError(
            f"cannot apply PEFT adapter {path} to {model_name}: {_first_line(error)}"
        ) from None
    try:
        expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        _check_adapter_tensors(state, expected, where, model_name)
        result = set_peft_model_state_dict(peft_model, state)
        unused = sorted(getattr(result, "unexpected_keys", []))
        if unused:
            raise AquinError(
                f"{where} does not fit {model_name}: {len(unused)} tensor(s) "
                f"were not used (first: {unused[0]})"
            )
        _check_merge(peft_model, where)
    except BaseException:
        peft_model.unload()  # take the LoRA layers out again: the model stays as it was
        raise
    logger.info("loaded PEFT adapter %s (%d tensors)", path, len(state))
    return peft_model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _max_rank(model: torch.nn.Module) -> int:
    """The largest LoRA rank that means anything: the smaller side of the widest matrix."""
    sides = [min(p.shape[0], p.shape[1]) for p in model.parameters() if p.ndim >= 2]
    return max(sides, default=1)


def _read_adapter_weights(path: Path, max_bytes: int) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in _ADAPTER_WEIGHTS:
        weights_path = path / name
        if weights_path.is_file():
            break
    else:
        raise AquinError(
            f"PEFT adapter {path} has no {' or '.join(_ADAPTER_WEIGHTS)} beside its {_ADAPTER_CONFIG}"
        )
    if weights_path.suffix == ".safetensors":
        state = _read_safetensors(weights_path, max_bytes)
    else:
        state = _unwrap_payload(_torch_load(weights_path, max_bytes), weights_path)[0]
    check_plain_tensors(state, f"PEFT adapter {weights_path}")
    for key, tensor in state.items():  # before PEFT touches the model; dtype range comes later
        check_tensor_values(key, tensor, f"PEFT adapter {weights_path}")
    return weights_path, state


def _check_adapter_tensors(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    where: str,
    model_name: str,
) -> None:
    missing = sorted(key for key in expected if key not in state)
    unexpected = sorted(key for key in state if key not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
        raise AquinError(f"{where} does not match its config on {model_name}: {', '.join(parts)}")
    for key, tensor in state.items():
        shape = tuple(expected[key].shape)
        if tuple(tensor.shape) != shape:
            raise AquinError(
                f"tensor {key} has shape {tuple(tensor.shape)} in {where} but its config "
                f"on {model_name} implies {shape}"
            )
        check_tensor_values(key, tensor, where, expected[key].dtype)


@torch.no_grad()
def _check_merge(peft_model: Any, where: str) -> None:
    """Refuse an adapter whose merged weights would be non-finite or out of range."""
    for name, module in peft_model.named_modules():
        get_delta = getattr(module, "get_delta_weight", None)
        base = getattr(module, "get_base_layer", None)
        if get_delta is None or base is None:
            continue
        weight = getattr(base(), "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        for adapter in getattr(module, "active_adapters", []):
            try:
                delta = get_delta(adapter)
            except (KeyError, AttributeError, RuntimeError, TypeError):
                continue  # a layer type PEFT merges its own way
            if delta.shape != weight.shape:
                continue
            label = name.removeprefix("base_model.model.")
            check_tensor_values(f"{label} (merged)", weight + delta, where, weight.dtype)


def check_adapter_config(
    raw: Any, config_path: Path, module_names: Sequence[str], max_rank: int
) -> dict[str, Any]:
    """The adapter config as a dict, after type, range and regex checks naming the file.

    ``module_names`` are the base model's; target modules must match at least one,
    and every regex-valued field must pass `regex_path_bound`.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    where = f"PEFT adapter config {config_path}"
    if not isinstance(raw, dict):
        raise AquinError(f"{where} holds a JSON {_json_type(raw)}, expected an object")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise AquinError(f"{where}: peft_type is {peft_type!r}, not a PEFT method PEFT knows")

    def fail(field: str, expected: str) -> AquinError:
        return AquinError(f"{where}: {field} is {_short(raw[field])}, expected {expected}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

    def strings(value: Any, *, allow_str: bool) -> bool:
        if value is None or (allow_str and isinstance(value, str) and value):
            return True
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)

    if "r" in raw and not (is_int(raw["r"]) and 1 <= raw["r"] <= max_rank):
        raise fail("r", f"an integer rank from 1 to {max_rank}")
    if "lora_alpha" in raw and not is_number(raw["lora_alpha"]):
        raise fail("lora_alpha", "a finite number")
    if "lora_dropout" in raw and not (
        is_number(raw["lora_dropout"]) and 0 <= raw["lora_dropout"] <= 1
    ):
        raise fail("lora_dropout", "a number from 0 to 1")
    for field in ("target_modules", "exclude_modules"):
        if field in raw and not strings(raw[field], allow_str=True):
            raise fail(field, "a module name list or a regular expression string")
    for field in ("modules_to_save", "layers_pattern"):
        allow_str = field == "layers_pattern"
        if field in raw and not strings(raw[field], allow_str=allow_str):
            raise fail(field, "a list of module names")
    layers = raw.get("layers_to_transform")
    if layers is not None and not (
        is_int(layers) or (isinstance(layers, list) and all(is_int(v) for v in layers))
    ):
        raise fail("layers_to_transform", "a layer index or a list of them")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(
            isinstance(key, str) and key and is_number(value) for key, value in pattern.items()
        ):
            raise fail(field, "an object mapping module patterns to numbers")
        if field == "rank_pattern" and not all(
            is_int(v) and 1 <= v <= max_rank for v in pattern.values()
        ):
            raise fail(field, f"integer ranks from 1 to {max_rank}")
    for field in ("fan_in_fan_out", "use_dora", "use_rslora", "inference_mode"):
        if field in raw and not isinstance(raw[field], bool):
            raise fail(field, "true or false")
    _check_adapter_patterns(raw, where, module_names)
    return dict(raw)


def _check_adapter_patterns(raw: dict[str, Any], where: str, module_names: Sequence[str]) -> None:
    """Bound every regex PEFT will run, then require the targets to exist in the model."""
    length = max((len(name) for name in module_names), default=1)
    # Each field as PEFT embeds it in its own regex (peft.tuners.tuners_utils, peft.utils.other).
    patterns: list[tuple[str, str]] = []
    for field in ("target_modules", "exclude_modules"):
        if isinstance(raw.get(field), str):
            patterns.append((field, raw[field]))
    for module in raw.get("modules_to_save") or []:
        patterns.append(("modules_to_save", rf"(^|.*\.){module}($|\..*)"))
    layers_pattern = raw.get("layers_pattern") or []
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        patterns.append(("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."))
    for field in ("rank_pattern", "alpha_pattern"):
        for key in raw.get(field) or {}:
            patterns.append((field, rf"(.*\.)?({key})$"))
    for field, pattern in patterns:
        try:
            paths = regex_path_bound(pattern, length)
        except re.error as error:
            raise AquinError(
                f"{where}: {field} {_short(raw[field])} is not a valid regular expression ({error})"
            ) from None
        except ValueError as error:
            raise AquinError(
                f"{where}: {field} {_short(raw[field])} is refused because Python's regex "
                f"matcher could backtrack for minutes on it ({error}); list the module names instead"
            ) from None
        if paths > MAX_REGEX_PATHS:
            raise AquinError(
                f"{where}: {field} {_short(raw[field])} is refused because Python's regex "
                f"matcher could try {paths:.2g} paths per module name; list the module names instead"
            )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        found = any(re.fullmatch(targets, name) for name in module_names)
    elif isinstance(targets, list):
        found = any(
            name == target or name.endswith(f".{target}")
            for target in targets
            for name in module_names
        )
    else:
        return  # PEFT picks its default targets for the architecture
    if not found:
        leaves = {name.rsplit(".", 1)[-1] for name in module_names}
        examples = ", ".join(sorted(leaf for leaf in leaves if not leaf.isdigit())[:8])
        raise AquinError(
            f"{where}: target_modules {_short(targets)} match no module of the model "
            f"(its modules include {examples}); is the adapter for another base model?"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def regex_path_bound(pattern: str, length: int) -> int:
    r"""An upper bound on the paths a backtracking matcher tries for a ``length``-char name.

    Sequences multiply, alternations add, and a repetition of a single-path body
    allows at most ``length + 1`` counts. A repetition of something that can itself
    match in several ways (``(a|b)*``, ``(a+)+``, ``(.|.)*``) can take exponential
    time and raises ``ValueError``, as do backreferences. ``re.error`` means the
    pattern does not compile.

    Example:
        >>> regex_path_bound(r".*\.(q_proj|v_proj)", 40)
        82
    """
    re.compile(pattern)
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # Python < 3.11
        import sre_parse
    return _paths(list(sre_parse.parse(pattern)), length)


_ATOMS = frozenset(
    {
        "LITERAL",
        "NOT_LITERAL",
        "ANY",
        "IN",
        "AT",
        "CATEGORY",
        "RANGE",
        "NEGATE",
        "FAILURE",
        "SUCCESS",
    }
)
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})


def _paths(items: Sequence[Any], length: int) -> int:
    total = 1
    for op, argument in items:
        kind = str(op)
        if kind in _ATOMS:
            ways = 1
        elif kind == "SUBPATTERN":
            ways = _paths(list(argument[-1]), length)
        elif kind == "ATOMIC_GROUP":
            ways = _paths(list(argument), length)
        elif kind in ("ASSERT", "ASSERT_NOT"):
            ways = _paths(list(argument[1]), length)
        elif kind == "BRANCH":
            ways = sum(_paths(list(arm), length) for arm in argument[1])
        elif kind == "GROUPREF_EXISTS":
            ways = _paths(list(argument[1]), length) + _paths(list(argument[2] or []), length)
        elif kind in _REPEATS:
            low, high, body = argument
            inner = _paths(list(body), length)
            top = min(high, length)
            if inner == 1:
                ways = top - min(low, top) + 1
            elif high <= 1:
                ways = inner + (1 if low == 0 else 0)
            else:
                raise ValueError("it repeats a group that can itself match in several ways")
        else:
            raise ValueError(f"it uses {kind.lower().replace('_', ' ')}")
        total *= max(ways, 1)
        if total > MAX_REGEX_PATHS * 1000:  # no need to count further
            return total
    return total
