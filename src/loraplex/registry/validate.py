"""Validation of a PEFT LoRA adapter folder against the registry's base model.

Everything is checked before anything is stored: the name, the files (safetensors only, a
pickle ``.bin`` is refused and never opened), the total size, ``adapter_config.json``, the
optional ``loraplex.json`` manifest's base fingerprint, the safetensors header (bounded),
every tensor's name and shape against the base's layers, and finite values. Each problem
raises a loraplex error whose message names it. This module does not store anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, check_name
from loraplex.errors import IncompatibleAdapter, InvalidAdapter, TooLarge
from loraplex.registry.basedims import BaseDims
from loraplex.registry.tensorfile import FLOAT_DTYPES, nonfinite_tensors, read_header

if TYPE_CHECKING:
    from loraplex.basemodel import BaseModelInfo
    from loraplex.config import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_JSON_BYTES = 1 << 20
_TENSOR_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
# adapter_config.json features vLLM cannot serve: each must be absent, null, false or empty.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (extra full layers)",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "lora_bias": "lora_bias",
}


@dataclass(frozen=True)
class BaseSpec:
    """What adapters must fit: the base's fingerprint and layer dims, and server limits."""

    fingerprint: str
    dims: BaseDims
    name: str = "base"
    max_rank: int = 64
    max_bytes: int = 1 << 30

    @classmethod
    def of(cls, info: BaseModelInfo, settings: Settings) -> BaseSpec:
        """The spec of a prepared base, with the rank and size limits of ``settings``."""
        return cls(
            fingerprint=info.fingerprint,
            dims=BaseDims.from_model_dir(info.path),
            name=info.name,
            max_rank=settings.max_lora_rank,
            max_bytes=settings.max_adapter_mb * 2**20,
        )


@dataclass(frozen=True)
class CheckedAdapter:
    """A validated adapter: the files to store and the metadata to record."""

    files: dict[str, Path]
    size: int
    rank: int  # the largest LoRA rank in the adapter (r, or a larger rank_pattern entry)
    alpha: float
    target_modules: list[str]
    manifest: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def validate_adapter(folder: Path, name: str, base: BaseSpec) -> CheckedAdapter:
    """Check ``folder`` as adapter ``name`` for ``base``; raise on the first problem found."""
    check_name(name)
    files = collect_files(folder)
    size = check_size(files, name, base.max_bytes)
    config = _read_json(files[CONFIG_FILE])
    manifest = _read_json(files[MANIFEST_FILE]) if MANIFEST_FILE in files else None
    rank, alpha, top = _check_config(config, base)
    if manifest is not None:
        _check_manifest(manifest, base)
    modules = _check_tensors(files[WEIGHTS_FILE], config, rank, base)
    return CheckedAdapter(files, size, top, alpha, modules, manifest, config)


def check_size(files: dict[str, Path], name: str, max_bytes: int) -> int:
    """Total size of the files; ``TooLarge`` past ``max_bytes``."""
    size = sum(path.stat().st_size for path in files.values())
    if size > max_bytes:
        raise TooLarge(
            f"Adapter {name!r} is {size:,} bytes, over the {max_bytes:,}-byte limit "
            f"(LORAPLEX_MAX_ADAPTER_MB={max_bytes / 2**20:g}); "
            "lower its rank or target fewer modules."
        )
    return size


