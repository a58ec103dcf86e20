"""The FastAPI application: builds the engine at startup, wires routes and error mapping.

``create_app`` takes settings and, for tests, an engine factory; the real engine is vLLM's
AsyncLLM created inside the lifespan (never at import, since vLLM spawns processes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response

from loraplex.adapter_sources import FolderAdapterSource, registry_source
from loraplex.adapters import AdapterSource
from loraplex.basemodel import BaseModelInfo, prepare
from loraplex.config import Settings
from loraplex.engine.types import Engine
from loraplex.server import admin_routes, health, openai_routes
from loraplex.server.body_limit import BodyLimit
from loraplex.server.errors import install_error_handlers
from loraplex.server.metrics import Metrics
from loraplex.server.prompts import PromptBuilder
from loraplex.server.service import Service

log = logging.getLogger("loraplex.server")

EngineFactory = Callable[[Settings, Path], Engine]


def vllm_engine_factory(settings: Settings, model_dir: Path) -> Engine:
    """The production engine: vLLM AsyncLLM in this process."""
    # Read by loraplex's vLLM platform plugin in every vLLM process; set before vLLM loads.
    os.environ["LORAPLEX_FAST_LORA"] = settings.fast_lora
    from loraplex.engine.vllm_engine import VllmEngine

    return VllmEngine(settings, str(model_dir))


def default_source(settings: Settings, base: BaseModelInfo) -> AdapterSource:
    """A plain adapters folder when ``adapters_dir`` is set, else the registry."""
    if settings.adapters_dir is not None:
        return FolderAdapterSource(settings.adapters_dir)
    return registry_source(settings, base)


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = vllm_engine_factory,
    source_factory: Callable[[Settings, BaseModelInfo], AdapterSource] = default_source,
) -> FastAPI:
    """A server app; the engine starts when the app's lifespan starts."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = prepare(settings.models_dir, settings.base_model)
        log.info("base model %s (fingerprint %s)", base.path, base.fingerprint[:12])
        engine = engine_factory(settings, base.path)
        prompts = PromptBuilder(base.path, settings.max_model_len)
        app.state.service = Service(
            settings, engine, source_factory(settings, base), prompts, metrics
        )
        metrics.ready.set(1)
        log.info(
            "loraplex ready on http://%s:%s (model %s)",
            settings.host,
            settings.port,
            settings.served_model_name,
        )
        try:
            yield
        finally:
            metrics.ready.set(0)
            engine.shutdown()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        if route is not None and request.url.path.startswith(("/v1/", "/generate")):
            adapter = response.headers.get("x-loraplex-adapter", "none")
            metrics.requests.labels(route.path, adapter, str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)  # outermost: added last
    app.include_router(openai_routes.router)
    app.include_router(health.router)
    app.include_router(admin_routes.router)
    return app
