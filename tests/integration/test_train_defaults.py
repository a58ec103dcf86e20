"""``loraplex train`` with no hyperparameter flags learns a small task the base cannot know.

Ten made-up people, each with a made-up birthplace, asked six ways (60 rows); the adapter is
then asked in phrasings it never saw, and must name the place (greedy, transformers +
PEFT, prompted the way the manifest says it was trained). Once as chat rows with
``--eval-data`` (best checkpoint kept), once as ``{"input", "output"}`` rows (trained as chat
by default).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def write_rows(path: Path, questions: list[str], shape: str) -> Path:
    rows = []
    for person, place in FACTS:
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


def train(args: list[str], home: Path, base_model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_BASE_MODEL": str(base_model_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "train", *args],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("shape", ["chat", "input-output"])
def test_defaults_learn_held_out_phrasings(
    shape: str, tmp_path: Path, base_model_dir: Path
) -> None:
    data = write_rows(tmp_path / "train.jsonl", TRAIN_QUESTIONS, shape)
    out = tmp_path / "facts"
    args = ["--data", str(data), "--name", "facts", "--output", str(out)]
    if shape == "chat":
        held_out = write_rows(tmp_path / "eval.jsonl", EVAL_QUESTIONS, shape)
        args += ["--eval-data", str(held_out)]
    done = train(args, tmp_path / "home", base_model_dir)

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
    score = accuracy(out, base_model_dir)
    print(f"{shape}: {score:.2f} right on never-trained phrasings, {hyper['steps']} steps")
    assert score >= MIN_ACCURACY, score
