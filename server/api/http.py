"""The HTTP listener (aiohttp): the Open Inference Protocol's health endpoints and Prometheus ``/metrics``.

aiohttp is used because it is a well-kept asyncio HTTP server that can also carry the REST form of the protocol
on the same port later.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ferry.server.models.repository import ModelRepository

_VERSION_HEADER = {"X-Prometheus-Exposition-Format": "0.0.4"}  # text format 0.0.4, as prometheus_client emits


def create_http_app(
    repository: ModelRepository, is_ready: Callable[[], bool], metrics: Callable[[], bytes]
) -> web.Application:
    def status(ok: bool) -> web.Response:
        return web.Response(status=200 if ok else 503)

    async def live(request: web.Request) -> web.Response:
        return status(True)

    async def ready(request: web.Request) -> web.Response:
        return status(is_ready())

    async def model_ready(request: web.Request) -> web.Response:
        return status(repository.is_ready(request.match_info["model"], request.match_info.get("version", "")))

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics(), content_type="text/plain", charset="utf-8", headers=_VERSION_HEADER)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{model}/ready", model_ready)
    app.router.add_get("/v2/models/{model}/versions/{version}/ready", model_ready)
    return app
