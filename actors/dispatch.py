"""Doorbells on Dramatiq: a message says only "this entity has mail".

With `REDIS_URL` the Redis broker carries them between processes; otherwise Dramatiq's
in-process stub broker does. Either way the worker threads run the async actor on the process's
own event loop (`SharedLoop`), so every process is one asyncio loop: HTTP, MQTT and actors share
it, and with it one database engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import dramatiq
from dramatiq.asyncio import EventLoopThread, set_event_loop_thread
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from powerbank.actors import runtime as actor_runtime

QUEUE_NAME = "mailboxes"
_actor: dramatiq.Actor | None = None


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
    await actor_runtime.current().drain(kind, entity_id)


class DramatiqDispatcher:
    def ring(self, kind: str, entity_id: str) -> None:
        assert _actor is not None, "setup_broker() first"
        _actor.send(kind, entity_id)


class SharedLoop(EventLoopThread):
    """Lets Dramatiq's worker threads run async actors on an already running loop (ours)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import logging

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
