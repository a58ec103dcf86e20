"""PNG charts of a benchmark run: latency CDFs and throughput over time (matplotlib, Agg).

Reads only the samples and the report; writes files next to the JSON report. matplotlib is
imported here, lazily, so the rest of the client works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loraplex.client.bench.runner import RunResult
from loraplex.errors import InvalidRequest


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ms = np.sort(np.asarray(values) * 1000.0)
    ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)


def write_plots(result: RunResult, report: dict[str, Any], out_json: Path) -> list[Path]:
    """Write ``<stem>_latency_cdf.png`` and ``<stem>_throughput.png``; return their paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise InvalidRequest("--plot needs matplotlib: pip install matplotlib") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [s for s in result.samples if s.ok]
    stem = out_json.with_suffix("")
    paths = [Path(f"{stem}_latency_cdf.png"), Path(f"{stem}_throughput.png")]
    title = f"{report['url']}  ({report['config']['mode']} loop)"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _cdf(axes[0], [s.ttft for s in good if s.ttft is not None], "TTFT")
    gaps = [float(g) for s in good for g in np.diff(s.chunk_times)]
    _cdf(axes[0], gaps, "inter-token")
    _cdf(axes[1], [s.latency for s in good if s.latency is not None], "end-to-end")
    for ax, name in zip(axes, ("TTFT and inter-token latency", "End-to-end latency"), strict=True):
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    timeline = report["timeline"]
    t = [row["t"] for row in timeline]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [row["output_tokens"] for row in timeline], label="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(t, [row["requests"] for row in timeline], color="tab:orange", label="requests/s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens per second")
    ax2.set_ylabel("requests completed per second")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
