"""Loading SAELens dictionaries and reading how they expect to be fed.

Example:
    >>> import aquin_nb
    >>> sae = aquin_nb.load_sae("tiny-gpt2")
    >>> sae.cfg.metadata.hook_name
    'blocks.2.hook_resid_pre'
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ._errors import AquinError
from .catalog import CATALOG, EMBEDDED_DIR, find_entry

if TYPE_CHECKING:
    from sae_lens import SAE

logger = logging.getLogger(__name__)

_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")

# What HookedTransformer.from_pretrained_no_processing does, which is how SAELens
# loads a model for training; an SAE's metadata overrides these.
_NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


class SAELike(Protocol):
    """What aquin_nb needs of a dictionary: decoder rows and an encoder."""

    W_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SaeNumerics:
    """How an SAE's training activations were produced (DESIGN.md decision 2)."""

    hook_name: str
    layer: int
    prepend_bos: bool
    context_size: int | None
    processing: dict[str, bool]

    @property
    def needs_processing(self) -> bool:
        return any(self.processing.values())


def parse_hook(hook_name: str) -> tuple[int, str]:
    """``("blocks.6.hook_resid_pre")`` → ``(6, "hook_resid_pre")``."""
    match = _HOOK_PATTERN.match(hook_name)
    if match is None:
        raise AquinError(
            f"unsupported hook {hook_name!r}: expected blocks.<layer>.hook_resid_pre, "
            f"hook_resid_mid, hook_resid_post, hook_attn_out or hook_mlp_out"
        )
    return int(match.group(1)), match.group(2)


