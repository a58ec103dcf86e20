"""One gate run: a candidate version and its reference answer the same eval set in vLLM.

The engine is loraplex's own (``VllmEngine``, embedded in this process, started with the
same settings as ``serve``, but eager: torch.compile would cost minutes of start-up on CPU
for a few seconds of work), and every adapter reaches it through the registry source, so it
passes the same checks as a served one (base fingerprint, rank, shapes). Each model is
prompted the way it was trained (its manifest's ``prompt_format``; the base model takes the
candidate's): the prompt and answer token ids come from the training encoder, so an eval row
is checked and tokenized exactly as a training row. Per example and model, two requests run
batched in the engine: a greedy answer (for exact match, token F1, ROUGE-L) and the prompt
log-probabilities of prompt + reference answer (for the answer loss, over answer tokens only).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters import DEFAULT_ALIAS, ResolvedAdapter, parse_version_key
from loraplex.config import Settings
from loraplex.errors import InvalidRequest, NotFound
from loraplex.evals.gate import DEFAULT_MAX_DROP, Verdict, decide
from loraplex.evals.metrics import Scores, score
from loraplex.train.data import Example

BASE = "base"
ANSWER_SLACK = 16  # tokens a generated answer may run past the reference's length


@dataclass(frozen=True)
class Model:
    """One side of the comparison: a registry version, or the base model (``adapter`` None)."""

    label: str  # "N@vK" or "base"
    adapter: ResolvedAdapter | None
    prompt_format: str


@dataclass(frozen=True)
class Report:
    """Everything a gate run found, ready to print and to store."""

    candidate: str
    reference: str
    candidate_scores: Scores
    reference_scores: Scores
    verdict: Verdict
    data_sha256: str
    base_fingerprint: str

    def metrics(self, data: Path) -> dict[str, Any]:
        """What the registry stores in the verdict's ``metrics``."""
        v = self.verdict
        command = f"loraplex eval {self.candidate} --data {data} --against {self.reference}"
        if v.max_drop != DEFAULT_MAX_DROP:
            command += f" --max-drop {v.max_drop:g}"
        return {
            "decided_by": v.metric,
            "max_drop": v.max_drop,
            "relative_drop": v.relative_drop,
            "reference_model": self.reference,
            "candidate": self.candidate_scores.to_dict(),
            "reference": self.reference_scores.to_dict(),
            "data": str(data),
            "command": command,
        }


def reference_for(registry: Any, candidate: str, against: str | None) -> str:
    """``base``, or the exact version ``against`` (default ``N:stable``) names now; ``base``
    when there is no stable yet or it is the candidate itself (a first version is its own
    stable)."""
    if against == BASE:
        return BASE
    try:
        key = registry.resolve(
            against or f"{parse_version_key(candidate).name}:{DEFAULT_ALIAS}"
        ).key
    except NotFound:
        if against is not None:
            raise
        return BASE
    return BASE if key == candidate else key


def evaluate(
    settings: Settings,
    candidate: str,
    data: Path,
    against: str | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
) -> Report:
    """Run the candidate and its reference over ``data`` and decide; stores nothing."""
    from transformers import AutoTokenizer

    from loraplex.adapter_sources import registry_source
    from loraplex.basemodel import prepare
    from loraplex.registry.registry import open_registry
    from loraplex.train.encode import resolve_format

    base = prepare(settings.models_dir, settings.base_model)
    registry = open_registry(settings)
    try:
        reference = reference_for(registry, candidate, against)
        source = registry_source(settings, base)
        tokenizer = AutoTokenizer.from_pretrained(str(base.path))
        unrecorded = resolve_format("auto", tokenizer)  # for adapters trained before formats
        cand = _model(registry, source, candidate, unrecorded)
        ref = _model(registry, source, reference, cand.prompt_format)
    finally:
        registry.close()
    formats = {cand.prompt_format, ref.prompt_format}
    encoded = {fmt: _encode(tokenizer, base.path, data, fmt, settings) for fmt in formats}
    sha256, answers, _ = encoded[cand.prompt_format]
    scores = asyncio.run(_run(settings, base.path, [cand, ref], encoded, answers))
    return Report(
        candidate=candidate,
        reference=reference,
        candidate_scores=scores[0],
        reference_scores=scores[1],
        verdict=decide(scores[0], scores[1], max_drop),
        data_sha256=sha256,
        base_fingerprint=base.fingerprint,
    )


