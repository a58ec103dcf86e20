"""Optional OpenTelemetry tracing: one span per inference request (off by default).

With ``otlp_endpoint`` set (e.g. ``http://collector:4318/v1/traces``), each request served on
``/v1/*`` or ``/generate`` becomes a server span named after its method and path, with the
request id, tenant, adapter version served, status, token counts and timings as attributes,
exported over OTLP/HTTP in batches. The OpenTelemetry SDK is the ``otel`` extra and is
imported only when tracing is on.
"""

from __future__ import annotations

from typing import Any

SERVICE_NAME = "loraplex"


class Tracing:
    """Starts and ends request spans; a no-op without an exporter."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("loraplex.server") if provider is not None else None

    @classmethod
    def from_endpoint(cls, endpoint: str | None) -> Tracing:
        """Tracing that exports to ``endpoint`` over OTLP/HTTP, or none when it is None."""
        if not endpoint:
            return cls()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider)

    def start(self, name: str) -> Any:
        if self._tracer is None:
            return None
        from opentelemetry.trace import SpanKind

        return self._tracer.start_span(name, kind=SpanKind.SERVER)

    def end(self, span: Any, line: dict[str, Any]) -> None:
        """Set the request's attributes (from its log line) and end ``span``."""
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        for key, value in line.items():
            if value is not None and key not in ("event", "prompt"):
                span.set_attribute(f"loraplex.{key}", value)
        if line["status"] >= 500:
            span.set_status(Status(StatusCode.ERROR, line.get("error") or ""))
        span.end()

    def shutdown(self) -> None:
        """Export what is left and stop."""
        if self.provider is not None:
            self.provider.shutdown()
