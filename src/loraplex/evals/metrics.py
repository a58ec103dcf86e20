"""Answer-quality metrics of one eval run: exact match, token F1, ROUGE-L, answer loss.

Pure functions over text and numbers (ROUGE-L comes from Google's ``rouge-score``); nothing
here runs a model. Text is normalised SQuAD-style before exact match and token F1
(lower case, punctuation and the articles a/an/the dropped, whitespace collapsed), so "Paris."
and "paris" match. The answer loss is the mean negative log-probability per answer token,
over all answer tokens of the set (lower is better).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised words."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_scorer: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), ``rouge-score`` with stemming."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)


def answer_loss(answer_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean negative log-probability per answer token over every example's answer tokens."""
    tokens = [lp for example in answer_logprobs for lp in example]
    if not tokens:
        raise ValueError("no answer tokens to score")
    return -math.fsum(tokens) / len(tokens)


@dataclass(frozen=True)
class Scores:
    """The metrics of one model on one eval set (means over its examples)."""

    exact_match: float
    token_f1: float
    rouge_l: float
    answer_loss: float
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(
    predictions: Sequence[str],
    references: Sequence[str],
    answer_logprobs: Sequence[Sequence[float]],
) -> Scores:
    """Scores of ``predictions`` against ``references`` (same order, same length)."""
    if len(predictions) != len(references) or len(references) != len(answer_logprobs):
        raise ValueError("predictions, references and log-probabilities differ in length")
    if not references:
        raise ValueError("no examples to score")
    pairs = list(zip(predictions, references, strict=True))
    n = len(pairs)
    return Scores(
        exact_match=math.fsum(exact_match(p, r) for p, r in pairs) / n,
        token_f1=math.fsum(token_f1(p, r) for p, r in pairs) / n,
        rouge_l=math.fsum(rouge_l(p, r) for p, r in pairs) / n,
        answer_loss=answer_loss(answer_logprobs),
        examples=n,
    )
