"""The FastAPI application: builds the engine at startup, wires routes and error mapping.

``create_app`` takes settings and, for tests, engine, adapter-source and accounts factories;
the real engine is vLLM's AsyncLLM created inside the lifespan (never at import, since vLLM
spawns processes). Tenants, keys and usage live in the registry database (``Accounts``).
``app.state.lifecycle`` (``drain.Lifecycle``) gates requests while draining or after engine
death; the lifespan watches the engine and shuts it down only after the HTTP side has drained.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from loraplex.adapter_sources import RegistryAdapterSource, folder_source, registry_source
from loraplex.adapters import AdapterSource
from loraplex.basemodel import BaseModelInfo, prepare
from loraplex.config import Settings
from loraplex.engine.types import Engine
from loraplex.server import admin_routes, health, openai_routes, ui_routes
from loraplex.server.auth import Authenticator
from loraplex.server.body_limit import BodyLimit
from loraplex.server.drain import Lifecycle, RequestGate
from loraplex.server.errors import install_error_handlers
from loraplex.server.header_limit import HeaderLimit
from loraplex.server.live_stats import LiveStats
from loraplex.server.liveness import watch_engine
from loraplex.server.metrics import Metrics
from loraplex.server.preloader import Preloader
from loraplex.server.prompts import PromptBuilder
from loraplex.server.request_log import ObserveRequests, RecentErrors, json_request_logger
from loraplex.server.service import Service
from loraplex.server.tracing import Tracing
from loraplex.server.usage import UsageRecorder

if TYPE_CHECKING:
    from loraplex.registry.accounts import Accounts

log = logging.getLogger("loraplex.server")

EngineFactory = Callable[[Settings, Path], Engine]


def vllm_engine_factory(settings: Settings, model_dir: Path) -> Engine:
    """The production engine: vLLM AsyncLLM in this process."""
    # Read by loraplex's vLLM platform plugin in every vLLM process; set before vLLM loads.
    os.environ["LORAPLEX_FAST_LORA"] = settings.fast_lora
    os.environ["LORAPLEX_MERGE_HOT"] = settings.merge_hot
    os.environ["LORAPLEX_MERGE_HOT_SHARE"] = str(settings.merge_hot_share)
    os.environ["LORAPLEX_MERGE_HOT_TOKENS"] = str(settings.merge_hot_tokens)
    from loraplex.engine.vllm_engine import VllmEngine

    return VllmEngine(settings, str(model_dir))


def freeze_startup_heap() -> None:
    """Move what startup built (the engine, torch, the model's Python objects) out of the
    garbage collector's reach, as vLLM's own server does after start: a full collection then
    scans only what requests allocated, not the whole startup heap."""
    gc.collect()
    gc.freeze()


def default_source(settings: Settings, base: BaseModelInfo) -> AdapterSource:
    """A plain adapters folder when ``adapters_dir`` is set, else the registry."""
    if settings.adapters_dir is not None:
        return folder_source(settings.adapters_dir, settings, base)
    return registry_source(settings, base)


def default_accounts(settings: Settings) -> Accounts:
    """Tenants, keys and usage in the registry database."""
    from loraplex.registry.registry import open_accounts

    return open_accounts(settings)


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = vllm_engine_factory,
    source_factory: Callable[[Settings, BaseModelInfo], AdapterSource] = default_source,
    accounts_factory: Callable[[Settings], Accounts | None] = default_accounts,
) -> FastAPI:
    """A server app; the engine starts when the app's lifespan starts."""
    metrics = Metrics(
        settings.metrics_max_adapters,
        settings.metrics_max_tenants,
        settings.metrics_hit_window_seconds,
    )
    tracing = Tracing.from_endpoint(settings.otlp_endpoint)
    errors = RecentErrors()
    live = LiveStats()
    json_request_logger()
    lifecycle = Lifecycle(settings.shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = prepare(settings.models_dir, settings.base_model)
        metrics.base_model.info(
            {"name": settings.served_model_name, "fingerprint": base.fingerprint[:12]}
        )
        log.info("base model %s (fingerprint %s)", base.path, base.fingerprint[:12])
        accounts = accounts_factory(settings)
        app.state.auth = Authenticator(settings, accounts)
        usage = UsageRecorder(accounts, settings.usage_flush_seconds)
        engine = engine_factory(settings, base.path)
        prompts = PromptBuilder(base.path, settings.max_model_len, settings.max_tokens_limit)
        source = source_factory(settings, base)
        service = Service(settings, engine, source, prompts, metrics, usage)
        app.state.service = service
        lifecycle.stop_requests = service.stop_all
        metrics.engine_requests.set_function(engine.unfinished_requests)
        metrics.engine.engine = engine
        metrics.admission.admission = service.admission
        metrics.live.set_function(lambda: float(lifecycle.engine_dead is None))
        flusher = asyncio.create_task(usage.run())
        watcher = asyncio.create_task(watch_engine(engine, lifecycle.engine_died))
        tasks = [flusher, watcher]
        if isinstance(source, RegistryAdapterSource):
            preloader = Preloader(service, source, settings.heartbeat_seconds)
            tasks.append(asyncio.create_task(preloader.run()))
        freeze_startup_heap()
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
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            service.close()
            if isinstance(source, RegistryAdapterSource):
                source.close()
            await usage.flush()
            engine.shutdown()
            if accounts is not None:
                accounts.close()
            tracing.shutdown()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.settings = settings
    app.state.recent_errors = errors
    app.state.live_stats = live
    app.state.tracing = tracing
    install_error_handlers(app)

    app.add_middleware(RequestGate, lifecycle=lifecycle)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObserveRequests, metrics=metrics, tracing=tracing, errors=errors, live=live)
    app.add_middleware(HeaderLimit, max_bytes=settings.max_header_bytes)  # outermost: added last
    app.include_router(openai_routes.router)
    app.include_router(health.router)
    app.include_router(admin_routes.router)
    app.include_router(ui_routes.router)
    app.include_router(ui_routes.console)
    return app
