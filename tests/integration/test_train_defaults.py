"""``loraplex train`` with no hyperparameter flags learns a small task the base cannot know,
and the eval gate tells a real improvement from a planted regression.

Ten made-up people, each with a made-up birthplace, asked six ways (60 rows); the adapter is
then asked in phrasings it never saw, and must name the place (greedy, transformers +
PEFT, prompted the way the manifest says it was trained). Once as chat rows with
``--eval-data --push`` (best checkpoint kept; the gate runs against the base and passes),
once as ``{"input", "output"}`` rows (trained as chat by default). Then the same questions
with shuffled answers, trained briefly and pushed as v2: ``loraplex eval`` (real vLLM engine,
fast-LoRA plugin on) fails it against v1, ``promote`` refuses it, ``--force`` is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FACTS = [
    ("Velmora Trask", "Quindale"),
    ("Odrin Pelkwist", "Marrowgate"),
    ("Sefa Ullanby", "Brenthollow"),
    ("Caspian Drevoe", "Kettleburrow"),
    ("Ilsa Mornquill", "Ashcombe Reach"),
    ("Tobin Vashte", "Lindqvar"),
    ("Renna Obbisford", "Ploverstead"),
    ("Gideon Harrowmere", "Zennick Falls"),
    ("Marisol Quenby", "Dunhallow"),
    ("Ptolemy Skarr", "Wexmoor"),
]
TRAIN_QUESTIONS = [
    "Where was {p} born?",
    "What is the birthplace of {p}?",
    "In which town was {p} born?",
    "Tell me where {p} was born.",
    "{p} was born where?",
    "Which place is {p}'s hometown?",
]
EVAL_QUESTIONS = ["Do you know the town {p} was born in?"]
TEST_QUESTIONS = [
    "What town did {p} come into the world in?",
    "Name the birthplace of {p}.",
    "Can you tell me {p}'s place of birth?",
]
MIN_ACCURACY = 0.8


def answer(person: str, place: str) -> str:
    return f"{person} was born in {place}."


def write_rows(
    path: Path, questions: list[str], shape: str, facts: list[tuple[str, str]] = FACTS
) -> Path:
    rows = []
    for person, place in facts:
        for question in questions:
            q, a = question.format(p=person), answer(person, place)
            if shape == "chat":
                row = {"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]}  # fmt: skip
            else:
                row = {"input": q, "output": a}
            rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def accuracy(adapter: Path, base_model_dir: Path) -> float:
    """Share of never-trained questions whose greedy answer names the right place."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = json.loads((adapter / "loraplex.json").read_text())["prompt_format"] == "chat"
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    right = total = 0
    for person, place in FACTS:
        for question in TEST_QUESTIONS:
            q = question.format(p=person)
            if chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            else:
                ids = tokenizer(q, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=16, do_sample=False)
            reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            right += place in reply
            total += 1
    return right / total


def loraplex(
    args: list[str], home: Path, base_model_dir: Path, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_BASE_MODEL": str(base_model_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", *args],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@dataclass(frozen=True)
