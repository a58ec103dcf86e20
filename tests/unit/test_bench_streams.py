"""The noisy-neighbour load (bench/_streams.py) against the stub server: floods that retry
after 429, tokens counted inside a window, latency summaries."""

from __future__ import annotations

import asyncio
import time

from stub_server import StubServer

from bench._streams import Flood, Load, Stream, latency_summary, settle


def test_tokens_are_spread_over_chunks_and_cut_by_the_window() -> None:
    done = Stream(0.0, chunks=[1.0, 2.0, 3.0, 4.0], tokens=8, ended=4.0, status=200)
    assert done.tokens_between(1.5, 3.5) == 4.0  # two chunks of two tokens
    cut = Stream(0.0, chunks=[1.0, 2.0], status=200)  # cut off: one token per chunk
    assert cut.tokens_between(0.0, 10.0) == 2.0
    assert not cut.failed and not cut.ok


def test_flood_retries_refused_requests_and_counts_its_tokens(stub: StubServer) -> None:
    async def run() -> tuple[dict, dict]:
        load = Load(stub.url, "flaky429")  # 429 (Retry-After 0) twice, then "hello from ..."
        flood = Flood(load, "key0", streams=3, max_tokens=16)
        start = time.perf_counter()
        flood.start()
        try:
            await settle([flood], 3, timeout=10)
            quiet = latency_summary(await load.sequential("key1", 16, count=2))
            await asyncio.sleep(0.2)
        finally:
            await flood.stop()
            await load.close()
        return flood.summary(start, time.perf_counter()), quiet

    flood, quiet = asyncio.run(run())
    assert flood["failures"] == {"429": 2}
    assert flood["completed"] >= 3
    assert flood["tokens"] >= 3 * flood["completed"]  # 3 tokens each, plus cut-off parts
    assert quiet["ok"] == quiet["requests"] == 2
    assert 0 < quiet["ttft_p50_s"] <= quiet["p50_s"] <= quiet["p99_s"]
    assert ("flaky429", "Bearer key1") in stub.app.state.keys
