"""``loraplex bench``: run a load test against any OpenAI-compatible server, write a report.

Only argument parsing and output live here; the work is in ``runner``, ``report``, ``plots``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter("give at least one name")
    return names


def bench_command(
    url: Annotated[str, typer.Option(help="Server base URL, e.g. http://127.0.0.1:8000")],
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")],
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop: requests in flight (default 8).")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Open loop: Poisson arrivals per second.")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(help="Requests to send (default 100 unless --duration).")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds to send requests for.")] = None,
    adapters: Annotated[
        int | None,
        typer.Option(help="How many adapters to spread load over (0: base model only)."),
    ] = None,
    adapter_names: Annotated[
        str | None, typer.Option(help="Comma-separated adapter names (default: GET /v1/models).")
    ] = None,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of adapter popularity.")] = 1.0,
    tenants: Annotated[int, typer.Option(help="Tenants the adapters are spread over.")] = 1,
    api_keys: Annotated[
        str | None, typer.Option(help="Comma-separated API keys: one, or one per tenant.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 64,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts: text (one a line) or JSONL prompt/messages.")
    ] = None,
    endpoint: Annotated[
        str, typer.Option(help="completion (/v1/completions) or chat (/v1/chat/completions).")
    ] = "completion",
    model: Annotated[
        str | None, typer.Option(help="Base model name (default: from GET /v1/models).")
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option(help="Ask for exactly max_tokens tokens (vLLM's ignore_eos).")
    ] = False,
    warmup: Annotated[int, typer.Option(help="Unmeasured requests sent first.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the workload.")] = 0,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.")] = 300.0,
    plot: Annotated[bool, typer.Option(help="Also write PNG charts next to --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Load-test a server with many adapters and tenants; write a JSON report."""
    from loraplex.client.bench.report import build_report, format_summary
    from loraplex.client.bench.runner import BenchConfig, run_bench

    if endpoint not in ("completion", "chat"):
        raise typer.BadParameter("--endpoint must be 'completion' or 'chat'")
    kind: Literal["completion", "chat"] = "chat" if endpoint == "chat" else "completion"
    cfg = BenchConfig(
        url=url,
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        duration=duration,
        adapters=adapters,
        adapter_names=_names(adapter_names),
        zipf=zipf,
        tenants=tenants,
        api_keys=_names(api_keys),
        max_tokens=max_tokens,
        prompts=prompts,
        endpoint=kind,
        base_model=model,
        ignore_eos=ignore_eos,
        warmup=warmup,
        seed=seed,
        timeout=timeout,
        progress=progress,
    )
    result = run_bench(cfg)
    report = build_report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    typer.echo(format_summary(report))
    typer.echo(f"report: {out}")
    if plot:
        from loraplex.client.bench.plots import write_plots

        for path in write_plots(result, report, out):
            typer.echo(f"plot: {path}")