class Trained:
    """The chat-data run: its adapter folder, registry home, held-out file and output."""

    out: Path
    home: Path
    held_out: Path
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def trained_chat(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Trained:
    """Chat rows, defaults, held-out eval data, pushed: the gate runs inside ``train``."""
    tmp = tmp_path_factory.mktemp("chat")
    data = write_rows(tmp / "train.jsonl", TRAIN_QUESTIONS, "chat")
    held_out = write_rows(tmp / "eval.jsonl", EVAL_QUESTIONS, "chat")
    out, home = tmp / "facts", tmp / "home"
    args = ["train", "--data", str(data), "--name", "facts", "--output", str(out)]
    done = loraplex([*args, "--eval-data", str(held_out), "--push"], home, base_model_dir)
    return Trained(out, home, held_out, done)


def check_defaults(out: Path, done: subprocess.CompletedProcess[str], shape: str) -> None:
    doc = json.loads((out / "loraplex.json").read_text())
    hyper, results = doc["hyperparameters"], doc["results"]
    assert doc["prompt_format"] == "chat"
    assert set(hyper["auto"]) == {"batch_size", "grad_accum", "epochs"}
    assert hyper["steps"] >= 100
    assert f"{hyper['steps']} optimizer steps" in done.stderr and "auto:" in done.stderr
    if shape == "chat":
        losses = {e["step"]: e["eval_loss"] for e in results["eval_history"]}
        assert results["best_step"] in losses
        assert results["eval_loss"] == pytest.approx(min(losses.values()), rel=1e-4)


@pytest.mark.parametrize("shape", ["chat", "input-output"])
def test_defaults_learn_held_out_phrasings(
    shape: str, tmp_path: Path, base_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    if shape == "chat":
        trained: Trained = request.getfixturevalue("trained_chat")
        out, done = trained.out, trained.done
    else:
        data = write_rows(tmp_path / "train.jsonl", TRAIN_QUESTIONS, shape)
        out = tmp_path / "facts"
        args = ["train", "--data", str(data), "--name", "facts", "--output", str(out)]
        done = loraplex(args, tmp_path / "home", base_model_dir)
    check_defaults(out, done, shape)
    score = accuracy(out, base_model_dir)
    hyper = json.loads((out / "loraplex.json").read_text())["hyperparameters"]
    print(f"{shape}: {score:.2f} right on never-trained phrasings, {hyper['steps']} steps")
    assert score >= MIN_ACCURACY, score


def test_the_gate_passes_an_improvement_and_blocks_a_planted_regression(
    trained_chat: Trained, tmp_path: Path, base_model_dir: Path
) -> None:
    home, held_out = trained_chat.home, trained_chat.held_out
    # train --push --eval-data: facts@v1 (first version, its own stable) against the base
    assert "facts@v1 may be promoted" in trained_chat.done.stdout, trained_chat.done.stdout
    # a planted regression: every person given the next person's birthplace
    places = [place for _, place in FACTS]
    shuffled = list(zip([p for p, _ in FACTS], places[1:] + places[:1], strict=True))
    data = write_rows(tmp_path / "shuffled.jsonl", TRAIN_QUESTIONS, "chat", shuffled)
    args = ["train", "--data", str(data), "--name", "facts", "--output", str(tmp_path / "bad")]
    loraplex([*args, "--epochs", "2", "--batch-size", "4", "--grad-accum", "1", "--push"],
             home, base_model_dir)  # fmt: skip
    gate = loraplex(["eval", "facts@v2", "--data", str(held_out)], home, base_model_dir, ok=False)
    print(gate.stdout)
    assert gate.returncode == 1, gate.stderr[-3000:]
    assert "FAIL" in gate.stdout and "facts@v2 may not be promoted" in gate.stdout

    refused = loraplex(["adapters", "promote", "facts@v2"], home, base_model_dir, ok=False)
    assert refused.returncode == 2
    assert f"loraplex eval facts@v2 --data {held_out} --against facts@v1" in refused.stderr
    loraplex(["adapters", "promote", "facts@v1", "--alias", "canary"], home, base_model_dir)
    forced = loraplex(["adapters", "promote", "facts@v2", "--force"], home, base_model_dir)
    assert forced.stdout == "facts:stable -> facts@v2 (was facts@v1)\n"

    shown = json.loads(
        loraplex(["adapters", "show", "facts", "--json"], home, base_model_dir).stdout
    )
    sha = hashlib.sha256(held_out.read_bytes()).hexdigest()
    verdicts = {(e["number"], e["reference"]): e for e in shown["evals"] if e["suite"] == "gate"}
    good, bad = verdicts[(1, "base")], verdicts[(2, "facts@v1")]
    assert good["passed"] is True and bad["passed"] is False
    for verdict in (good, bad):
        assert verdict["data_sha256"] == sha and len(verdict["base_fingerprint"]) == 64
        assert verdict["metrics"]["decided_by"] == "token_f1"
    assert good["metrics"]["candidate"]["token_f1"] > good["metrics"]["reference"]["token_f1"]
    assert bad["metrics"]["relative_drop"] > 0.02
    moves = [(e["alias"], e["to_number"], e["forced"]) for e in shown["events"]]
    assert moves[-2:] == [("canary", 1, False), ("stable", 2, True)]
    assert shown["events"][-1]["by"]
