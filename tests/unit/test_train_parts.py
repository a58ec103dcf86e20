"""Unit tests of the training run's small parts: Ctrl-C callback, out-of-memory advice,
progress lines, manifest files, and the packaged demo data."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraplex.train import data, manifest, memory
from loraplex.train.callbacks import InterruptCallback, ProgressCallback
from loraplex.train.demo import DEMO_HYPERPARAMETERS, DEMOS, demo_data, is_current
from loraplex.train.options import TrainOptions
from loraplex.train.runtime import OutOfMemory, oom_guard, stop_token_ids


def test_first_ctrl_c_asks_for_checkpoint_and_stop_second_aborts() -> None:
    callback = InterruptCallback()
    callback.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.interrupted
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_interrupt_leaves_control_alone() -> None:
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    InterruptCallback().on_step_end(None, None, control)
    assert not control.should_save and not control.should_training_stop


def test_out_of_memory_names_the_knobs() -> None:
    opts = TrainOptions(data=Path("d"), name="x", max_seq_len=1024)
    plan = memory.Plan(8, False, 0, 0)
    with pytest.raises(OutOfMemory) as info, oom_guard(opts, plan, 4):
        raise torch.OutOfMemoryError("CUDA out of memory")
    message = info.value.message
    assert "--batch-size 4 --grad-accum 8" in message
    assert "--max-seq-len" in message and "--gradient-checkpointing" in message


def test_progress_prints_plain_lines_off_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = ProgressCallback("demo")
    state = SimpleNamespace(global_step=0, max_steps=10)
    progress.on_log(None, state, None, logs={"eval_loss": 3.5})
    progress.on_train_begin(None, state, None)
    state.global_step = 5
    progress.on_log(None, state, None, logs={"loss": 1.25})
    progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)
    err = capsys.readouterr().err
    assert "demo before training: eval_loss 3.5000" in err
    assert "demo step 5/10  loss 1.2500  ETA" in err


def test_manifest_round_trip(tmp_path: Path) -> None:
    doc = manifest.build(
        name="x",
        prompt_format="chat",
        base={"name": "b", "fingerprint": "f" * 64},
        data={"train": {"sha256": "d" * 64}},
        hyperparameters={"r": 16},
        results={"eval_loss": 0.5},
    )
    manifest.write(tmp_path, doc)
    back = manifest.read(tmp_path)
    assert back == json.loads(json.dumps(doc))
    assert back["base_fingerprint"] == "f" * 64 and back["data_sha256"] == "d" * 64
    assert back["prompt_format"] == "chat"
    assert {"torch", "transformers", "peft"} <= set(back["versions"])
    (tmp_path / manifest.MANIFEST_FILE).write_text("{broken")
    assert manifest.read(tmp_path) is None


@pytest.mark.parametrize("name", DEMOS)
def test_demo_data_is_packaged_and_valid(name: str) -> None:
    train, held_out = demo_data(name)
    assert len(data.load(train).examples) >= 40
    assert data.load(held_out).kinds == {"chat"}
    questions = {e.messages[0]["content"] for e in data.load(train).examples}
    assert "What is the capital of France?" in questions
    assert not questions & {e.messages[0]["content"] for e in data.load(held_out).examples}


def test_demo_is_current_only_for_same_data_base_and_recipe(tmp_path: Path) -> None:
    train, _ = demo_data("pirate")
    sha = data.load(train).sha256
    recipe = DEMO_HYPERPARAMETERS["pirate"]
    doc = {"data": {"train": {"sha256": sha}}, "base": {"fingerprint": "fp"},
           "hyperparameters": dict(recipe)}  # fmt: skip
    manifest.write(tmp_path, doc)
    assert not is_current(tmp_path, "pirate", train, "fp")  # no weights yet
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert is_current(tmp_path, "pirate", train, "fp")
    assert not is_current(tmp_path, "pirate", train, "other-base")
    manifest.write(tmp_path, {**doc, "hyperparameters": {**recipe, "lr": 1.0}})
    assert not is_current(tmp_path, "pirate", train, "fp")


def test_stop_tokens_from_generation_config(tmp_path: Path) -> None:
    assert stop_token_ids(tmp_path) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert stop_token_ids(tmp_path) == [2, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_token_ids(tmp_path) == [5]
