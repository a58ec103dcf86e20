"""The promotion gate: the verdict of one eval, and whether a version may be promoted.

One metric decides: token F1 (``DECIDING_METRIC``), the mean over the eval set of the word
overlap between the model's greedy answer and the reference answer. A candidate passes when
its score is at least the reference's, or below it by a relative drop of at most
``max_drop`` (0.02: the candidate may lose at most 2% of the reference's token F1). Exact
match, ROUGE-L and answer loss are reported beside it but do not decide. ``check_promotable``
is what ``adapters promote`` asks before moving an alias: the version's latest gate verdict
must exist and be a pass, unless the promote is forced. This module runs no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.errors import Conflict, NotFound
from loraplex.evals.metrics import Scores
from loraplex.registry.models import AdapterRecord, EvalRecord

SUITE = "gate"
DECIDING_METRIC = "token_f1"
DEFAULT_MAX_DROP = 0.02


@dataclass(frozen=True)
class Verdict:
    """Pass or fail of a candidate against a reference on one eval set."""

    passed: bool
    metric: str
    candidate: float
    reference: float
    relative_drop: float  # (reference - candidate) / reference; <= 0 when the candidate is better
    max_drop: float

    def describe(self, candidate: str, reference: str) -> str:
        """One line: who scored what on the deciding metric and what follows from it."""
        change = f"{-self.relative_drop:+.1%}" if self.reference else "n/a"
        outcome = "PASS" if self.passed else f"FAIL (drop > {self.max_drop:.0%})"
        return (
            f"{self.metric}: {candidate} {self.candidate:.4f} vs {reference} "
            f"{self.reference:.4f} ({change}): {outcome}"
        )


def decide(candidate: Scores, reference: Scores, max_drop: float = DEFAULT_MAX_DROP) -> Verdict:
    """Pass unless the candidate's token F1 is below the reference's by more than
    ``max_drop`` of it (a candidate with no reference score above it always passes)."""
    cand = getattr(candidate, DECIDING_METRIC)
    ref = getattr(reference, DECIDING_METRIC)
    drop = (ref - cand) / ref if ref > 0 else 0.0
    return Verdict(
        passed=cand >= ref or drop <= max_drop,
        metric=DECIDING_METRIC,
        candidate=cand,
        reference=ref,
        relative_drop=drop,
        max_drop=max_drop,
    )


def latest_verdict(record: AdapterRecord, number: int) -> EvalRecord | None:
    """The last gate result recorded for ``number`` of ``record``, if any."""
    found = [e for e in record.evals if e.number == number and e.suite == SUITE]
    return found[-1] if found else None


def eval_command(version: str, verdict: EvalRecord | None) -> str:
    """The ``loraplex eval`` command that (re)runs the gate for ``version``."""
    if verdict is not None and verdict.metrics.get("command"):
        return str(verdict.metrics["command"])
    return f"loraplex eval {version} --data FILE.jsonl"


def check_promotable(record: AdapterRecord, number: int, force: bool) -> str | None:
    """``Conflict`` unless ``N@vK`` passed its latest gate or ``force`` is set; returns a
    warning to print when a forced promote overrides a missing or failed gate."""
    version = f"{record.name}@v{number}"
    if not any(v.number == number for v in record.versions):
        raise NotFound(f"Version {version} does not exist.")
    verdict = latest_verdict(record, number)
    if verdict is not None and verdict.passed:
        return None
    command = eval_command(version, verdict)
    if verdict is None:
        problem = f"{version} has no eval verdict"
        advice = f"run `{command}` (with your eval set) and promote once it passes"
    else:
        problem = f"{version} failed its eval gate ({_summary(verdict.metrics)})"
        advice = f"it failed `{command}`; promote a version that passes it"
    if force:
        return f"{problem}; promoting anyway (--force, recorded in the alias history)"
    raise Conflict(f"{problem}: {advice}, or add --force (recorded in the alias history).")


def _summary(metrics: dict[str, Any]) -> str:
    """The deciding scores of a stored verdict, for messages."""
    try:
        name = metrics["decided_by"]
        cand, ref = metrics["candidate"][name], metrics["reference"][name]
        return f"{name} {cand:.4f} vs {ref:.4f} of {metrics['reference_model']}"
    except (KeyError, TypeError):
        return "see `loraplex adapters show`"
