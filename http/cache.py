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

Several web processes each hold their own copy and an invalidation reaches only the process that
made the write; `ttl_s` bounds how long another process may serve the old rows (60 s by default,
fine for text that changes a few times a year). A cross-process invalidation can later publish
the key on the actor bus and call `invalidate` in each subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.datastructures import State

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
