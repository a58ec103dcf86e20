"""``loraplex.json``: what an adapter folder was trained from and how.

Written last into the adapter folder, so its presence means the adapter is complete. It
records the base model (name, fingerprint), the prompt format the adapter was trained for
(``prompt_format``: ``chat`` or ``completion``), the data (sha256, examples, shapes), the
hyperparameters (with the chosen schedule and which parts of it were "auto"), the losses
(with the eval history and best step when there was eval data), and the versions of torch,
transformers and peft. The registry reads it on push (``adapters show`` prints the format);
``loraplex.train.demo`` reads it to skip finished adapters. This module reads and writes
the JSON; it does not train.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_FILE = "loraplex.json"
SCHEMA = 1


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an adapter."""
    versions = {}
    for dist in ("loraplex", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def build(
    *,
    name: str,
    prompt_format: str,
    base: dict[str, str],
    data: dict[str, Any],
    hyperparameters: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The manifest as a dict (``write`` stores it)."""
    return {
        "schema": SCHEMA,
        "name": name,
        "prompt_format": prompt_format,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_fingerprint": base["fingerprint"],
        "base": base,
        "data_sha256": data["train"]["sha256"],
        "data": data,
        "hyperparameters": hyperparameters,
        "results": results,
        "versions": library_versions(),
    }


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``loraplex.json`` atomically (temp file, then rename)."""
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or ``None`` if it has none or it cannot be parsed."""
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
