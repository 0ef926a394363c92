"""CLI text for card specs: the same spec the HTML card draws, as plain lines.

``[tag] title`` and ``[tag] headline`` lines first, then the chips, the
warning and every table section; charts are drawn only in HTML.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_text(spec: dict[str, Any]) -> str:
    """``spec`` as terminal text."""
    tag = spec.get("tag") or spec["kind"].replace("_", " ")
    lines = [f"[{tag}] {spec['title']}"]
    lines += [f"[{tag}] {line}" for line in spec.get("headline", [])]
    chips = [f"{chip['label']} {_value(chip['value'])}" for chip in spec["chips"]]
    lines.append("  " + " · ".join(chips))
    if spec.get("warning"):
        lines.append(f"  warning: {spec['warning']}")
    for section in spec["sections"]:
        if section["type"] != "table" or not section["rows"]:
            continue
        frame = pd.DataFrame(section["rows"], columns=section["columns"])
        table = frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")
        title = section["title"][:1].lower() + section["title"][1:]
        lines += ["", f"{title}:", table]
    return "\n".join(lines)
