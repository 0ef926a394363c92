"""Naming the globals a pickle would import, without unpickling it.

When torch's ``weights_only=True`` loader refuses a checkpoint, `unsafe_import`
tells a pickle that would run code from a truncated or corrupt file, and names
the first global it asks for outside an explicit allow-list (the one torch's
weights-only unpickler uses). It reads opcodes with ``pickletools``, which
never executes anything. A module of its own because the allow-list must be
kept in step with torch's, apart from the readers in `aquin_nb._checkpoints`.

Example:
    >>> is_safe_global("torch._utils._rebuild_tensor_v2"), is_safe_global("posix.system")
    (True, False)
"""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

# The globals torch's weights-only unpickler accepts (torch 2.x,
# torch/_weights_only_unpickler.py). Anything else in a checkpoint's pickle is
# named as unsafe; tests keep this list in step with the installed torch.
_SAFE_GLOBALS = frozenset(
    {
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "builtins.frozenset",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_wrapper_subclass",
    }
)
# Legacy typed storage and tensor classes: torch.FloatStorage, torch.cuda.HalfTensor, ...
_LEGACY_ELEMENT_TYPES = (
    "BFloat16",
    "Bool",
    "Byte",
    "Char",
    "ComplexDouble",
    "ComplexFloat",
    "Double",
    "Float",
    "Half",
    "Int",
    "Long",
    "Short",
    "QInt32",
    "QInt8",
    "QUInt2x4",
    "QUInt4x2",
    "QUInt8",
)
_SAFE_LEGACY_TYPES = frozenset(
    f"torch.{namespace}{element}{kind}"
    for namespace in ("", "cuda.", "sparse.", "cuda.sparse.")
    for element in _LEGACY_ELEMENT_TYPES
    for kind in ("Storage", "Tensor")
)


def is_safe_global(name: str) -> bool:
    """Whether torch's weights-only unpickler would accept the global ``module.name``."""
    if name in _SAFE_GLOBALS or name in _SAFE_LEGACY_TYPES:
        return True
    module, _, attribute = name.rpartition(".")
    # Dtypes (torch.float32) and quantization schemes (torch.per_tensor_affine) are data.
    return module == "torch" and isinstance(
        vars(torch).get(attribute), (torch.dtype, torch.qscheme)
    )


def unsafe_import(path: Path) -> str | None:
    """The first global a pickle (plain or inside torch's zip) asks for outside the allow-list.

    Reads opcodes with pickletools, which never executes anything.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith(".pkl")]
                streams = [archive.read(name) for name in names]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return None
    for data in streams:
        try:
            for name in _pickle_globals(data):
                if not is_safe_global(name):
                    return name
        except Exception:  # a truncated or garbled opcode stream: corrupt, not malicious
            continue
    return None


def _pickle_globals(data: bytes) -> Iterator[str]:
    """``module.name`` of every global a pickle imports, following strings through the memo."""
    strings: list[str] = []
    memo: dict[int, str] = {}
    memo_count = 0
    top: str | None = None  # the string on top of the stack, if the last push was one
    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        pushed: str | None = None
        if name in ("GLOBAL", "INST") and isinstance(argument, str):
            yield argument.replace(" ", ".")
        elif name == "STACK_GLOBAL":
            if len(strings) >= 2:
                yield f"{strings[-2]}.{strings[-1]}"
            else:
                yield "<a global whose name the pickle hides>"
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            index = argument if isinstance(argument, int) else memo_count
            memo_count += 1
            if top is not None:
                memo[index] = top
            continue  # storing in the memo leaves the stack (and its top) as it was
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(argument) if isinstance(argument, int) else None
        elif isinstance(argument, str) and ("UNICODE" in name or "STRING" in name):
            pushed = argument
        if pushed is not None:
            strings.append(pushed)
        top = pushed
