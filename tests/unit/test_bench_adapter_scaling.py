"""bench/adapter_scaling.py's summary of rounds: best throughput, TTFT medians, and TTFT
paired with the base runs around each round."""

from __future__ import annotations

from bench.adapter_scaling import _points


def report(tokens_per_s: float, ttft_p50: float) -> dict:
    """The parts of one ``measure`` report that ``_points`` reads."""
    return {
        "throughput": {"output_tokens_per_s": tokens_per_s, "requests_per_s": 1.0},
        "latency_ms": {"ttft": {"p50": ttft_p50, "p99": ttft_p50}, "e2e": {"p99": 1000.0}},
        "requests": {"success_rate": 1.0},
        "adapter_cache": {"hit_ratio": 1.0},
    }


def test_paired_ttft_cancels_a_machine_that_slows_down_during_the_run():
    # base before round 1, before round 2, after round 2: the machine slows down
    base = [report(100, 100), report(80, 150), report(60, 250)]
    # the adapters cost 10% TTFT over the base measured around them
    adapters = [report(90, 1.1 * 125), report(70, 1.1 * 200)]
    points = _points({"0": base, "8": adapters})
    assert points["8"]["ttft_p50_paired_vs_base"] == 1.1
    # against the median of all base rounds the drift shows instead: 178.75 / 150
    assert points["8"]["ttft_p50_median_vs_base"] == 1.192
    assert points["8"]["throughput_vs_base"] == 0.9  # best rounds: 90 / 100
    assert "ttft_p50_paired_vs_base" not in points["0"]


def test_no_paired_ratio_without_a_base_run_after_the_last_round():
    points = _points({"0": [report(100, 100)], "8": [report(90, 110)]})
    assert "ttft_p50_paired_vs_base" not in points["8"]
