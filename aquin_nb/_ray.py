"""The Ray backend (``backend="ray"``): checkpoints and prompt shards as Ray tasks.

Ray schedules; aquin_nb only maps and reduces (DESIGN.md decision 11). The
prompts are cut into ``prompt_shards`` consecutive shards. One task per shard
runs the base pass; one task per checkpoint and shard runs that checkpoint's
pass against its shard's base pass (handed over as an object reference, so the
base runs once per shard, not once per checkpoint). The driver merges each
checkpoint's shard passes (they are sums) in step order, so the result equals
the local backend's to float rounding.

Each task loads the model itself (and its checkpoint) on the worker, so the
model must be a catalog slug or a directory and the checkpoints paths that every
worker can read. Where the cluster has GPUs, each task asks for one and runs
there.

Where it runs: in a session that already called ``ray.init(...)``, on that
cluster. Otherwise ``ray.init()`` is called for you: it joins the cluster named
by ``RAY_ADDRESS`` (``ray://head:10001`` or ``auto``) when that is set, else it
starts a local runtime on this machine. Workers of a remote cluster need aquin_nb
installed (the same version), or ``ray.init(address=...,
runtime_env={"py_modules": [aquin_nb]})`` to ship it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._errors import AquinError
from ._passes import BasePass, CheckpointPass, Shard, base_pass, checkpoint_pass, shards

if TYPE_CHECKING:
    from ._checkpoint_sets import CheckpointRef
    from .saes import SaeNumerics


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise AquinError(
            "backend='ray' needs Ray: pip install 'aquin-nb[ray]' (or pip install ray)"
        ) from None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # joins the cluster RAY_ADDRESS names
        else:
            ray.init(include_dashboard=False)
    return ray


def _worker_bridge(model: Any, checkpoint: Any, numerics: SaeNumerics, dtype: Any = None) -> Any:
    from ._activations import prepare_bridge
    from .models import load_model

    bridge = load_model(model, checkpoint, dtype=dtype)
    prepare_bridge(bridge, numerics)
    return bridge


def _base_task(
    model: Any,
    sae: Any,
    numerics: SaeNumerics,
    shard: Shard,
    batch_size: int,
    n_downstream: int,
    dtype: Any = None,
) -> BasePass:
    from ._quiet import third_party_quiet

    with third_party_quiet():
        bridge = _worker_bridge(model, None, numerics, dtype)
        sae = sae.to(next(bridge.original_model.parameters()).device)
        return base_pass(
            bridge, sae, numerics, shard, batch_size=batch_size, n_downstream=n_downstream
        )


def _checkpoint_task(
    model: Any,
    checkpoint: str,
    sae: Any,
    numerics: SaeNumerics,
    shard: Shard,
    base: BasePass,
    batch_size: int,
    n_downstream: int,
    dtype: Any = None,
) -> CheckpointPass:
    from ._quiet import third_party_quiet

    with third_party_quiet():
        bridge = _worker_bridge(model, checkpoint, numerics, dtype)
        sae = sae.to(next(bridge.original_model.parameters()).device)
        return checkpoint_pass(
            bridge, sae, numerics, shard, base, batch_size=batch_size, n_downstream=n_downstream
        )


class RayRunner:
    """Submits one comparison's passes to Ray and merges what comes back."""

    def __init__(self, comparison: Any, n_shards: int) -> None:
        """``comparison``: the `aquin_nb.trajectory.Comparison` whose passes to run."""
        self.ray = _ray()
        self.comparison = comparison
        prepared = comparison.prepared
        self.shards = shards(prepared.token_lists, n_shards)
        gpus = 1 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.base_remote = self.ray.remote(num_gpus=gpus)(_base_task)
        self.checkpoint_remote = self.ray.remote(num_gpus=gpus)(_checkpoint_task)
        self.sae_ref = self.ray.put(comparison.sae_copy())
        self.common = (comparison.batch_size, comparison.n_downstream, comparison.dtype)
        self.base_refs = [
            self.base_remote.remote(
                comparison.model, self.sae_ref, prepared.numerics, shard, *self.common
            )
            for shard in self.shards
        ]

    def base(self) -> BasePass:
        """The base pass over all prompts, merged from its shards (in prompt order)."""
        merged: BasePass | None = None
        for part in self.ray.get(self.base_refs):
            merged = part if merged is None else merged.merge(part)
        assert merged is not None
        return merged

    def passes(self, refs: list[CheckpointRef]) -> Iterator[tuple[CheckpointRef, CheckpointPass]]:
        """Every checkpoint's pass, merged and yielded in step order.

        At most `window` checkpoints are in flight: enough to keep the cluster busy,
        few enough that a bad checkpoint, which stops the trajectory, leaves little
        submitted work behind. Nothing is cancelled (cancelling a task as it
        completes has crashed Ray's driver): what is in flight finishes and is dropped.
        """
        numerics = self.comparison.prepared.numerics
        waiting = iter(refs)
        in_flight: deque[tuple[CheckpointRef, list[Any]]] = deque()

        def submit() -> None:
            ref = next(waiting, None)
            if ref is None:
                return
            parts = [
                self.checkpoint_remote.remote(
                    self.comparison.model,
                    str(ref.source),
                    self.sae_ref,
                    numerics,
                    shard,
                    base_ref,
                    *self.common,
                )
                for shard, base_ref in zip(self.shards, self.base_refs, strict=True)
            ]
            in_flight.append((ref, parts))

        for _ in range(self.window()):
            submit()
        while in_flight:
            ref, parts = in_flight.popleft()
            merged: CheckpointPass | None = None
            for part in self._get(parts, ref):
                merged = part if merged is None else merged.merge(part)
            assert merged is not None
            submit()
            yield ref, merged

    def window(self) -> int:
        """Checkpoints in flight: one per free worker slot (a checkpoint takes one per
        shard), plus one so the next is queued."""
        resources = self.ray.cluster_resources()
        slots = int(resources.get("GPU", 0)) or int(resources.get("CPU", 1))
        return max(1, slots // len(self.shards)) + 1

    def _get(self, parts: list[Any], ref: CheckpointRef) -> list[CheckpointPass]:
        try:
            return list(self.ray.get(parts))
        except self.ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, AquinError):  # a bad checkpoint: the loader's own message
                raise AquinError(str(cause)) from None
            raise AquinError(
                f"the Ray task for checkpoint {ref.where} (step {ref.step}) failed: "
                f"{str(error).strip().splitlines()[-1]}"
            ) from None