def _model(registry: Any, source: Any, label: str, default_format: str) -> Model:
    """The engine's view of ``label`` and the prompt format it was trained for (the base
    model, and an adapter whose manifest does not say, take ``default_format``)."""
    if label == BASE:
        return Model(BASE, None, default_format)
    version = registry.resolve(label)
    fmt = (version.manifest or {}).get("prompt_format") or default_format
    return Model(label, source.resolve(label), fmt)


def _encode(
    tokenizer: Any, model_dir: Path, data: Path, prompt_format: str, settings: Settings
) -> tuple[str, list[str], list[tuple[list[int], list[int]]]]:
    """The data's sha256, reference answers, and (prompt ids, answer ids) per example,
    checked and tokenized by the training encoder."""
    from loraplex.train.encode import Encoder, encode_file
    from loraplex.train.runtime import stop_token_ids

    encoder = Encoder(tokenizer, stop_token_ids(model_dir), prompt_format)  # type: ignore[arg-type]
    dataset, items = encode_file(encoder, data, settings.max_model_len)
    pairs = []
    for item in items:
        start = next(i for i, label in enumerate(item.labels) if label != -100)
        pairs.append((item.input_ids[:start], item.input_ids[start:]))
    return dataset.sha256, [_answer(e) for e in dataset.examples], pairs


def _answer(example: Example) -> str:
    return example.messages[-1]["content"] if example.kind == "chat" else example.answer


async def _run(
    settings: Settings,
    model_dir: Path,
    models: list[Model],
    encoded: dict[str, tuple[str, list[str], list[tuple[list[int], list[int]]]]],
    answers: list[str],
) -> list[Scores]:
    """Both requests of every example and model, batched in one engine; scores per model."""
    from tqdm import tqdm

    from loraplex.engine.types import GenerationParams
    from loraplex.server.app import vllm_engine_factory

    if settings.fast_lora == "off":  # vLLM's stock CPU LoRA ops fail batched prompt logprobs
        raise InvalidRequest(
            "loraplex eval scores answers with prompt log-probabilities, which need loraplex's "
            "fast LoRA ops; unset LORAPLEX_FAST_LORA=off."
        )
    engine: Any = vllm_engine_factory(
        settings.model_copy(update={"enforce_eager": True}), model_dir
    )
    ids = itertools.count()
    gate = asyncio.Semaphore(settings.max_num_seqs)
    total = 2 * len(models) * len(answers)
    bar = tqdm(total=total, desc="eval", unit="req", disable=None)

    async def generate(model: Model, prompt: list[int], answer: list[int]) -> str:
        room = settings.max_model_len - len(prompt)
        params = GenerationParams(
            max_tokens=max(1, min(len(answer) + ANSWER_SLACK, room)), temperature=0.0
        )
        async with gate:
            text = "".join(
                [
                    d.text
                    async for d in engine.stream(prompt, params, f"eval-{next(ids)}", model.adapter)
                ]
            )
        bar.update()
        return text.strip()

    async def logprobs(model: Model, prompt: list[int], answer: list[int]) -> list[float]:
        async with gate:
            values = await engine.prompt_logprobs(
                prompt + answer, f"eval-{next(ids)}", model.adapter
            )
        bar.update()
        return values[-len(answer) :]

    try:
        results = []
        for model in models:
            pairs = encoded[model.prompt_format][2]
            texts = asyncio.gather(*(generate(model, p, a) for p, a in pairs))
            losses = asyncio.gather(*(logprobs(model, p, a) for p, a in pairs))
            results.append(await asyncio.gather(texts, losses))
    finally:
        bar.close()
        engine.shutdown()
    return [score(texts, answers, losses) for texts, losses in results]
