"""The gateway's ASGI app driven in-process: its lifespan and requests on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx


class AsgiGateway:
    """Requests to the gateway's ASGI app (``create_app``'s, with its Guard), run on one event
    loop with the app's lifespan (background tasks included) until :meth:`close`."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        inner = app.app  # inside the Guard

        async def start() -> httpx.AsyncClient:
            await self.stack.enter_async_context(inner.router.lifespan_context(inner))
            transport = httpx.ASGITransport(app=app)
            return await self.stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://gateway")
            )

        self.client = self.loop.run_until_complete(start())

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, path, **kwargs))

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def wait(self, seconds: float) -> None:
        """Let the app's background tasks run for ``seconds``."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        self.loop.run_until_complete(self.stack.aclose())
        self.loop.close()
