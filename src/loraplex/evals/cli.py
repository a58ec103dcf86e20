"""``loraplex eval N@vK --data FILE``: run the gate, print both sides, store the verdict.

The engine work is ``loraplex.evals.runner``; the decision is ``loraplex.evals.gate``. This
module parses flags, prints the side-by-side table and the verdict, and records the verdict
with the version in the registry (``adapters show`` prints it; ``adapters promote`` reads it).
Exit status: 0 on pass, 1 on fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraplex.evals.gate import DEFAULT_MAX_DROP

METRICS = ("exact_match", "token_f1", "rouge_l", "answer_loss")


def eval_command(
    version: Annotated[str, typer.Argument(help="The candidate, an exact version NAME@vK.")],
    data: Annotated[Path, typer.Option(help="Eval JSONL, the shapes training accepts.")],
    against: Annotated[
        str | None,
        typer.Option(help="Reference: NAME:ALIAS, NAME@vK or base (default: NAME:stable)."),
    ] = None,
    max_drop: Annotated[
        float, typer.Option(help="Largest relative drop of token F1 that still passes.")
    ] = DEFAULT_MAX_DROP,
) -> None:
    """Compare a version with its reference on an eval set and record the gate's verdict."""
    passed = run_gate(version, data, against, max_drop)
    if not passed:
        raise typer.Exit(1)


def run_gate(version: str, data: Path, against: str | None, max_drop: float) -> bool:
    """Evaluate, print and record; whether ``version`` may be promoted."""
    from loraplex.adapters import parse_version_key
    from loraplex.config import Settings
    from loraplex.evals.gate import SUITE
    from loraplex.evals.runner import evaluate
    from loraplex.registry.registry import open_registry

    parse_version_key(version)
    settings = Settings()
    report = evaluate(settings, version, data.resolve(), against, max_drop)
    cand, ref = report.candidate_scores.to_dict(), report.reference_scores.to_dict()
    width = max(len(report.candidate), len(report.reference), 12)
    typer.echo(f"{'metric':<12} {report.candidate:>{width}} {report.reference:>{width}}")
    for metric in METRICS:
        marker = "  <- decides" if metric == report.verdict.metric else ""
        typer.echo(f"{metric:<12} {cand[metric]:>{width}.4f} {ref[metric]:>{width}.4f}{marker}")
    typer.echo(f"{'examples':<12} {cand['examples']:>{width}} {ref['examples']:>{width}}")
    registry = open_registry(settings)
    try:
        registry.record_eval(
            version,
            SUITE,
            report.verdict.passed,
            report.metrics(data.resolve()),
            reference=report.reference,
            data_sha256=report.data_sha256,
            base_fingerprint=report.base_fingerprint,
        )
    finally:
        registry.close()
    typer.echo(report.verdict.describe(report.candidate, report.reference))
    if report.verdict.passed:
        typer.echo(f"{version} may be promoted: loraplex adapters promote {version}")
    else:
        typer.echo(f"{version} may not be promoted (the gate failed; see above)")
    return report.verdict.passed
