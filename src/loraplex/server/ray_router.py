"""The ingress of ``loraplex serve --ray``: resolve ``model`` to ``N@vK``, then route by it.

A small deployment without an engine in front of the replicas (``ray_replica``). For the
generation routes it reads the JSON body, resolves ``model`` (``lora_name`` for ``/generate``)
against the shared registry catalog (one indexed query, no cache, so a promote is followed by
the next request) and calls the replicas with ``multiplexed_model_id`` set to that version:
Ray Serve's router then prefers replicas that already hold it. The base model, requests it
cannot parse or resolve (the replica answers those with the right error) and every other path
(``/health``, ``/ready``, ``/v1/models``, admin) get no id: power-of-two-choices over all
replicas. Responses, streaming included, are relayed message by message; a replica that dies
with a request is a 503 before the response starts and an error event in a stream that has
started. Only ``loraplex serve --ray`` imports this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from loraplex.adapters import parse_ref
from loraplex.config import Settings
from loraplex.errors import LoraplexError, TooLarge, Unavailable
from loraplex.server.errors import error_event, error_response
from loraplex.server.ray_metrics import targets_json

log = logging.getLogger("loraplex.server")

ROUTED_PATHS = {
    "/v1/completions": "model",
    "/v1/chat/completions": "model",
    "/generate": "lora_name",
}
"""Paths whose body names an adapter, and the field that names it."""

router_app = FastAPI(title="loraplex router", docs_url=None, redoc_url=None, openapi_url=None)


class VersionResolver:
    """``model`` -> the ``N@vK`` it names now in the shared registry ("" for none)."""

    def __init__(self, settings: Settings) -> None:
        self.base_name = settings.served_model_name
        self.catalog = None
        if settings.adapters_dir is None:  # a folder of adapters has no versions: key by name
            from loraplex.registry.catalog import Catalog
            from loraplex.registry.registry import registry_url

            self.catalog = Catalog(registry_url(settings), settings.registry_timeout_seconds)

    def resolve(self, model: object) -> str:
        if not isinstance(model, str) or not model or model == self.base_name:
            return ""
        if self.catalog is None:
            return model
        try:
            return self.catalog.resolve(parse_ref(model), model).key
        except LoraplexError:
            return ""  # unknown, malformed or registry down: the replica decides what to answer


def routing_key(path: str, body: bytes, resolver: VersionResolver) -> str:
    """The version a request is routed by ("" when it names none)."""
    field = ROUTED_PATHS.get(path)
    if field is None:
        return ""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    return resolver.resolve(payload.get(field)) if isinstance(payload, dict) else ""


def error_of(exc: LoraplexError) -> JSONResponse:
    """The OpenAI-shaped error the server would answer for ``exc``."""
    retry_after = getattr(exc, "retry_after", None)
    return error_response(exc.status_code, exc.message, exc.error_type, exc.code, retry_after)


def replica_stopped() -> Unavailable:
    """The error of a request whose replica died or went away while serving it."""
    return Unavailable("The replica serving this request stopped; retry.", retry_after=1)


def stream_cut() -> bytes:
    """The end of an event stream whose replica stopped: an error event, then ``[DONE]``, as
    the server ends a stream whose generation failed."""
    return f"{error_event(replica_stopped())}data: [DONE]\n\n".encode()


async def body_of(
    messages: DeploymentResponseGenerator, event_stream: bool
) -> AsyncIterator[bytes]:
    """The body chunks of a replica's ASGI messages; a client that leaves early cancels the
    request on the replica (which tells the app the client disconnected). If the replica stops
    meanwhile, an event stream ends with ``stream_cut``; any other body is cut short (the
    error reaches Serve's proxy, which closes the connection)."""
    finished = False
    try:
        async for message in messages:
            if message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        finished = True
    except RayError as exc:
        finished = True  # nothing left to cancel
        log.warning("ray: the replica stopped during a response: %s", exc)
        if not event_stream:
            raise
        yield stream_cut()
    finally:
        if not finished:
            messages.cancel()


@serve.ingress(router_app)
class LoraplexRouter:
    """Relays every request to a replica chosen by its resolved adapter version."""

    def __init__(self, replicas_app: str, settings: Settings, affinity: bool = True) -> None:
        self.replicas: DeploymentHandle = serve.get_deployment_handle(
            "LoraplexReplica", app_name=replicas_app
        )
        self.resolver = VersionResolver(settings)
        self.affinity = affinity  # False: every request spread (to compare, bench/ray_affinity)
        self.max_body = settings.max_request_bytes

    @router_app.get("/ray/targets")
    async def targets(self) -> Response:
        """Every replica's metrics address, in Prometheus' HTTP service-discovery format."""
        body = await asyncio.to_thread(targets_json)
        return Response(body, media_type="application/json")

    @router_app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def relay(self, request: Request, path: str) -> Response:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body:
                return error_of(TooLarge(f"The request body exceeds {self.max_body} bytes."))
        body = b"".join(chunks)
        key = ""
        if self.affinity:
            key = await asyncio.to_thread(routing_key, request.url.path, body, self.resolver)
        handle = self.replicas.options(stream=True, multiplexed_model_id=key)
        messages = handle.forward.remote(
            {
                "method": request.method,
                "path": request.url.path,
                "query_string": request.url.query.encode(),
                "headers": request.headers.raw,
                "body": body,
                "client": list(request.client) if request.client else None,
            }
        )
        try:
            start = await messages.__anext__()
        except RayError as exc:  # the replica died or went away with the request
            log.warning("ray: request failed on its replica: %s", exc)
            return error_of(replica_stopped())
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in start["headers"]
            if k.lower() != b"x-request-id"  # Serve's proxy sets it (the app echoed it)
        }
        event_stream = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(
            body_of(messages, event_stream), status_code=start["status"], headers=headers
        )
