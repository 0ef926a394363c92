"""Capture: a directory of captured activations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .._errors import AquinError
from ._base import Result

MANIFEST = "manifest.json"


@dataclass(frozen=True, eq=False)
class Capture(Result):
    """A capture directory: ``manifest.json`` plus ``layers/layer_<N>.pt`` shards.

    ``summary`` is the manifest: ``model``, ``checkpoint``, ``name``, ``layers``,
    ``hooks``, ``position``, ``n_prompts``, ``n_rows``, ``d_model``, ``shapes``,
    ``dtype``, ``prepend_bos``, ``processing``, ``sae_layer``, ``created`` and
    ``tool_version``. Each shard holds ``{"activations": [rows, d_model],
    "prompt_index": [rows]}``; with ``position="all"`` a row is a token (BOS
    excluded), otherwise a prompt.
    """

    kind: ClassVar[str] = "capture"
    verb: ClassVar[str] = "capture_activations"

    directory: Path
    summary: dict[str, Any]

    def layer_path(self, layer: int) -> Path:
        return self.directory / "layers" / f"layer_{layer}.pt"

    def load_layer(self, layer: int) -> Any:
        """Layer ``layer``'s activations, ``[rows, d_model]`` (a torch tensor)."""
        from ..capture import read_shard

        if layer not in self.summary["layers"]:
            raise AquinError(
                f"capture {self.directory} has no layer {layer} (it has {self.summary['layers']})"
            )
        return read_shard(self.layer_path(layer), self.summary["d_model"])["activations"]

    @classmethod
    def open(cls, directory: str | Path) -> Capture:
        """Read and check a capture directory's manifest."""
        directory = Path(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise AquinError(f"activations directory {directory} has no {MANIFEST}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise AquinError(f"{path} is not a valid manifest: {error}") from None
        required = {"layers", "d_model", "position", "hooks"}
        if not isinstance(manifest, dict) or not required <= set(manifest):
            missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else required
            raise AquinError(f"{path} is not a valid manifest: missing {missing}")
        return cls(directory=directory, summary=manifest)

    def _payload(self) -> dict[str, Any]:
        return {"directory": str(self.directory)}

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Capture:
        if not isinstance(payload.get("directory"), str):
            raise AquinError(f"{path}: a capture result needs its directory")
        return cls(directory=Path(payload["directory"]), summary=payload["summary"])

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Capture({self.directory}: {s['model']}{' + ' + s['name'] if s.get('name') else ''}, "
            f"layers {s['layers']}, {s['n_rows']} rows x {s['d_model']} ({s['position']}))"
        )
