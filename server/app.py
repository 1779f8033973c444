"""`create_app`: the FastAPI application around an AsyncEngine; no module-level engine.

Routes live one file per API family and are included here; adding one (e.g. translations)
is a new `server/routes_<name>.py` with an `APIRouter` plus one line in `_ROUTERS`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from engine.async_engine import AsyncEngine
from server import (
    routes_admin, routes_anthropic, routes_compat, routes_embeddings, routes_generate, routes_lora, routes_responses,
    routes_score, routes_tei, routes_tgi, routes_translate,
)
from server.auth import ApiKeyAuth
from server.errors import BodySizeLimit, install_error_handlers
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.responses_store import ResponseStore
from server.settings import ServerSettings
from server.state import ServerState, task_of

_ROUTERS = [routes_admin.router, routes_generate.router, routes_responses.router, routes_anthropic.router,
            routes_embeddings.router,
            routes_score.router, routes_tei.router, routes_tgi.router, routes_compat.router, routes_translate.router]


def create_app(
    async_engine: AsyncEngine,
    served: dict[str, Any],
    settings: ServerSettings | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """Build the app. The async engine starts with the app and is shut down (in-flight requests
    get `settings.shutdown_timeout_s`) when the server stops, e.g. on SIGTERM."""
    settings = settings or ServerSettings()
    if metrics is None:
        metrics = ServerMetrics(CollectorRegistry())
        async_engine.on_step = metrics.on_step
    for name, engine in served.items():
        metrics.register_model(name, task_of(engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown(timeout=settings.shutdown_timeout_s)
            for task in list(app.state.kv.background.values()):  # their requests were aborted above
                task.cancel()

    app = FastAPI(title="kvserve", version="0.1.0", lifespan=lifespan)
    app.state.kv = ServerState(async_engine, served, settings, metrics, ResponseStore(settings.responses_store_size))
    install_error_handlers(app, settings.retry_after_s)
    install_openapi(app)
    for router in _ROUTERS:
        app.include_router(router)
    if settings.allow_runtime_lora_updating:
        app.include_router(routes_lora.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:  # added last, so it runs first: no body is read for a stranger
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    return app
