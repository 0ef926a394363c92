"""One model, two sides: a PEFT adapter switched off for the base and on for the checkpoint.

Diffing an adapter against its base does not need two copies of the model.
The adapter's LoRA layers are injected into the one Hugging Face model and one
``TransformerBridge`` wraps it; `SwitchedBridge` is a view of that bridge for one
side, and every forward through it first puts the shared model into that side's
state (`AdapterSwitch.use`). Peak memory is one model plus the adapter.

The checkpoint side has the adapter **merged** into the weights, not run as
extra LoRA branches: the bridge splits some fused weights into q, k and v at
boot (GPT-2's ``c_attn`` into views, GPT-NeoX's ``query_key_value`` into copies)
and never calls the fused module, so an unmerged LoRA on it would be skipped;
after each switch the copies are refreshed from the fused weight. Merging
writes ``W + ΔW`` in place and unmerging writes ``(W + ΔW) - ΔW``, which equals
``W`` to within float rounding (a few units in the last place, measured in the
tests), not bit for bit.

Weight processing: TransformerLens's compatibility mode rewrites the weights
(folds norms, centres the writing weights), and a LoRA delta merged into
processed weights would be wrong. A switched bridge is therefore never
processed; `processed_view` gives what processing would: for SAE hooks (the
residual stream, attention and MLP outputs) folding norms and value biases
changes nothing, and centring the writing weights of a LayerNorm model equals
subtracting each activation's mean over ``d_model``, which is what
`aquin_nb._activations.residual` applies to a bridge marked ``aquin_centre``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

SIDES = ("base", "checkpoint")


class AdapterSwitch:
    """Puts a ``PeftModel`` into the base state (adapter unmerged and off) or the
    checkpoint state (adapter merged), changing the weights only when the side changes."""

    def __init__(self, peft_model: Any, bridge: Any) -> None:
        self.peft_model = peft_model
        self.bridge = bridge
        self.merged = False  # a freshly attached adapter runs as LoRA branches
        self.side = "checkpoint"
        self.use("base")

    @torch.inference_mode(False)  # a caller's inference mode must not reach the weights
    @torch.no_grad()
    def use(self, side: str) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if side == self.side:
            return
        tuner = self.peft_model.base_model
        if side == "base":
            if self.merged:
                for layer in self.fused_layers:
                    layer.unmerge()
                self.merged = False
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            for layer in self.fused_layers:
                layer.merge()
            self.merged = True
        if self.fused_layers:
            _refresh_split_weights(self.bridge)
        self.side = side

    @functools.cached_property
    def fused_layers(self) -> list[Any]:
        """The LoRA layers the bridge never calls, found by a one-token dry run: merged.

        The bridge splits fused qkv weights (GPT-2's ``c_attn``, GPT-NeoX's
        ``query_key_value``) and never calls the fused module, so a LoRA branch
        there would be skipped; the dry run finds every such layer, whatever the
        architecture. Every other LoRA layer runs as PEFT runs it, a low-rank
        branch beside the base weight, so switching writes only the weights the
        bridge reads directly, not the whole model.
        """
        from peft.tuners.lora import LoraLayer

        modules: list[torch.nn.Module] = list(self.peft_model.modules())
        layers = [m for m in modules if isinstance(m, LoraLayer)]
        called: set[int] = set()
        handles = [
            layer.register_forward_hook(lambda module, *_: called.add(id(module)))
            for layer in layers
        ]
        try:
            device = next(self.peft_model.parameters()).device
            with torch.no_grad():
                self.bridge(torch.zeros((1, 1), dtype=torch.long, device=device))
        finally:
            for handle in handles:
                handle.remove()
        return [layer for layer in layers if id(layer) not in called]


@torch.no_grad()
def _refresh_split_weights(bridge: Any) -> None:
    """Copy fused weights the bridge split at boot (GPT-NeoX's interleaved
    ``query_key_value`` becomes three copies) from the fused module again; splits
    that are views of the fused weight (GPT-2's ``c_attn``) already see the change."""
    splits = getattr(bridge, "aquin_copied_splits", None)
    if splits is None:  # first switch: find the splits that are copies, once
        splits = [module for module in bridge.modules() if _split_is_copied(module)]
        bridge.aquin_copied_splits = splits
    for module in splits:
        with no_linear_init():  # the split builds fresh Linears only to copy from
            fresh = module.split_qkv_matrix(module.original_component)
        for part, new in zip((module.q, module.k, module.v), fresh, strict=True):
            old = part.original_component
            for name in ("weight", "bias"):
                target, source = getattr(old, name, None), getattr(new, name, None)
                if target is None or source is None:
                    continue
                if target.data_ptr() != source.data_ptr():
                    target.copy_(source)


def _leave_unset(linear: torch.nn.Linear) -> None:
    """``Linear.reset_parameters`` under `no_linear_init`: nothing (tests poison instead)."""


@contextlib.contextmanager
def no_linear_init() -> Iterator[None]:
    """New ``torch.nn.Linear`` modules skip their random init, for code that builds them
    only to assign their weights: the bridge's boot splitting fused qkv projections
    (a third of its boot at gpt2-small shape) and `_refresh_split_weights`."""
    reset = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: _leave_unset(self)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters = reset  # type: ignore[method-assign]


def _split_is_copied(module: Any) -> bool:
    """Whether a fused-qkv bridge component holds copies of the fused weight (GPT-NeoX)
    rather than views of it (GPT-2), which need no refresh."""
    split = getattr(module, "split_qkv_matrix", None)
    fused = getattr(module, "original_component", None)
    if split is None or fused is None:
        return False
    storages = {
        tensor.untyped_storage().data_ptr()
        for tensor in (getattr(fused, "weight", None), getattr(fused, "bias", None))
        if tensor is not None
    }
    for part in (module.q, module.k, module.v):
        for name in ("weight", "bias"):
            tensor = getattr(part.original_component, name, None)
            if tensor is not None and tensor.untyped_storage().data_ptr() not in storages:
                return True
    return False


def can_switch(peft_model: Any) -> str | None:
    """``None`` when switching the adapter off gives the base model exactly, else why not."""
    for name, config in peft_model.peft_config.items():
        if str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1] != "LORA":
            return f"adapter {name} is {config.peft_type}, not LoRA"
        if getattr(config, "bias", "none") != "none":
            return f"adapter {name} trains biases (bias={config.bias!r})"
        if getattr(config, "modules_to_save", None):
            return f"adapter {name} saves whole modules ({', '.join(config.modules_to_save)})"
    return None


