"""The operations port: ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (able to serve).

Kept apart from the data ports so probes and scrapes never pass through policy, and so the
token-exchange endpoint can be mounted beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from .metrics import Metrics

ReadyCheck = Callable[[], str | None]  # None when ready, else the reason


def admin_app(metrics: Metrics, ready: ReadyCheck, *, routes: Sequence[web.RouteDef] = ()) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        reason = ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics_handler(_: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.add_routes(routes)
    return app