def collect_files(folder: Path) -> dict[str, Path]:
    """The files to store; refuses pickles and a missing config or weights file."""
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; give the folder save_pretrained wrote.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(
            f"{folder} holds pickle weights ({', '.join(pickles)}); loraplex never unpickles. "
            "Re-save it with save_pretrained(..., safe_serialization=True) and remove them."
        )
    names = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)
    files = {n: folder / n for n in names if (folder / n).is_file()}
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise InvalidAdapter(f"{folder} has no {required}; a PEFT LoRA adapter needs it.")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InvalidAdapter(f"{path.name} is larger than {MAX_JSON_BYTES} bytes.")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidAdapter(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object.")
    return data


def _check_config(config: dict[str, Any], base: BaseSpec) -> tuple[int, float, int]:
    """PEFT LoRA type, supported features, rank within the server's maximum.

    Returns ``(r, lora_alpha, largest rank including rank_pattern)``."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"adapter_config.json has peft_type {peft_type!r}; only LoRA adapters are served."
        )
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapter(f"adapter_config.json uses {feature}, which vLLM cannot serve.")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter("adapter_config.json has bias != 'none', which vLLM cannot serve.")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"adapter_config.json has an invalid rank r={rank!r}.")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapter(f"adapter_config.json has an invalid lora_alpha={alpha!r}.")
    pattern_ranks = list((config.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in pattern_ranks):
        raise InvalidAdapter("adapter_config.json has an invalid rank_pattern.")
    top = max([rank, *pattern_ranks])
    if top > base.max_rank:
        raise IncompatibleAdapter(
            f"Adapter rank {top} exceeds the server's maximum LoRA rank {base.max_rank} "
            "(LORAPLEX_MAX_LORA_RANK); retrain with a smaller r or raise the limit."
        )
    return rank, float(alpha), top


def _check_manifest(manifest: dict[str, Any], base: BaseSpec) -> None:
    """A loraplex-trained adapter names its base; it must be this registry's base."""
    trained_on = manifest.get("base_fingerprint")
    if trained_on is not None and trained_on != base.fingerprint:
        raise IncompatibleAdapter(
            f"Adapter was trained on a different base model (fingerprint {str(trained_on)[:12]}), "
            f"the base here is {base.name} (fingerprint {base.fingerprint[:12]}); "
            "retrain it on this base."
        )


def _targets(config: dict[str, Any], dims: BaseDims) -> set[str]:
    """Full module paths of the base that the config's target_modules select."""
    paths = dims.module_paths()
    targets = config.get("target_modules")
    if targets == "all-linear":
        return set(paths)
    if isinstance(targets, str):
        try:
            return {p for p in paths if re.fullmatch(targets, p)}
        except re.error as exc:
            raise InvalidAdapter(f"target_modules regex {targets!r} is invalid: {exc}") from None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter("adapter_config.json target_modules must be a non-empty list.")
    selected = set()
    for target in targets:
        hits = {p for p in paths if p == target or p.endswith("." + target)}
        if not hits:
            raise IncompatibleAdapter(
                f"Target module {target!r} does not exist in the base model "
                f"(LoRA-able modules: {', '.join(sorted(set(paths.values())))})."
            )
        selected |= hits
    return selected


def _rank_for(module: str, config: dict[str, Any], rank: int) -> int:
    """The rank PEFT gives ``module``: a matching rank_pattern entry, else r."""
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(value)
    return rank


def _check_tensors(weights: Path, config: dict[str, Any], rank: int, base: BaseSpec) -> list[str]:
    """Every tensor is a lora_A/lora_B of a targeted base layer, with that layer's shape."""
    header = read_header(weights)
    paths, shapes = base.dims.module_paths(), base.dims.module_shapes()
    targets = _targets(config, base.dims)
    seen: dict[str, set[str]] = {}
    for info in header.tensors.values():
        match = _TENSOR_RE.fullmatch(info.name)
        if not match:
            raise InvalidAdapter(
                f"Tensor {info.name!r} is not a LoRA weight of the form "
                "base_model.model.<module>.lora_A|lora_B.weight."
            )
        module, kind = match["module"], match["kind"]
        if module not in paths:
            raise IncompatibleAdapter(
                f"Tensor {info.name!r} adapts {module}, which the base model does not have."
            )
        if module not in targets:
            raise InvalidAdapter(f"Tensor {info.name!r} adapts {module}, not in target_modules.")
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"Tensor {info.name!r} has dtype {info.dtype}; LoRA needs floats.")
        in_features, out_features = shapes[paths[module]]
        r = _rank_for(module, config, rank)
        expected = (r, in_features) if kind == "lora_A" else (out_features, r)
        if info.shape != expected:
            raise IncompatibleAdapter(
                f"Tensor {info.name!r} has shape {list(info.shape)}, the base model needs "
                f"{list(expected)} (rank {r}); was it trained on another base model?"
            )
        seen.setdefault(module, set()).add(kind)
    if not seen:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors.")
    half = sorted(m for m, kinds in seen.items() if kinds != {"lora_A", "lora_B"})
    if half:
        raise InvalidAdapter(f"Module {half[0]} has only one of lora_A/lora_B.")
    _cross_check(weights)
    bad = nonfinite_tensors(header)
    if bad:
        raise InvalidAdapter(f"Tensor {bad[0]!r} contains NaN or Inf values ({len(bad)} such).")
    return sorted({paths[m] for m in seen})


def _cross_check(weights: Path) -> None:
    """Let the safetensors library open the (already bounded) file as a second opinion."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - any failure of the reference reader is a refusal
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
