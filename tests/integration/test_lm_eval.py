"""lm-evaluation-harness scores a multiple-choice task through loraplex (issue 13).

Its ``local-completions`` model sends token-id prompts with ``echo=True, logprobs=1,
max_tokens=1`` and reads the continuation's log-likelihood from the echoed prompt logprobs.
The task is defined here from a local JSON file (nothing downloaded). The run must finish,
and for an adapter its accuracy, and each answer's log-likelihood, must equal what
transformers + PEFT compute on the same tokens in fp32 (8 questions: CI time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
TASK = "loraplex_mc"
ITEMS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["Six", "Eight", "Four", "Ten"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Black"], 2),
    ("Which animal says meow?", ["Dog", "Cow", "Duck", "Cat"], 3),
    ("What is two plus two?", ["Four", "Five", "Three", "Six"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wax paper"], 2),
    ("Which is the largest ocean?", ["Arctic", "Indian", "Atlantic", "Pacific"], 3),
]


def _task_dir(root: Path) -> Path:
    data = root / "items.json"
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in ITEMS]
    data.write_text(json.dumps(rows))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return root


def peft_loglikelihoods(base_model_dir: Path, adapter: Path) -> list[list[float]]:
    """Each item's choices scored by transformers + PEFT in fp32, split as lm-eval splits
    (context tokens, then the rest of context + " " + choice); one right-padded batch."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    pairs = []
    for question, choices, _ in ITEMS:
        context = f"Question: {question}\nAnswer:"
        start = len(tokenizer(context, add_special_tokens=False).input_ids)
        for choice in choices:
            pairs.append(
                (tokenizer(context + " " + choice, add_special_tokens=False).input_ids, start)
            )
    width = max(len(ids) for ids, _ in pairs)
    inputs = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in pairs])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=inputs, attention_mask=mask).logits, -1)
    scores = [
        sum(float(logprobs[row, i - 1, ids[i]]) for i in range(start, len(ids)))
        for row, (ids, start) in enumerate(pairs)
    ]
    return [scores[i : i + 4] for i in range(0, len(scores), 4)]


def test_lm_eval_accuracy_equals_peft(server, base_model_dir, adapters_dir, tmp_path, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": "pirate",
            "base_url": server.url + "/v1/completions",
            "tokenizer": str(base_model_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(_task_dir(tmp_path))),
        batch_size=16,
        log_samples=True,
    )
    served_acc = results["results"][TASK]["acc,none"]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    served = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]

    expected = peft_loglikelihoods(base_model_dir, adapters_dir / "pirate")
    for got, want in zip(served, expected, strict=True):
        assert got == pytest.approx(want, abs=2e-3)
    picks = [max(range(4), key=row.__getitem__) for row in expected]
    expected_acc = sum(p == a for p, (_, _, a) in zip(picks, ITEMS, strict=True)) / len(ITEMS)
    assert served_acc == pytest.approx(expected_acc)
