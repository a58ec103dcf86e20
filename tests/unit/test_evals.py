"""The eval gate's pure parts: metrics, the decision, stored verdicts and ``promote``'s check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cli_runner import run
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect

from loraplex.errors import Conflict, NotFound
from loraplex.evals import metrics
from loraplex.evals.gate import DECIDING_METRIC, check_promotable, decide
from loraplex.evals.metrics import Scores
from loraplex.registry import tables
from loraplex.registry.basedims import BaseDims
from loraplex.registry.catalog import Catalog
from loraplex.registry.database import make_engine
from loraplex.registry.registry import Registry
from loraplex.testing.random_adapters import write_random_adapter


def test_text_metrics() -> None:
    assert metrics.normalize("  The Capital, of France!  ") == "capital of france"
    assert metrics.exact_match("Paris.", "paris") == 1.0
    assert metrics.exact_match("Paris is it", "Paris") == 0.0
    # 2 shared words of 3 predicted and 4 expected: p=2/3, r=1/2
    assert metrics.token_f1("born in Quindale", "he was born in") == pytest.approx(4 / 7)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0
    assert metrics.token_f1("alpha", "beta") == 0.0
    assert metrics.rouge_l("Odrin was born in Marrowgate", "Odrin was born in Marrowgate") == 1.0
    # LCS "a b d" of 4 and 3 tokens: p=3/4, r=1
    assert metrics.rouge_l("a b c d", "a b d") == pytest.approx(2 * 0.75 / 1.75)
    assert metrics.rouge_l("one two", "three four") == 0.0


def test_answer_loss_is_the_mean_over_answer_tokens() -> None:
    loss = metrics.answer_loss([[math.log(0.5)], [math.log(0.25), math.log(1.0)]])
    assert loss == pytest.approx((math.log(2) + math.log(4)) / 3)
    with pytest.raises(ValueError):
        metrics.answer_loss([[], []])


def test_score_averages_over_examples() -> None:
    got = metrics.score(["Paris.", "Rome"], ["paris", "Madrid"], [[-1.0], [-3.0]])
    assert got == Scores(0.5, 0.5, 0.5, 2.0, 2)
    with pytest.raises(ValueError):
        metrics.score(["a"], ["a", "b"], [[-1.0]])


def scores(f1: float) -> Scores:
    return Scores(exact_match=0.0, token_f1=f1, rouge_l=0.0, answer_loss=1.0, examples=10)


@pytest.mark.parametrize(
    ("candidate", "reference", "passed"),
    [
        (0.90, 0.80, True),  # better
        (0.80, 0.80, True),  # equal
        (0.79, 0.80, True),  # 1.25% drop <= 2%
        (0.78, 0.80, False),  # 2.5% drop
        (0.10, 0.90, False),
        (0.00, 0.00, True),  # no reference score above it
    ],
)
def test_token_f1_decides_by_relative_drop(
    candidate: float, reference: float, passed: bool
) -> None:
    verdict = decide(scores(candidate), scores(reference), max_drop=0.02)
    assert (verdict.passed, verdict.metric) == (passed, DECIDING_METRIC)
    assert decide(scores(0.5), scores(0.8), max_drop=0.5).passed


def gate_metrics(passed: bool) -> dict[str, object]:
    cand, ref = scores(0.9 if passed else 0.2).to_dict(), scores(0.8).to_dict()
    return {
        "decided_by": "token_f1",
        "max_drop": 0.02,
        "reference_model": "sales@v1",
        "candidate": cand,
        "reference": ref,
        "command": "loraplex eval sales@v2 --data /d/eval.jsonl --against sales@v1",
    }


def test_promote_needs_a_passing_gate(registry: Registry, tmp_path: Path, tiny_dims) -> None:
    for seed in (1, 2, 3):
        registry.push(write_random_adapter(tmp_path / f"a{seed}", tiny_dims, seed=seed), "sales")
    with pytest.raises(Conflict, match=r"run `loraplex eval sales@v2 --data FILE.jsonl`"):
        check_promotable(registry.show("sales"), 2, force=False)
    with pytest.raises(NotFound):
        check_promotable(registry.show("sales"), 9, force=False)
    registry.record_eval("sales@v2", "gate", False, gate_metrics(False), reference="sales@v1")
    with pytest.raises(Conflict, match=r"failed `loraplex eval sales@v2 --data /d/eval.jsonl"):
        check_promotable(registry.show("sales"), 2, force=False)
    assert "promoting anyway" in (check_promotable(registry.show("sales"), 2, force=True) or "")
    registry.record_eval("sales@v2", "smoke", True, {})  # not a gate verdict
    registry.record_eval("sales@v3", "gate", True, gate_metrics(True), reference="sales@v1")
    with pytest.raises(Conflict):
        check_promotable(registry.show("sales"), 2, force=False)
    assert check_promotable(registry.show("sales"), 3, force=False) is None
    registry.record_eval("sales@v2", "gate", True, gate_metrics(True), reference="sales@v1")
    assert check_promotable(registry.show("sales"), 2, force=False) is None  # the latest counts


def test_cli_promote_refuses_then_force_is_recorded_and_show_prints_the_verdict(
    cli_env: Path, capsys: pytest.CaptureFixture[str], tiny_dims: BaseDims
) -> None:
    for seed in (1, 2):
        adapter = write_random_adapter(cli_env / f"a{seed}", tiny_dims, seed=seed)
        assert run(capsys, "adapters", "push", str(adapter), "--name", "sales")[0] == 0
    code, out, err = run(capsys, "adapters", "promote", "sales@v2")
    assert code == 2 and out == ""
    assert "sales@v2 has no eval verdict" in err and "loraplex eval sales@v2 --data" in err
    from loraplex.registry.registry import open_registry

    reg = open_registry()
    reg.record_eval(
        "sales@v2", "gate", False, gate_metrics(False), reference="sales@v1",
        data_sha256="ab" * 32, base_fingerprint="cd" * 32,
    )  # fmt: skip
    reg.close()
    code, _, err = run(capsys, "adapters", "promote", "sales@v2", "--alias", "canary")
    assert code == 2 and "failed its eval gate (token_f1 0.2000 vs 0.8000 of sales@v1)" in err
    code, out, err = run(capsys, "adapters", "promote", "sales@v2", "--force")
    assert (code, out) == (0, "sales:stable -> sales@v2 (was sales@v1)\n")
    assert "promoting anyway" in err
    code, out, _ = run(capsys, "adapters", "show", "sales")
    assert "tester       promote  stable v1 -> v2 forced" in out
    assert "gate FAIL: token_f1 0.2000 vs 0.8000 of sales@v1 (max drop 2%)" in out
    assert f"data sha256={'ab' * 8} base={'cd' * 6}" in out
    assert "candidate exact_match=0.0000 token_f1=0.2000 rouge_l=0.0000 answer_loss=1.0000" in out


def test_an_older_database_gets_the_gate_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    old = MetaData()
    for table in (tables.info, tables.adapters, tables.versions):
        table.to_metadata(old)
    Table(
        "eval_results", old,
        Column("id", Integer, primary_key=True), Column("name", String(64)),
        Column("number", Integer), Column("suite", String(128)), Column("passed", Integer),
        Column("metrics", String), Column("created_at", String), Column("created_by", String),
    )  # fmt: skip
    old.create_all(engine)
    engine.dispose()
    catalog = Catalog(url)
    names = {c["name"] for c in inspect(catalog.engine).get_columns("eval_results")}
    assert {"reference", "data_sha256", "base_fingerprint"} <= names
    catalog.close()


def test_the_reference_is_stable_or_else_the_base(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    from loraplex.evals.runner import reference_for

    for seed in (1, 2):
        registry.push(write_random_adapter(tmp_path / f"a{seed}", tiny_dims, seed=seed), "sales")
    assert reference_for(registry, "sales@v1", None) == "base"  # its own stable
    assert reference_for(registry, "sales@v2", None) == "sales@v1"
    assert reference_for(registry, "sales@v2", "base") == "base"
    assert reference_for(registry, "sales@v1", "sales@v2") == "sales@v2"
    with pytest.raises(NotFound):
        reference_for(registry, "sales@v2", "sales:canary")
