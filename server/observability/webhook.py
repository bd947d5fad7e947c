"""Alert webhooks: POST an alert as JSON to a URL, from the event loop, with a bounded timeout.

Callable from any thread (a drift alert is raised in a model's worker thread): the call only schedules the POST on
the loop and returns. At most ``max_in_flight`` POSTs run at once; further alerts are dropped and counted, so a slow
or dead receiver costs a bounded number of tasks and sockets, never a blocked request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class AlertWebhook:
    """POSTs ``{"event": <event>, **fields of the alert dataclass}``; counters ``sent``, ``failed``, ``dropped``."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        loop: asyncio.AbstractEventLoop,
        *,
        event: str = "drift_alert",
        max_in_flight: int = 4,
    ) -> None:
        self.url = url
        self.event = event
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._loop = loop
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __call__(self, alert: Any) -> None:
        """Schedule one POST of a dataclass ``alert``; returns at once (any thread)."""
        body = json.dumps({"event": self.event, **dataclasses.asdict(alert)}, separators=(",", ":"))
        try:
            self._loop.call_soon_threadsafe(self._start, body)
        except RuntimeError:  # the loop is closed: the server is gone
            self.dropped += 1

    def _start(self, body: str) -> None:
        if self._closed or len(self._tasks) >= self._max_in_flight:
            self.dropped += 1
            log.warning("webhook %s: %d POSTs in flight, dropping a %s", self.url, len(self._tasks), self.event)
            return
        task = self._loop.create_task(self._post(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(
                        response.request_info, response.history, status=response.status, message=response.reason or ""
                    )
            self.sent += 1
        except (aiohttp.ClientError, TimeoutError) as err:
            self.failed += 1
            log.warning("webhook %s: POST of a %s failed: %s", self.url, self.event, err or type(err).__name__)

    async def close(self) -> None:
        """Let POSTs in flight finish (each is bounded by the timeout), then close the HTTP session."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None


__all__ = ["AlertWebhook"]
