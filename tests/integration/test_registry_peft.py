"""Real PEFT adapters on the bundled base model, pushed through the ``loraplex`` command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.adapters import LINEAR_PROJECTIONS
from loraplex.basemodel import describe
from loraplex.testing.random_adapters import make_random_adapters

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def peft_adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("peft")
    settings = {
        "small": {"seed": 1, "rank": 4, "targets": ("q_proj", "v_proj")},
        "full": {"seed": 2, "rank": 8},
        "big": {"seed": 3, "rank": 32, "targets": ("q_proj",)},
    }
    return {
        name: make_random_adapters(base_model_dir, [root / name], **kwargs)[0]
        for name, kwargs in settings.items()
    }


@pytest.fixture
def env(tmp_path: Path, base_model_dir: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return {
        **clean,
        "LORAPLEX_HOME": str(tmp_path / "home"),
        "LORAPLEX_BASE_MODEL": str(base_model_dir),
        "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_USER": "ci",
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "adapters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_show_through_the_cli(
    env: dict[str, str], peft_adapters: dict, base_model_dir: Path
) -> None:
    first = cli(env, "push", str(peft_adapters["small"]), "--name", "sales", "--tenant", "acme")
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"sales@v1 [0-9a-f]{64}\n", first.stdout)
    again = cli(env, "push", str(peft_adapters["small"]), "--name", "sales")
    assert again.stdout == first.stdout and "identical content" in again.stderr
    second = cli(env, "push", str(peft_adapters["full"]), "--name", "sales")
    assert second.stdout.startswith("sales@v2 "), second.stderr
    shown = json.loads(cli(env, "show", "sales", "--json").stdout)
    v1, v2 = shown["versions"]
    assert (v1["rank"], v1["alpha"], v1["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])
    assert (v2["rank"], v2["target_modules"]) == (8, sorted(LINEAR_PROJECTIONS))
    assert v1["base_fingerprint"] == describe(base_model_dir).fingerprint
    assert v1["created_by"] == "ci" and v1["tenant"] == "acme" and v2["tenant"] == "acme"
    assert shown["aliases"] == {"stable": "sales@v1"}


def test_trained_on_another_base_is_refused(
    env: dict[str, str], peft_adapters: dict, tmp_path: Path
) -> None:
    """The "trained on Llama-3, served on Llama-3.1" failure: same shapes, other weights."""
    folder = shutil.copytree(peft_adapters["small"], tmp_path / "other-base")
    (folder / "loraplex.json").write_text(json.dumps({"base_fingerprint": "0" * 64}))
    result = cli(env, "push", str(folder), "--name", "sales")
    assert result.returncode == 2
    assert "error: Adapter was trained on a different base model" in result.stderr
    assert json.loads(cli(env, "list", "--json").stdout) == []


def test_manifest_of_this_base_is_recorded(
    env: dict[str, str], peft_adapters: dict, tmp_path: Path, base_model_dir: Path
) -> None:
    folder = shutil.copytree(peft_adapters["small"], tmp_path / "trained")
    manifest = {"base_fingerprint": describe(base_model_dir).fingerprint, "epochs": 1}
    (folder / "loraplex.json").write_text(json.dumps(manifest))
    assert cli(env, "push", str(folder), "--name", "trained").returncode == 0
    shown = json.loads(cli(env, "show", "trained", "--json").stdout)
    assert shown["versions"][0]["manifest"] == manifest


def test_rank_above_the_server_max_is_refused(env: dict[str, str], peft_adapters: dict) -> None:
    result = cli(env, "push", str(peft_adapters["big"]), "--name", "big")
    assert result.returncode == 2
    assert "Adapter rank 32 exceeds the server's maximum LoRA rank 16" in result.stderr


def test_adapter_of_another_architecture_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    """No manifest: a PEFT adapter made for a different model is caught by its shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "tiny-llama"
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(other)
    (folder,) = make_random_adapters(
        other, [tmp_path / "foreign"], seed=4, rank=4, targets=("q_proj",)
    )
    result = cli(env, "push", str(folder), "--name", "foreign")
    assert result.returncode == 2
    assert "has shape [4, 128], the base model needs [4, 576]" in result.stderr
