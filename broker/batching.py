"""Many concurrent lookups by key, answered by one query.

A reconnect storm is thousands of stations logging in within seconds, each login needing the
station's password hash, and each first message the station's id. Asked one by one, they take
a database connection each: on SQLite a pool of a few readers runs dry and logins fail with a
pool timeout, so stations retry and the storm feeds itself. Collected for one turn of the event
loop and asked together (`WHERE serial IN (...)`), a storm costs a handful of queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_KEYS_PER_QUERY = 500  # far below any database's parameter limit


class BatchedLookup(Generic[K, V]):
    """`await lookup.get(key)` from many tasks; `fetch_many(keys)` runs once per batch and
    returns what it found (a key it leaves out is answered None). One batch is in flight at a
    time; keys asked meanwhile wait for the next. An error fails that batch's callers only."""

    def __init__(self, fetch_many: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_keys: int = MAX_KEYS_PER_QUERY) -> None:
        self._fetch_many = fetch_many
        self._max_keys = max_keys
        self._waiting: dict[K, asyncio.Future[V | None]] = {}
        self._flusher: asyncio.Task | None = None
        self.queries = 0

    async def get(self, key: K) -> V | None:
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            # Read here too, so an error nobody waits for any more (callers cancelled) is not
            # reported as "never retrieved".
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other lookups of this turn join
        while self._waiting:
            keys = list(self._waiting)[: self._max_keys]
            batch = {key: self._waiting.pop(key) for key in keys}
            self.queries += 1
            try:
                found = await self._fetch_many(keys)
            except Exception as error:  # noqa: BLE001 - handed to exactly the callers it concerns
                for future in batch.values():
                    if not future.done():
                        future.set_exception(error)
                continue
            for key, future in batch.items():
                if not future.done():
                    future.set_result(found.get(key))


T = TypeVar("T")
R = TypeVar("R")


class BatchedCalls(Generic[T, R]):
    """`await calls.run(item)` from many tasks; `run_many(items)` runs once per batch and
    returns one answer per item, in order. One batch is in flight at a time; items given
    meanwhile wait for the next, so the busier the callee, the bigger its batches (group
    commit). An error fails that batch's callers only."""

    def __init__(self, run_many: Callable[[list[T]], Awaitable[list[R]]], *, max_items: int = MAX_KEYS_PER_QUERY) -> None:
        self._run_many = run_many
        self._max_items = max_items
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task | None = None
        self.batches = 0

    async def run(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._waiting.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other calls of this turn join
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max_items], self._waiting[self._max_items:]
            self.batches += 1
            try:
                answers = await self._run_many([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to exactly the callers it concerns
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        waiting, self._waiting = self._waiting, []
        for _, future in waiting:
            future.cancel()
