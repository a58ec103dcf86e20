"""OpenTelemetry tracing: one span per request, exported over OTLP/HTTP to a tiny receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from route_checks import chat

if TYPE_CHECKING:
    from route_checks import Serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP traces endpoint that keeps what it receives."""
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", received
    server.shutdown()


def attributes(span: object) -> dict[str, object]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}  # type: ignore[attr-defined]


async def test_one_span_per_request_with_the_adapter_version(
    serve: Serve, receiver: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    endpoint, received = receiver
    async with serve(otlp_endpoint=endpoint) as client:
        ok = await client.post("/v1/chat/completions", json=chat("sales"))
        missing = await client.post("/v1/chat/completions", json=chat("nope"))
        await client.get("/v1/models")
    spans = [
        span
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_id = {attributes(s)["loraplex.request_id"]: attributes(s) for s in spans}
    assert len(spans) == 3 and set(by_id) >= {ok.headers["x-request-id"]}
    served = by_id[ok.headers["x-request-id"]]
    assert served["loraplex.adapter"] == ok.headers["x-loraplex-adapter"]
    assert served["loraplex.status"] == 200 and served["loraplex.completion_tokens"] == 3
    assert by_id[missing.headers["x-request-id"]]["loraplex.status"] == 404


async def test_no_tracing_by_default(serve: Serve) -> None:
    async with serve() as client:
        assert (await client.post("/v1/chat/completions", json=chat("sales"))).is_success
        assert client._transport.app.state.tracing.provider is None  # type: ignore[attr-defined]
