"""``loraplex train`` on the real bundled model (CPU, fp32): a made-up task the base model
cannot do is learned (eval loss drops; served answers to held-out items are right far more
often than the base model's), ``--push`` registers a new version, bad data is refused with
every line number and trains nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loraplex.adapters import LINEAR_PROJECTIONS

pytestmark = pytest.mark.integration

WORDS = [
    "apple",
    "river",
    "candle",
    "garden",
    "pencil",
    "rocket",
    "silver",
    "window",
    "guitar",
    "planet",
    "basket",
    "forest",
    "mirror",
    "button",
    "dragon",
    "island",
    "jacket",
    "ladder",
    "marble",
    "orange",
    "pillow",
    "rabbit",
    "saddle",
    "tiger",
    "violin",
    "wallet",
    "yellow",
    "zebra",
    "anchor",
    "bottle",
    "cactus",
    "dolphin",
    "engine",
    "falcon",
    "hammer",
    "igloo",
    "jungle",
    "kettle",
    "lemon",
    "magnet",
    "needle",
    "oyster",
    "parrot",
    "quartz",
    "ribbon",
    "spider",
    "tunnel",
    "umbrella",
    "velvet",
    "walnut",
    "bucket",
    "castle",
    "donkey",
    "feather",
    "goblet",
    "helmet",
    "insect",
    "kitten",
    "lantern",
    "meadow",
    "napkin",
    "pebble",
    "shovel",
    "teapot",
    "unicorn",
    "walrus",
    "blanket",
    "cookie",
    "harbor",
    "pirate",
    "summit",
    "tractor",
]
TRAIN_WORDS, EVAL_WORDS, HELD_OUT = WORDS[:48], WORDS[48:56], WORDS[56:72]


def prompt(word: str) -> str:
    return f"Wrap: {word}\n"


def answer(word: str) -> str:
    return f"[[ {word} ]]"


def write_jsonl(path: Path, words: list[str]) -> Path:
    rows = [json.dumps({"input": prompt(w), "output": answer(w)}) for w in words]
    path.write_text("\n".join(rows) + "\n")
    return path


def loraplex(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def wrap(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> dict:
    """Train the ``wrap`` adapter once through the CLI, with --push into a fresh registry."""
    root = tmp_path_factory.mktemp("train-wrap")
    env = {"LORAPLEX_HOME": str(root / "home"), "LORAPLEX_BASE_MODEL": str(base_model_dir)}
    out = root / "wrap"
    args = ["train", "--data", str(write_jsonl(root / "train.jsonl", TRAIN_WORDS)),
            "--eval-data", str(write_jsonl(root / "eval.jsonl", EVAL_WORDS)),
            "--name", "wrap", "--output", str(out), "--push", "--batch-size", "8",
            "--grad-accum", "1", "--lr", "1e-3", "--epochs", "3", "--seed", "0",
            "--format", "completion"]  # fmt: skip
    done = loraplex(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"path": out, "stdout": done.stdout, "stderr": done.stderr, "env": env}


def test_adapter_folder_and_manifest(wrap: dict, base_model_dir: Path) -> None:
    out: Path = wrap["path"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraplex.json",
    ]
    doc = json.loads((out / "loraplex.json").read_text())
    base = json.loads((base_model_dir / "loraplex-base.json").read_text())
    assert doc["base_fingerprint"] == base["fingerprint"]
    assert doc["data"]["train"]["examples"] == len(TRAIN_WORDS)
    assert len(doc["data"]["train"]["sha256"]) == 64
    assert doc["hyperparameters"]["r"] == 16 and doc["hyperparameters"]["alpha"] == 32
    assert doc["hyperparameters"]["precision"] == "fp32"
    assert doc["prompt_format"] == doc["hyperparameters"]["prompt_format"] == "completion"
    assert doc["hyperparameters"]["auto"] == []
    assert {"torch", "transformers", "peft"} <= set(doc["versions"])
    results = doc["results"]
    assert results["eval_loss"] < results["eval_loss_before"] / 4
    assert results["final_train_loss"] < results["first_train_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert set(config["target_modules"]) == set(LINEAR_PROJECTIONS)
    assert wrap["stdout"].splitlines()[0] == str(out)
    assert "loss" in wrap["stderr"] and "ETA" in wrap["stderr"]


def test_push_registers_a_new_version_without_promoting_it(wrap: dict, tmp_path: Path) -> None:
    key, sha = wrap["stdout"].splitlines()[1].split()
    assert key == "wrap@v1" and len(sha) == 64
    data = write_jsonl(tmp_path / "d.jsonl", TRAIN_WORDS[:8])
    args = ["train", "--data", str(data), "--name", "wrap", "--output", str(tmp_path / "v2"),
            "--push", "--max-steps", "1", "--batch-size", "4", "--seed", "1"]  # fmt: skip
    done = loraplex(args, wrap["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[1].split()[0] == "wrap@v2"
    shown = loraplex(["adapters", "show", "wrap", "--json"], wrap["env"])
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    # the registry points "stable" at a name's first version; a later push moves nothing
    assert record["aliases"] == {"stable": "wrap@v1"}
    assert [v["number"] for v in record["versions"]] == [1, 2]
    text = loraplex(["adapters", "show", "wrap"], wrap["env"]).stdout
    assert [line.split("format=")[1].split()[0] for line in text.splitlines()
            if "format=" in line] == ["completion", "chat"]  # fmt: skip


def completion(url: str, model: str, text: str) -> str:
    body = {"model": model, "prompt": text, "max_tokens": 12, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def test_served_adapter_learned_the_task(wrap: dict, server, adapters_dir: Path) -> None:
    shutil.copytree(wrap["path"], adapters_dir / "wrap-trained")
    right = {"wrap-trained": 0, server.base: 0}
    for word in HELD_OUT:
        for model in right:
            if completion(server.url, model, prompt(word)).strip() == answer(word):
                right[model] += 1
    assert right["wrap-trained"] >= 0.75 * len(HELD_OUT), right
    assert right[server.base] <= 0.1 * len(HELD_OUT), right


def test_bad_data_reports_every_line_and_trains_nothing(
    tmp_path: Path, base_model_dir: Path
) -> None:
    good = json.dumps({"input": "Wrap: cat\n", "output": "[[cat]]"})
    lines = [
        good,
        "{broken",
        json.dumps({"input": "x"}),
        good,
        json.dumps({"input": "x", "output": ""}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"input": "long " * 60, "output": "y"}),
        json.dumps({"input": 3, "output": "y"}),
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    done = loraplex(
        ["train", "--data", str(data), "--name", "bad", "--output", str(out),
         "--base", str(base_model_dir), "--max-seq-len", "32", "--format", "completion"],
        {"LORAPLEX_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert done.returncode != 0
    reported = [int(n) for n in re.findall(r"bad\.jsonl:(\d+):", done.stderr)]
    assert reported == [2, 3, 5, 6, 7, 8], done.stderr
    assert "too long" in done.stderr and "nothing was trained" in done.stderr
    assert not out.exists()


def test_existing_adapter_is_not_overwritten(wrap: dict, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", TRAIN_WORDS[:4])
    args = ["train", "--data", str(data), "--name", "wrap", "--output", str(wrap["path"])]
    done = loraplex(args, wrap["env"])
    assert done.returncode != 0 and "--force" in done.stderr
    done = loraplex([*args, "--resume"], wrap["env"])
    assert done.returncode != 0 and "no checkpoint" in done.stderr