def sae_numerics(sae: Any, layer: int | None = None) -> SaeNumerics:
    """Read hook, BOS, context size and weight processing from an SAE's metadata."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    hook_name = getattr(metadata, "hook_name", None) if metadata is not None else None
    if hook_name is None:
        if layer is None:
            raise AquinError(
                "the SAE's metadata has no hook_name; pass layer= to say which residual "
                "stream (blocks.<layer>.hook_resid_pre) it reads"
            )
        hook_name = f"blocks.{layer}.hook_resid_pre"
    hook_layer, _ = parse_hook(hook_name)
    if layer is not None and layer != hook_layer:
        raise AquinError(
            f"layer {layer} does not match the SAE, which was trained on {hook_name} "
            f"(layer {hook_layer})"
        )

    def meta(key: str, default: Any) -> Any:
        value = getattr(metadata, key, None) if metadata is not None else None
        return default if value is None else value

    kwargs = dict(meta("model_from_pretrained_kwargs", {}) or {})
    processing = {key: bool(kwargs.get(key, default)) for key, default in _NO_PROCESSING.items()}
    return SaeNumerics(
        hook_name=hook_name,
        layer=hook_layer,
        prepend_bos=bool(meta("prepend_bos", True)),
        context_size=meta("context_size", None),
        processing=processing,
    )


def load_sae(slug_or_path: Any, layer: int | None = None, *, device: str = "cpu") -> SAE[Any]:
    """An SAELens ``SAE`` from a catalog slug, a release, a directory or a ``.pt`` file.

    Accepted forms:
      * an ``SAE`` object (returned as is);
      * a catalog slug (``"tiny-gpt2"``, ``"gpt2-small"``): its release at ``layer``
        or the catalog's default layer;
      * ``"RELEASE:SAE_ID"`` from SAELens's registry, e.g.
        ``"gpt2-small-res-jb:blocks.6.hook_resid_pre"``;
      * a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``);
      * a ``.pt`` file holding ``{"cfg": {...SAELens cfg...}, "state_dict": {...}}``.

    Example:
        >>> load_sae("tiny-gpt2", layer=2).cfg.d_in
        192
    """
    from sae_lens import SAE

    if isinstance(slug_or_path, SAE):
        return slug_or_path
    text = str(slug_or_path)
    entry = find_entry(text)
    if entry is not None:
        sae_id = entry.sae_id_for(layer)
        if entry.sae_release.startswith("embedded:"):
            name = entry.sae_release.removeprefix("embedded:")
            return _load_sae_dir(EMBEDDED_DIR / name / sae_id, device)
        return _from_registry(entry.sae_release, sae_id, device)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_sae_dir(path, device)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _load_sae_dir(path.parent, device)
        return _load_sae_pt(path, device)
    if ":" in text:
        release, sae_id = text.split(":", 1)
        return _from_registry(release, sae_id, device)
    if text.startswith((".", "/", "~")) or text.endswith(".pt"):
        raise AquinError(f"SAE path {text} does not exist")
    raise AquinError(
        f"unknown SAE {text!r}: pass a catalog slug ({', '.join(e.slug for e in CATALOG)}), "
        f"RELEASE:SAE_ID, a SAELens directory or a .pt file"
    )


# SAE dimensions beyond these are refused before anything is allocated: the widest
# residual streams are ~2**15 wide and the largest public dictionaries ~2**25.
MAX_SAE_D_IN = 2**20
MAX_SAE_D_SAE = 2**30
_MAX_SAE_CONFIG_BYTES = 16 * 1024 * 1024
_SAE_WEIGHTS = "sae_weights.safetensors"


def _load_sae_dir(path: Path, device: str) -> SAE[Any]:
    from sae_lens import SAE

    from ._io import read_json

    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise AquinError(f"SAE directory {path} has no cfg.json (expected SAELens format)")
    cfg = read_json(cfg_path, "SAE config", max_bytes=_MAX_SAE_CONFIG_BYTES)
    check_sae_cfg(cfg, f"SAE config {cfg_path}")
    weights = path / _SAE_WEIGHTS
    if not weights.is_file():
        raise AquinError(f"SAE directory {path} has no {_SAE_WEIGHTS}")
    _check_sae_shapes(cfg, _declared_shapes(weights), str(weights))
    try:
        with _quiet_processing_hint():
            sae = SAE.load_from_disk(str(path), device=device)
    except (KeyError, ValueError, RuntimeError, OSError, TypeError, AttributeError) as error:
        raise AquinError(f"cannot load SAE from {path}: {_first_line(error)}") from None
    check_sae_values(sae, str(weights))
    return sae


def _declared_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:  # type: ignore[no-untyped-call]
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AquinError(
            f"cannot read SAE weights {weights}: not a valid safetensors file ({error})"
        ) from None


def check_sae_cfg(cfg: Any, where: str) -> None:
    """Refuse a SAELens cfg that is not an object or whose sizes are not sane integers."""
    if not isinstance(cfg, dict):
        kind = "array" if isinstance(cfg, list) else type(cfg).__name__
        raise AquinError(f"{where} holds a JSON {kind}, expected an object")
    for key, limit in (("d_in", MAX_SAE_D_IN), ("d_sae", MAX_SAE_D_SAE)):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise AquinError(f"{where}: {key} is {value!r}, expected an integer from 1 to {limit}")
    for key in ("architecture", "dtype", "hook_name"):
        if key in cfg and not isinstance(cfg[key], str):
            raise AquinError(f"{where}: {key} is {cfg[key]!r}, expected a string")
    if "metadata" in cfg and not isinstance(cfg["metadata"], (dict, type(None))):
        raise AquinError(
            f"{where}: metadata is a {type(cfg['metadata']).__name__}, expected an object"
        )


def _check_sae_shapes(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The encoder and decoder must have the sizes the cfg states (before SAELens allocates)."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", d_in)
    if "W_dec" not in shapes:
        raise AquinError(f"SAE weights {source} have no W_dec tensor")
    wanted = {"W_dec": (d_sae, d_out), "W_enc": (d_in, d_sae)}
    for key, shape in wanted.items():
        if key in shapes and tuple(shapes[key]) != shape:
            raise AquinError(
                f"SAE tensor {key} has shape {tuple(shapes[key])} in {source} but cfg "
                f"d_in={d_in}, d_sae={d_sae} needs {shape}"
            )


def check_sae_values(sae: Any, source: str) -> None:
    """Refuse an SAE whose parameters hold NaN, inf or absurd magnitudes, naming the tensor."""
    from ._checkpoints import check_plain_tensors, check_tensor_values

    state = sae.state_dict()
    check_plain_tensors(state, f"SAE {source}")
    for key, tensor in state.items():
        check_tensor_values(key, tensor, f"SAE {source}")


def _load_sae_pt(path: Path, device: str) -> SAE[Any]:
    from ._checkpoints import _torch_load

    payload = _torch_load(path)
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("cfg"), dict)
        or not isinstance(payload.get("state_dict"), dict)
    ):
        raise AquinError(f"SAE file {path} must hold {{'cfg': {{...}}, 'state_dict': {{...}}}}")
    return sae_from_cfg_and_state(
        payload["cfg"], payload["state_dict"], source=str(path), device=device
    )


def sae_from_cfg_and_state(
    cfg: dict[str, Any], state_dict: dict[str, torch.Tensor], *, source: str, device: str = "cpu"
) -> SAE[Any]:
    """Build an inference ``SAE`` from a SAELens cfg dict and its tensors, checking shapes.

    The cfg's sizes are checked against the tensors before the SAE is built, so a
    cfg claiming ``d_sae=10**12`` allocates nothing; NaN, inf and absurd values
    are refused naming the tensor.
    """
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEConfig

    from ._checkpoints import check_plain_tensors

    check_sae_cfg(cfg, f"SAE file {source} cfg")
    check_plain_tensors(state_dict, f"SAE file {source}")
    _check_sae_shapes(cfg, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    cfg = dict(cfg)
    cfg.setdefault("architecture", "standard")
    cfg["device"] = device
    try:
        sae_cls = SAE.get_sae_class_for_architecture(cfg["architecture"])
        sae_cfg = SAEConfig.from_dict(cfg)
        with _quiet_processing_hint():
            sae = sae_cls(sae_cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AquinError(f"SAE file {source} has an invalid cfg: {_first_line(error)}") from None
    expected = sae.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise AquinError(f"SAE file {source} is missing tensor {key} {tuple(tensor.shape)}")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise AquinError(
                f"SAE tensor {key} has shape {tuple(state_dict[key].shape)} in {source} but "
                f"cfg d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} needs {tuple(tensor.shape)}"
            )
    sae.load_state_dict({key: state_dict[key] for key in expected})
    check_sae_values(sae, source)
    return sae


def _from_registry(release: str, sae_id: str, device: str) -> SAE[Any]:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise AquinError(f"unknown SAELens release {release!r}")
    if sae_id not in directory[release].saes_map:
        raise AquinError(f"release {release} has no SAE with id {sae_id!r}")
    from ._hub import hub_reachable, require_hub

    if not hub_reachable():
        try:  # offline: the local cache may still hold it
            with _quiet_processing_hint(), _offline():
                cached = SAE.from_pretrained(release, sae_id, device=device)
        except Exception:  # not cached
            require_hub(f"SAE {release}:{sae_id}")
        else:
            check_sae_values(cached, f"{release}:{sae_id}")
            return cached
    try:
        with _quiet_processing_hint():
            sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as error:  # hub clients raise many types; all mean "could not fetch"
        raise AquinError(
            f"cannot fetch SAE {release}:{sae_id} from the hub ({_first_line(error)}); "
            f"offline, use the embedded tiny-gpt2 or a local SAE directory"
        ) from None
    check_sae_values(sae, f"{release}:{sae_id}")
    return sae


def check_sae_fits(sae: Any, d_model: int, n_layers: int, layer: int, model_label: str) -> None:
    d_in = int(sae.W_dec.shape[1])
    if d_in != d_model:
        raise AquinError(f"SAE d_in {d_in} does not match {model_label}'s d_model {d_model}")
    if not 0 <= layer < n_layers:
        raise AquinError(
            f"layer {layer} is out of range: {model_label} has {n_layers} layers (0-{n_layers - 1})"
        )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Cache-only hub access for one call (huggingface_hub reads this flag per request)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


@contextlib.contextmanager
def _quiet_processing_hint() -> Iterator[None]:
    """SAELens warns to load the model with the SAE's processing kwargs; sae_diff does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*non-empty model_from_pretrained_kwargs")
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


