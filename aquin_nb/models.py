"""Loading base models and fine-tuned checkpoints into a TransformerLens bridge.

Example:
    >>> import aquin_nb
    >>> bridge = aquin_nb.load_model("tiny-gpt2")
    >>> bridge.cfg.n_layers
    4
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._adapters import merge_peft_adapter
from ._checkpoints import (
    check_against_model,
    checkpoint_byte_limit,
    is_peft_adapter,
    normalise_keys,
    read_checkpoint,
)
from ._dtypes import default_device, parse_dtype, resolve_dtype
from ._errors import AquinError
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
    slug_or_path: str | Path, *, dtype: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The plain Hugging Face model, its tokenizer and a label, before any bridge.

    ``dtype``: float32 (default), bfloat16 or float16, by name or ``torch.dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else parse_dtype(dtype)

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
        return merge_peft_adapter(model, path, model_name, max_bytes)
    state, step = read_checkpoint(path, max_bytes=max_bytes)
    state = normalise_keys(state, model_state, source=str(path))
    check_against_model(state, model_state, source=str(path), model_name=model_name)
    with torch.no_grad():
        for key, tensor in state.items():
            model_state[key].copy_(tensor.to(model_state[key].dtype))
    logger.info("loaded checkpoint %s (step %s, %d tensors)", path, step, len(state))
    return model


def checkpoint_twin(model: PreTrainedModel, checkpoint: str | Path) -> PreTrainedModel:
    """A second model running ``checkpoint``, beside ``model`` (the base, left untouched).

    Checked as `apply_checkpoint` checks, then built without copying the base:
    the new model's parameters are the checkpoint's own tensors (converted to the
    base's dtype), tied ones tied again, and only non-persistent buffers copied
    from the base. Peak memory is the base plus the checkpoint, not the base, a
    copy of it and the checkpoint. A PEFT adapter, or a model this cannot build,
    is applied to a copy of the base instead.
    """
    import copy

    path = Path(checkpoint).expanduser()
    if is_peft_adapter(path):
        return apply_checkpoint(copy.deepcopy(model), path)
    model_state = model.state_dict()
    twin = _build_twin(model, model_state, dict(model.named_buffers()), path)
    if twin is None:  # a model class that cannot be built on the meta device
        state, _ = _checked_state(model, model_state, path)
        return _copied_twin(model, state)
    return twin


def bridge_checkpoint_twin(bridge: Any, checkpoint: str | Path) -> PreTrainedModel | None:
    """`checkpoint_twin` for a base already wrapped in a ``TransformerBridge`` (the
    trajectory's), from its plain-named tensors; ``None`` where it does not apply
    (a PEFT adapter, processed weights, a class that cannot be built on meta), so
    that the caller loads the checkpoint the usual way."""
    path = Path(checkpoint).expanduser()
    if is_peft_adapter(path) or getattr(bridge, "compatibility_mode", False):
        return None
    original = bridge.original_model
    buffers = {
        name.replace("._original_component", ""): buffer
        for name, buffer in original.named_buffers(remove_duplicate=False)
    }
    return _build_twin(original, bridge_tensors(original), buffers, path)


def _checked_state(
    model: Any, model_state: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], Any]:
    model_name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    state, step = read_checkpoint(path, max_bytes=checkpoint_byte_limit(model_state))
    state = normalise_keys(state, model_state, source=str(path))
    check_against_model(state, model_state, source=str(path), model_name=model_name)
    return state, step


def _build_twin(
    model: Any, model_state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], path: Path
) -> PreTrainedModel | None:
    """A model of ``model``'s class and config whose parameters are the checked
    checkpoint's tensors and whose non-persistent buffers are ``buffers``' (by plain name)."""
    import copy

    model_name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    try:
        with torch.device("meta"):
            twin = type(model)(model.config)
    except Exception:
        return None
    state, step = _checked_state(model, model_state, path)
    weights = {
        key: state.pop(key).to(tensor.dtype).contiguous()
        for key, tensor in model_state.items()
        if key in state
    }
    twin.load_state_dict(weights, assign=True, strict=False)
    del weights
    twin.tie_weights()
    for name, buffer in twin.named_buffers():
        if buffer.is_meta and buffers.get(name) is not None:
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(leaf, buffers[name].clone(), persistent=False)
    if any(t.is_meta for t in (*twin.parameters(), *twin.buffers())):
        raise AquinError(f"checkpoint {path} leaves tensors of {model_name} unset")
    twin.generation_config = copy.deepcopy(model.generation_config)
    logger.info("loaded checkpoint %s (step %s, %d tensors)", path, step, len(model_state))
    return twin.eval()


def _copied_twin(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    import copy

    twin = copy.deepcopy(model)
    twin_state = twin.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            twin_state[key].copy_(tensor.to(twin_state[key].dtype))
    return twin


def attach_adapter(model: PreTrainedModel, path: str | Path) -> Any:
    """A ``PeftModel`` with the checked LoRA adapter directory ``path`` attached to
    ``model`` in place, not merged (`aquin_nb._switch` switches it on and off)."""
    from ._adapters import attach_peft_adapter

    model_name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    max_bytes = checkpoint_byte_limit(model.state_dict())
    return attach_peft_adapter(model, Path(path).expanduser(), model_name, max_bytes)


def load_model(
    slug_or_path: str | Path,
    checkpoint: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: Any = None,
) -> TransformerBridge:
    """A TransformerLens ``TransformerBridge`` for a catalog slug or a local directory.

    With ``checkpoint``, the fine-tuned weights are loaded into the Hugging Face
    model before it is wrapped, so the bridge runs the checkpoint. ``dtype`` is
    float32 (default), bfloat16 or float16; one ``device`` cannot run is refused.

    Example:
        >>> bridge = load_model("tiny-gpt2")
        >>> bridge.cfg.d_model
        192
    """
    dtype = resolve_dtype(dtype, device)
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

    from ._switch import no_linear_init

    device = device or default_device()
    source = getattr(model.config, "_name_or_path", None) or label
    model.to(torch.device(device))  # type: ignore[arg-type]  # in place for nn.Module
    with no_linear_init():  # the boot's qkv splits are assigned the fused weights
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
        return bridge_tensors(model.original_model)
    state = model.state_dict()
    return {key.removeprefix("_orig_mod."): value for key, value in state.items()}


def bridge_tensors(original: Any) -> dict[str, torch.Tensor]:
    """The plain Hugging Face state dict of a bridge's ``original_model``, detached.

    The names a plain model of this class and config has: ``._original_component``
    segments and the bridge's aliases dropped, tied weights under both names. A
    bridge's ``state_dict()`` walks every wrapper module, so the path of each name
    is found once per model and the tensors are read from their modules after.
    """
    paths = bridge_tensor_paths(original)
    try:
        return {name: _tensor_at(original, path) for name, path in paths.items()}
    except AttributeError:  # the module tree changed since: find the paths again
        paths = bridge_tensor_paths(original, fresh=True)
        return {name: _tensor_at(original, path) for name, path in paths.items()}


def bridge_tensor_paths(original: Any, *, fresh: bool = False) -> dict[str, str]:
    """Plain Hugging Face name -> the tensor's path in a bridge's ``original_model``.

    Paths go through ``._original_component`` segments and, with a PEFT adapter
    injected, through the LoRA layer's ``.base_layer``; found once per model.
    """
    paths = None if fresh else _TENSOR_PATHS.get(original)
    if paths is None:
        names = _plain_names(original)
        paths = {}
        for key in original.state_dict(keep_vars=True):
            plain = key.replace("._original_component", "").replace(".base_layer.", ".")
            if plain in names and plain not in paths:
                paths[plain] = key
        _TENSOR_PATHS[original] = paths
    return paths


def _tensor_at(root: Any, path: str) -> torch.Tensor:
    """The tensor at a state-dict ``path``, walked through each module's registered
    children (a bridge's ``__getattr__`` costs more than the walk itself)."""
    *segments, attribute = path.split(".")
    module = root
    for segment in segments:
        child = module._modules.get(segment)
        module = child if child is not None else getattr(module, segment)
    value = module._parameters.get(attribute)
    if value is None:
        value = module._buffers.get(attribute)
    if value is None:
        value = getattr(module, attribute)
    if not isinstance(value, torch.Tensor):
        raise AttributeError(f"{path} is no longer a tensor")
    return value.detach()


_TENSOR_PATHS: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
_PLAIN_NAMES: dict[tuple[type, str], frozenset[str]] = {}


def _plain_names(original: Any) -> frozenset[str]:
    """The state-dict names a plain model of ``original``'s class and config has.

    Built once per (class, config) on the meta device: building it costs more
    than reading the names, and `model_diff` asks on every call.
    """
    key = (type(original), original.config.to_json_string())
    if key not in _PLAIN_NAMES:
        with torch.device("meta"):
            reference = type(original)(original.config)
        _PLAIN_NAMES[key] = frozenset(reference.state_dict())
    return _PLAIN_NAMES[key]
