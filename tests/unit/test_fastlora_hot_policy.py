"""HotPolicy: which adapter to merge, from each step's tokens per LoRA id."""

from __future__ import annotations

import pytest

from loraplex.fastlora.hot_policy import HotPolicy


def run(policy: HotPolicy, tokens: dict, steps: int) -> list:
    return [policy.observe(tokens) for _ in range(steps)]


def test_sustained_traffic_of_one_adapter_merges_it_and_a_burst_does_not():
    policy = HotPolicy(horizon_tokens=1000)
    assert policy.observe({7: 900}) is None  # a burst: share 0.59
    decisions = run(policy, {7: 100}, 20)
    first = decisions.index(7)
    assert 0 < first < 20 and all(d == 7 for d in decisions[first:])
    assert policy.shares[7] >= 0.9


def test_merged_until_the_share_falls_below_the_unmerge_share():
    policy = HotPolicy(horizon_tokens=100)
    run(policy, {7: 50}, 20)
    assert policy.merged == 7
    assert run(policy, {7: 35, 3: 10, None: 5}, 40)[-1] == 7  # 0.7 of the tokens: stays
    decisions = run(policy, {7: 25, 3: 25}, 40)  # half: unmerged, and not merged again
    assert decisions[-1] is None and policy.shares[7] < 0.6


def test_base_tokens_dilute_the_share_and_are_never_merged():
    policy = HotPolicy(horizon_tokens=100)
    assert run(policy, {None: 100}, 10)[-1] is None
    assert run(policy, {None: 20, 7: 80}, 30)[-1] is None  # 0.8 < 0.9


def test_switched_off_it_unmerges_and_merges_nothing_but_keeps_counting():
    policy = HotPolicy(horizon_tokens=100)
    run(policy, {7: 50}, 20)
    policy.enabled = False
    assert policy.observe({7: 50}) is None
    assert run(policy, {7: 50}, 5) == [None] * 5
    policy.enabled = True
    assert policy.observe({7: 50}) == 7


def test_a_forgotten_adapter_starts_over_and_old_shares_are_dropped():
    policy = HotPolicy(horizon_tokens=10)
    run(policy, {7: 10}, 10)
    policy.forget(7)
    assert policy.merged is None and 7 not in policy.shares
    run(policy, {3: 10}, 20)
    assert policy.merged == 3
    assert set(policy.shares) == {3}


def test_an_empty_step_changes_nothing():
    policy = HotPolicy(horizon_tokens=10)
    run(policy, {7: 10}, 10)
    shares = dict(policy.shares)
    assert policy.observe({}) == 7 and policy.shares == shares


@pytest.mark.parametrize(
    "kwargs",
    [{"merge_share": 0.5}, {"unmerge_share": 0.95}, {"merge_share": 1.2}, {"horizon_tokens": 0}],
)
def test_thresholds_that_cannot_work_are_refused(kwargs):
    with pytest.raises(ValueError):
        HotPolicy(**kwargs)