ENCODE_BYTES = 128 * 2**20  # feature activations `encode` asks SAELens for at a time


@torch.no_grad()
def encode(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """``sae.encode(x)`` over chunks of rows, each at most `ENCODE_BYTES` of activations.

    SAELens's encode holds two ``[rows, d_sae]`` arrays beside its result (the
    product, then the bias added, then the activation): a dashboards batch of
    16 x 128 tokens at 65,536 features is 537 MB each. A `sae_diff` batch (a few
    hundred tokens) stays one call. Every SAE architecture encodes each row on its
    own (TopK's k is per row), so the chunks, written into one result, equal the
    single call up to float rounding (a product of fewer rows may sum in another
    order). Input whose last axis is not the SAE's ``d_in`` (a hook_z SAE that
    reshapes heads itself) is passed through whole.
    """
    d_sae, d_in = (int(n) for n in sae.W_dec.shape)
    if x.shape[-1] != d_in:
        return sae.encode(x)
    rows = x.reshape(-1, d_in)
    step = max(1, ENCODE_BYTES // (4 * d_sae))
    if len(rows) <= step:
        return sae.encode(x)
    first = sae.encode(rows[:step])
    out = torch.empty((len(rows), *first.shape[1:]), dtype=first.dtype, device=first.device)
    out[:step] = first
    del first
    for start in range(step, len(rows), step):
        out[start : start + step] = sae.encode(rows[start : start + step])
    return out.reshape(*x.shape[:-1], *out.shape[1:])


# Below this fraction of nonzero feature activations, `decode` multiplies a sparse
# copy of them: at 24,576 features and ~64 active per token it is about 2x faster.
SPARSE_DECODE_DENSITY = 0.05
DENSITY_SAMPLE_ROWS = 32


def sparse_features(features: torch.Tensor) -> torch.Tensor:
    """``features`` ``[tokens, d_sae]`` as a coalesced sparse COO tensor when few are
    nonzero (on the CPU, under `SPARSE_DECODE_DENSITY`), else ``features`` itself.

    `decode` and `aquin_nb._stats.PairedFeatureStats.update` take either layout, and
    then cost what the nonzero entries cost rather than what the whole array does;
    the dense array can be dropped as soon as this returns.

    Example:
        >>> f = torch.zeros(4, 1000); f[1, 7] = 2.0
        >>> sparse_features(f).is_sparse, sparse_features(torch.ones(4, 10)).is_sparse
        (True, False)
    """
    if features.ndim == 2 and features.device.type == "cpu" and features.numel():
        # the first rows screen out a dense batch cheaply; the conversion's own count
        # decides (no separate pass over the whole array to count)
        sample = features[:DENSITY_SAMPLE_ROWS]
        if float(torch.count_nonzero(sample)) / sample.numel() >= SPARSE_DECODE_DENSITY:
            return features
        sparse = features.to_sparse()
        if sparse._nnz() / features.numel() < SPARSE_DECODE_DENSITY:
            return sparse
    return features


@torch.no_grad()
def decode(sae: Any, features: torch.Tensor) -> torch.Tensor:
    """``sae.decode(features)``, through a sparse copy of ``features`` when few are nonzero.

    ``features`` may already be sparse (`sparse_features`); half-precision ones are
    decoded dense (torch has no sparse half-precision product on the CPU). SAELens's
    decode starts with ``features @ W_dec``, which torch runs on a sparse CSR matrix
    as well; the rest of it (``b_dec``, hooks, out-normalisation) is unchanged. The
    result equals the dense decode up to float summation order.
    """
    if features.dtype not in (torch.float32, torch.float64):  # no sparse CPU kernel
        return sae.decode(features.to_dense() if features.is_sparse else features)
    features = sparse_features(features) if not features.is_sparse else features
    if features.is_sparse:
        # COO, then CSR: CSR's product is faster and converting from sorted COO is
        # cheap (254 x 24,576 at 64 a row: 5.8 ms against 9.9 through COO alone)
        with warnings.catch_warnings():  # torch calls its CSR tensors beta, once
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            return sae.decode(features.to_sparse_csr())
    return sae.decode(features)
