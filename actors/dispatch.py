"""Doorbells: a doorbell says only "this entity has mail"; the mailbox table says what.

Embedded default: Dramatiq's in-process stub broker carries doorbells; its worker threads run the
async drain on the process's own event loop (`SharedLoop`), so every process is one asyncio loop
sharing one database engine.

With `REDIS_URL`, every doorbell is rung twice (`RedisDispatcher`):
- the fast lane: a Redis list that idle workers are blocked on (BLMPOP), so the first free
  worker wakes at once instead of at Dramatiq's next poll (up to `worker_timeout` later);
- the durable lane: a Dramatiq message, delayed by `FALLBACK_DELAY_MS`. If a worker died between
  popping the fast doorbell and draining, Dramatiq redelivers this one; normally it arrives to
  find the mailbox empty, which costs one short transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import dramatiq
from dramatiq.asyncio import EventLoopThread, set_event_loop_thread
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from powerbank.actors import runtime as actor_runtime

QUEUE_NAME = "mailboxes"
FAST_LANE_KEY = "powerbank:doorbells"
FALLBACK_DELAY_MS = 1000
FAST_LANE_BATCH = 64
FAST_LANE_CONCURRENCY = 16
_actor: dramatiq.Actor | None = None
log = logging.getLogger(__name__)


def _middleware() -> list:
    # A failed drain is retried quickly: the commands stay pending in the table meanwhile.
    retries = Retries(max_retries=20, min_backoff=50, max_backoff=5000)
    return [AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(), retries]


def setup_broker(redis_url: str | None) -> dramatiq.Broker:
    """Create the broker and declare the mailbox actor on it."""
    global _actor
    if redis_url:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=redis_url, middleware=_middleware())
    else:
        broker = StubBroker(middleware=_middleware())
    dramatiq.set_broker(broker)
    _actor = dramatiq.actor(drain_mailbox, queue_name=QUEUE_NAME, max_retries=20, broker=broker)
    return broker


async def drain_mailbox(kind: str, entity_id: str) -> None:
    runtime = actor_runtime.current()
    # With Redis this is usually the delayed fallback of a doorbell the fast lane served
    # already: look before opening a transaction.
    if runtime.single_writer or await runtime.has_pending(kind, entity_id):
        await runtime.drain(kind, entity_id)


class DramatiqDispatcher:
    def ring(self, kind: str, entity_id: str) -> None:
        assert _actor is not None, "setup_broker() first"
        _actor.send(kind, entity_id)

    ring_soon = ring


class RedisDispatcher:
    """Rings the fast lane and the durable lane; rings made in one loop iteration are
    coalesced (a hot entity rung 50 times needs one doorbell) and sent in one round trip."""

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as redis_asyncio

        self._client = redis_asyncio.Redis.from_url(redis_url)
        self._durable: set[tuple[str, str]] = set()
        self._fast: set[tuple[str, str]] = set()
        self._flushing = False

    def ring(self, kind: str, entity_id: str) -> None:
        self._durable.add((kind, entity_id))
        self.ring_soon(kind, entity_id)

    def ring_soon(self, kind: str, entity_id: str) -> None:
        """Fast lane only: for re-checks whose command already has its durable doorbell."""
        self._fast.add((kind, entity_id))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._fast or self._durable:
                fast, self._fast = self._fast, set()
                durable, self._durable = self._durable, set()
                if fast:
                    await self._client.lpush(FAST_LANE_KEY, *(f"{kind} {entity}" for kind, entity in fast))
                if durable:
                    await asyncio.to_thread(_send_durable, durable)
        except Exception:
            # The mailbox rows are committed; the scheduler's stalled-mailbox sweep rings again.
            log.exception("doorbells not sent; the scheduler will ring them")
        finally:
            self._flushing = False

    async def close(self) -> None:
        await self._client.aclose()


def _send_durable(doorbells: set[tuple[str, str]]) -> None:
    assert _actor is not None, "setup_broker() first"
    for kind, entity_id in doorbells:
        _actor.send_with_options(args=(kind, entity_id), delay=FALLBACK_DELAY_MS)


class FastLane:
    """A worker's listener on the fast lane: pops doorbells as they come and drains them on the
    loop, at most `concurrency` at a time (each holds a database connection)."""

    def __init__(self, redis_url: str, runtime, concurrency: int = FAST_LANE_CONCURRENCY) -> None:
        import redis.asyncio as redis_asyncio

        self._client = redis_asyncio.Redis.from_url(redis_url)
        self._runtime = runtime
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            try:
                popped = await self._client.blmpop(1, 1, FAST_LANE_KEY, direction="RIGHT", count=FAST_LANE_BATCH)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fast lane unavailable; Dramatiq still delivers (later)")
                await asyncio.sleep(1)
                continue
            if popped:
                await self._start_drains(popped[1])

    async def _start_drains(self, values: list[bytes]) -> None:
        for raw in dict.fromkeys(values):  # the same doorbell twice in one pop drains once
            kind, entity_id = raw.decode().split(" ", 1)
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._drain(kind, entity_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, kind: str, entity_id: str) -> None:
        try:
            await self._runtime.drain(kind, entity_id)
        except Exception:
            log.exception("fast-lane drain of %s/%s failed; Dramatiq will retry", kind, entity_id)
        finally:
            self._slots.release()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()


class SharedLoop(EventLoopThread):
    """Lets Dramatiq's worker threads run async actors on an already running loop (ours)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.interrupt_check_ival = 0.1
        self.logger = logging.getLogger("powerbank.dispatch")
        self.loop = loop


def start_worker(broker: dramatiq.Broker, loop: asyncio.AbstractEventLoop, threads: int = 8) -> dramatiq.Worker:
    set_event_loop_thread(SharedLoop(loop))  # type: ignore[arg-type]
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    return worker


class LoopDispatcher:
    """The stub beside `DramatiqDispatcher`: rings a doorbell by draining in a task on the
    running loop. Same mailbox semantics, no queue; for tests and tools. With `kinds`, only
    those actors drain and the others keep their commands pending for a test to inspect."""

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        self.kinds = None if kinds is None else set(kinds)
        self.runtime = None
        self.tasks: set[asyncio.Task] = set()

    def ring(self, kind: str, entity_id: str) -> None:
        if self.runtime is None or (self.kinds is not None and kind not in self.kinds):
            return
        task = asyncio.get_running_loop().create_task(self.runtime.drain(kind, entity_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def ring_soon(self, kind: str, entity_id: str) -> None:
        self.ring(kind, entity_id)

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Until no drain runs, twice in a row: the runtime re-rings a contended entity a few
        milliseconds later (call_later), so one empty moment is not the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_looks = 0
        while quiet_looks < 2:
            if loop.time() > deadline:
                raise TimeoutError("mailboxes did not settle")
            if self.tasks:
                quiet_looks = 0
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            else:
                quiet_looks += 1
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Settle, then ignore any later doorbell: nothing may outlive its owner."""
        try:
            await self.settle()
        finally:
            self.runtime = None