_OWN = frozenset({"_bridge", "_switch", "_side", "aquin_label"})


class SwitchedBridge:
    """A ``TransformerBridge`` seen from one side of an `AdapterSwitch`.

    Attribute reads and writes go to the shared bridge (both sides are one model:
    one ``cfg``, one tokenizer, one weight processing); forwards switch first.
    """

    def __init__(self, bridge: Any, switch: AdapterSwitch, side: str, label: str) -> None:
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_switch", switch)
        object.__setattr__(self, "_side", side)
        object.__setattr__(self, "aquin_label", label)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bridge, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._bridge, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._switch.use(self._side)
        return self._bridge(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._switch.use(self._side)
        return self._bridge.forward(*args, **kwargs)

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        self._switch.use(self._side)
        return self._bridge.run_with_cache(*args, **kwargs)

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        self._switch.use(self._side)
        return self._bridge.run_with_hooks(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SwitchedBridge({self.aquin_label!r}, side={self._side!r})"


def processed_view(bridge: Any, processing: dict[str, Any]) -> None:
    """Mark ``bridge`` (never put in compatibility mode) to read its hooks as ``processing``
    would have left them: centred over ``d_model`` when writing weights are centred under
    LayerNorm (TransformerLens centres nothing under RMSNorm)."""
    layer_norm = str(getattr(bridge.cfg, "normalization_type", "")).startswith("LN")
    bridge.aquin_centre = bool(processing.get("center_writing_weights")) and layer_norm
    bridge.aquin_processing = dict(processing)


def centred(bridge: Any, activations: torch.Tensor) -> torch.Tensor:
    """``activations`` as the SAE's weight processing would give them (see `processed_view`)."""
    if getattr(bridge, "aquin_centre", False):
        return activations - activations.mean(-1, keepdim=True)
    return activations
