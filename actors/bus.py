"""Fan-out of committed facts to whoever is listening: HTTP callers awaiting a result and
websockets. Published only after the state change commits, and never the source of truth:
a listener that misses a message re-reads storage.

`LocalBus` serves one process (the embedded default); `RedisBus` spans processes and hosts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class Subscription:
    """Messages for a set of channels, queued on the subscriber's own event loop."""

    def __init__(self, bus: "LocalBus | RedisBus", channels: tuple[str, ...]) -> None:
        self.bus = bus
        self.channels = channels
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._redis_task: asyncio.Task | None = None

    def put_threadsafe(self, channel: str, message: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (channel, message))

    async def get(self, timeout_s: float | None = None) -> tuple[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def __aenter__(self) -> "Subscription":
        await self.bus._attach(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bus._detach(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[str, Any]:
        return await self.queue.get()


class LocalBus:
    """In-process bus; safe to publish from any thread or event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def subscribe(self, *channels: str) -> Subscription:
        return Subscription(self, channels)

    async def publish(self, channel: str, message: Any) -> None:
        self.publish_nowait(channel, message)

    def publish_nowait(self, channel: str, message: Any) -> None:
        with self._lock:
            subscribers = tuple(self._subscribers.get(channel, ()))
        # A round trip through JSON keeps local and Redis delivery identical.
        decoded = _decoder.decode(_encoder.encode(message))
        for subscription in subscribers:
            subscription.put_threadsafe(channel, decoded)

    async def _attach(self, subscription: Subscription) -> None:
        with self._lock:
            for channel in subscription.channels:
                self._subscribers[channel].add(subscription)

    async def _detach(self, subscription: Subscription) -> None:
        with self._lock:
            for channel in subscription.channels:
                subscribers = self._subscribers.get(channel)
                if subscribers is not None:
                    subscribers.discard(subscription)
                    if not subscribers:
                        del self._subscribers[channel]

    async def close(self) -> None:
        return None


class RedisBus:
    """Redis pub/sub. One connection per subscription keeps the code obvious; issue-level
    fan-out at scale (thousands of sockets) multiplexes in the web process instead."""

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as redis_asyncio

        self._redis_url = redis_url
        self._client = redis_asyncio.Redis.from_url(redis_url)

    def subscribe(self, *channels: str) -> Subscription:
        return Subscription(self, channels)

    async def publish(self, channel: str, message: Any) -> None:
        await self._client.publish(channel, _encoder.encode(message))

    async def _attach(self, subscription: Subscription) -> None:
        pubsub = self._client.pubsub()
        await pubsub.subscribe(*subscription.channels)
        subscription._pubsub = pubsub  # type: ignore[attr-defined]
        subscription._redis_task = asyncio.create_task(self._pump(subscription, pubsub))

    async def _pump(self, subscription: Subscription, pubsub) -> None:
        async for item in pubsub.listen():
            if item.get("type") != "message":
                continue
            channel = item["channel"].decode() if isinstance(item["channel"], bytes) else item["channel"]
            subscription.queue.put_nowait((channel, _decoder.decode(item["data"])))

    async def _detach(self, subscription: Subscription) -> None:
        if subscription._redis_task is not None:
            subscription._redis_task.cancel()
            try:
                await subscription._redis_task
            except (asyncio.CancelledError, Exception):
                pass
        pubsub = getattr(subscription, "_pubsub", None)
        if pubsub is not None:
            await pubsub.aclose()

    async def close(self) -> None:
        await self._client.aclose()
