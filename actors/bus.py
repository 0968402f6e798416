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

    async def publish_many(self, messages: list[tuple[str, Any]]) -> None:
        for channel, message in messages:
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
    """Redis pub/sub over one shared connection per process.

    Command results (`cmd:*`) arrive through one pattern subscription made at start, so a caller
    waiting for its result costs no Redis round trip and can never subscribe too late. Other
    channels are subscribed on first local interest, and a subscription counts as made only
    once Redis confirms it."""

    RESULT_PATTERN = "cmd:*"
    # Matched by the pattern; never a command's own channel (those are cmd:{kind}:{id}).
    RESULTS_CHANNEL = "cmd:"

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as redis_asyncio

        self._client = redis_asyncio.Redis.from_url(redis_url)
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Lock | None = None
        self._local: dict[str, set[Subscription]] = defaultdict(set)
        self._confirmations: dict[str, asyncio.Future] = {}

    def subscribe(self, *channels: str) -> Subscription:
        return Subscription(self, channels)

    async def publish(self, channel: str, message: Any) -> None:
        await self._client.publish(channel, _encoder.encode(message))

    async def publish_many(self, messages: list[tuple[str, Any]]) -> None:
        """One round trip for a whole batch. Command results travel as one message on
        `RESULTS_CHANNEL`, which every process receives through its `cmd:*` pattern anyway and
        splits locally: one Redis message to pack and parse instead of one per command."""
        results = [[channel, message] for channel, message in messages if channel.startswith("cmd:")]
        others = [(channel, message) for channel, message in messages if not channel.startswith("cmd:")]
        if not messages:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            if results:
                pipe.publish(self.RESULTS_CHANNEL, _encoder.encode(results))
            for channel, message in others:
                pipe.publish(channel, _encoder.encode(message))
            await pipe.execute()

    async def _attach(self, subscription: Subscription) -> None:
        await self._start_reader()
        for channel in subscription.channels:
            first = not self._local[channel]
            self._local[channel].add(subscription)
            if channel.startswith("cmd:"):
                continue
            if first:
                await self._confirmed(channel, self._pubsub.subscribe(channel))
            elif channel in self._confirmations:  # subscribed a moment ago, not yet confirmed
                await asyncio.shield(self._confirmations[channel])

    async def _detach(self, subscription: Subscription) -> None:
        for channel in subscription.channels:
            subscribers = self._local.get(channel)
            if subscribers is None:
                continue
            subscribers.discard(subscription)
            if not subscribers:
                del self._local[channel]
                if not channel.startswith("cmd:") and self._pubsub is not None:
                    await self._pubsub.unsubscribe(channel)

    async def _start_reader(self) -> None:
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self._pubsub is not None:
                return
            self._pubsub = self._client.pubsub()
            # The reader starts after the first request: redis-py ends `listen()` at once on a
            # pubsub that has no subscription yet.
            await self._confirmed(self.RESULT_PATTERN, self._pubsub.psubscribe(self.RESULT_PATTERN), start_reader=True)

    async def _confirmed(self, name: str, request, *, start_reader: bool = False) -> None:
        confirmation = asyncio.get_running_loop().create_future()
        self._confirmations[name] = confirmation
        await request
        if start_reader:
            self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(confirmation, 10)

    async def _read(self) -> None:
        async for item in self._pubsub.listen():
            kind = item.get("type")
            name = _text(item.get("channel"))  # the pattern itself in a psubscribe confirmation
            if kind in ("subscribe", "psubscribe"):
                confirmation = self._confirmations.pop(name, None)
                if confirmation is not None and not confirmation.done():
                    confirmation.set_result(None)
            elif kind in ("message", "pmessage"):
                if name == self.RESULTS_CHANNEL:
                    self._deliver_results(item["data"])
                else:
                    self._deliver(name, item["data"])

    def _deliver_results(self, data: bytes) -> None:
        for channel, message in _decoder.decode(data):
            for subscription in tuple(self._local.get(channel, ())):
                subscription.queue.put_nowait((channel, message))

    def _deliver(self, channel: str, data: bytes) -> None:
        subscribers = self._local.get(channel)
        if not subscribers:
            return
        message = _decoder.decode(data)
        for subscription in tuple(subscribers):
            subscription.queue.put_nowait((channel, message))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._client.aclose()


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
