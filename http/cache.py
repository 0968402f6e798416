"""An in-process cache for the static tables the app reads on every start (content pages, FAQ,
contact info, banners, countries, app versions and updates).

How it is used:

- A read route asks `cache.get_or_load(key, loader)`; the loader runs (one database read) only
  when the key is missing or older than `ttl_s`. Concurrent misses of one key share one load.
- Whatever writes one of these tables calls `cache.invalidate(key)` (or `invalidate_prefix`)
  after its transaction commits; the next read loads fresh rows. Keys are named in
  `storage/models.py` next to each table: `countries`, `banners`, `faq`, `contact`,
  `app_versions`, `app_updates`, `content:<slug>`.
- The app keeps one `ReadCache` in `app.state.read_cache` (`read_cache_of(state)`), so an admin
  route in the same process reaches it there.

Several web processes each hold their own copy: a write calls `invalidate_everywhere`, which
forgets the keys here and publishes them on the bus (`cache:invalidate`, Redis pub/sub when
`REDIS_URL` is set); every web process runs `InvalidationFollower`, which forgets them there.
`ttl_s` (60 s) still bounds staleness if a message is lost (pub/sub delivers at most once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.datastructures import State

INVALIDATION_CHANNEL = "cache:invalidate"

DEFAULT_TTL_S = 60.0


class ReadCache:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, Any]] = {}
        self._loading: dict[str, asyncio.Future[Any]] = {}
        # Bumped by every invalidation, so a load that started before it is not stored after it.
        self._generation = 0
        self.loads = 0

    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[Any]]) -> Any:
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[0] < self.ttl_s:
            return entry[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        return await self._load(key, loader)

    async def _load(self, key: str, loader: Callable[[], Awaitable[Any]]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        generation = self._generation
        try:
            self.loads += 1
            value = await loader()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            self._loading.pop(key, None)
        if generation == self._generation:
            self._entries[key] = (self._clock(), value)
        future.set_result(value)
        return value

    def invalidate(self, *keys: str) -> None:
        """Forget these keys; call after the write that changed their rows has committed."""
        self._generation += 1
        for key in keys:
            self._entries.pop(key, None)

    def invalidate_prefix(self, prefix: str) -> None:
        self._generation += 1
        for key in [k for k in self._entries if k.startswith(prefix)]:
            del self._entries[key]

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()


def read_cache_of(state: State) -> ReadCache:
    return state.read_cache


async def invalidate_everywhere(state: State, *keys: str) -> None:
    """Forget `keys` in this process at once and in every other web process via the bus."""
    read_cache_of(state).invalidate(*keys)
    services = state.services
    if services is not None:
        await services.bus.publish(INVALIDATION_CHANNEL, {"keys": list(keys)})


class InvalidationFollower:
    """Listens on the bus for other processes' invalidations (started and stopped with the app)."""

    def __init__(self, cache: ReadCache, bus) -> None:
        self.cache, self.bus = cache, bus
        self._task: asyncio.Task | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        async with self.bus.subscribe(INVALIDATION_CHANNEL) as subscription:
            self._subscribed.set()
            while True:
                _, message = await subscription.get()
                self.cache.invalidate(*message.get("keys", []))
