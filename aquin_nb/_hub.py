"""Hub access: fail fast and clearly when the model hub cannot be reached."""

from __future__ import annotations

import os
import socket

from ._errors import AquinError

HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST) -> bool:
    """Whether the hub's name resolves (offline, this fails at once, with no retries)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def require_hub(what: str) -> None:
    if not hub_reachable():
        raise AquinError(
            f"cannot fetch {what}: {HUB_HOST} is unreachable (offline?); use the embedded "
            f"tiny-gpt2, or a local model or SAE directory"
        )
