"""Loading base models and fine-tuned checkpoints into a TransformerLens bridge.

Example:
    >>> import aquin_nb
    >>> bridge = aquin_nb.load_model("tiny-gpt2")
    >>> bridge.cfg.n_layers
    4
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
    check_against_model,
    check_plain_tensors,
    check_tensor_values,
    checkpoint_byte_limit,
    is_peft_adapter,
    normalise_keys,
    read_checkpoint,
)
from ._errors import AquinError
from ._io import read_json
from .catalog import find_entry

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_model_source(slug_or_path: str | Path) -> tuple[str, str]:
    """``(source, label)``: a local directory or hub id, and a short display name."""
    text = str(slug_or_path)
    entry = find_entry(text)
    if entry is not None:
        return entry.model_path(), entry.slug
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AquinError(
                f"model directory {path} has no config.json: expected a Hugging Face "
                f"save_pretrained directory or a catalog slug (see `aquin-nb models`)"
            )
        return str(path), path.name
    if text.startswith((".", "/", "~")) or text.endswith((".pt", ".safetensors")):
        raise AquinError(f"model path {text} does not exist")
    return text, text.rsplit("/", 1)[-1]


def load_hf_model(
    slug_or_path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The plain Hugging Face model, its tokenizer and a label, before any bridge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, label = resolve_model_source(slug_or_path)
    local = Path(source).is_dir()
    if not local and not _cached(source):
        from ._hub import require_hub

        require_hub(f"model {source}")
    try:
        # Eager attention matches the bridge, which forces it for hook access.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except OSError as error:
        raise AquinError(
            f"cannot load model {source}: {str(error).splitlines()[0]} "
            f"(no network? use a local directory or the embedded tiny-gpt2)"
        ) from None
    model.eval()
    return model, tokenizer, label


def _cached(repo_id: str) -> bool:
    """Whether the hub model's config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def apply_checkpoint(model: PreTrainedModel, checkpoint: str | Path) -> PreTrainedModel:
    """Load ``checkpoint`` into ``model`` (in place, or merged for a PEFT adapter).

    ``checkpoint`` may be a ``{step, state_dict}`` ``.pt`` with Hugging Face names
    (prefixes ``model.``, ``_orig_mod.``, ``base_model.model.`` are stripped), a
    bare state dict, a ``.safetensors`` file, a ``save_pretrained`` directory, a
    ``TransformerBridge``'s state dict or a PEFT LoRA adapter directory. Pickles
    that would run code, zip bombs, sparse/quantized/meta tensors, NaN, inf and
    absurd magnitudes are refused with an `AquinError` naming the file and tensor.
    """
    path = Path(checkpoint).expanduser()
    model_name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    model_state = model.state_dict()
    max_bytes = checkpoint_byte_limit(model_state)
    if is_peft_adapter(path):
        return _merge_peft_adapter(model, path, model_name, max_bytes)
    state, step = read_checkpoint(path, max_bytes=max_bytes)
    state = normalise_keys(state, model_state, source=str(path))
    check_against_model(state, model_state, source=str(path), model_name=model_name)
    with torch.no_grad():
        for key, tensor in state.items():
            model_state[key].copy_(tensor.to(model_state[key].dtype))
    logger.info("loaded checkpoint %s (step %s, %d tensors)", path, step, len(state))
    return model


# --- PEFT adapters -----------------------------------------------------------------
# An adapter gets the checks a plain checkpoint gets: its config is validated
# before PEFT sees it, its tensors are read by our own readers (weights_only or
# safetensors), and they must be exactly the tensors the config implies, finite
# and in range, before anything is merged.

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_ADAPTER_CONFIG_BYTES = 16 * 1024 * 1024
# PEFT matches adapter regexes with Python's backtracking `re` against every
# module name; a pattern such as "(.|.)*Q" takes minutes. A pattern is accepted
# when a bound on the paths the matcher can try for one name (see
# `regex_path_bound`) stays under this; that is well under a second per name.
MAX_REGEX_PATHS = 10**6


def _merge_peft_adapter(
    model: PreTrainedModel, path: Path, model_name: str, max_bytes: int
) -> PreTrainedModel:
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
    merged = peft_model.merge_and_unload()
    logger.info("merged PEFT adapter %s (%d tensors)", path, len(state))
    return merged


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


def load_model(
    slug_or_path: str | Path,
    checkpoint: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """A TransformerLens ``TransformerBridge`` for a catalog slug or a local directory.

    With ``checkpoint``, the fine-tuned weights are loaded into the Hugging Face
    model before it is wrapped, so the bridge runs the checkpoint.

    Example:
        >>> bridge = load_model("tiny-gpt2")
        >>> bridge.cfg.d_model
        192
    """
    model, tokenizer, label = load_hf_model(slug_or_path, dtype=dtype)
    if checkpoint is not None:
        model = apply_checkpoint(model, checkpoint)
    return wrap_bridge(model, tokenizer, label, device=device)


def wrap_bridge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    label: str,
    *,
    device: str | None = None,
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = getattr(model.config, "_name_or_path", None) or label
    model.to(torch.device(device))  # type: ignore[arg-type]  # in place for nn.Module
    bridge = TransformerBridge.boot_transformers(
        source, hf_model=model, tokenizer=tokenizer, device=device
    )
    bridge.eval()
    bridge.aquin_label = label  # type: ignore[attr-defined]
    return bridge


def hf_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The plain Hugging Face state dict of ``model``, the names checkpoints carry.

    ``model`` may be a ``PreTrainedModel``, a PEFT model (its LoRA merged into a
    copy) or a ``TransformerBridge`` that has not been put in compatibility mode.
    """
    import copy

    from peft import PeftModel
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    if isinstance(model, TransformerBridge):
        if model.compatibility_mode:
            raise AquinError(
                "this bridge's weights were processed for compatibility mode (folded layer "
                "norms, centred writing weights); checkpoint the Hugging Face model instead"
            )
        original = model.original_model
        with torch.device("meta"):
            reference = type(original)(original.config)
        names = set(reference.state_dict())
        state = {
            key.replace("._original_component", ""): value
            for key, value in original.state_dict().items()
        }
        return {key: value for key, value in state.items() if key in names}
    state = model.state_dict()
    return {key.removeprefix("_orig_mod."): value for key, value in state.items()}
