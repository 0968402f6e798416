"""WARNING and worse from the `powerbank` loggers into the `system_logs` table, for admins
(`GET /api/admin/system/logs`), without ever slowing or breaking what logged.

- `SystemLogHandler.emit` only appends to a `SystemLogSink` under a lock: no I/O, so a handler
  called on the event loop (or in a worker thread) never blocks it.
- The sink is bounded twice: each message is truncated to `max_message` characters, and at most
  `per_minute` records are accepted per wall-clock minute (and at most `max_pending` wait), so a
  log storm costs a few rows, not a flooded table. What was dropped in a minute is counted and
  written as one summary row when that minute is over.
- `drain_forever` (an asyncio task the app starts and stops with its lifespan) writes what is
  pending every `interval_s` in one transaction. If the database is down the rows wait (up to
  `max_pending`) and the failure goes to the process log only: records of this module's own
  logger are never fed back into the sink, so a failing flush cannot feed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.storage.models import SystemLog

log = logging.getLogger(__name__)

ROOT_LOGGER = "powerbank"
PER_MINUTE = 60
MAX_MESSAGE = 2000
MAX_PENDING = 500
DRAIN_INTERVAL_S = 2.0
LEVEL_NAMES = {logging.WARNING: "WARNING", logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}


def level_name(levelno: int) -> str:
    """The stored level: custom levels between the standard ones round down."""
    for number in (logging.CRITICAL, logging.ERROR, logging.WARNING):
        if levelno >= number:
            return LEVEL_NAMES[number]
    return "WARNING"


def truncate(message: str, limit: int) -> str:
    return message if len(message) <= limit else message[: max(0, limit - 1)] + "…"


class SystemLogSink:
    """Records waiting to be written, with the per-minute cap. Thread-safe; never does I/O."""

    def __init__(
        self, *, per_minute: int = PER_MINUTE, max_message: int = MAX_MESSAGE, max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self.max_message = max_message
        self.max_pending = max_pending
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: deque[dict[str, Any]] = deque()
        self._minute = int(clock() // 60)
        self._accepted = 0
        self._dropped = 0
        self.dropped_total = 0

    def offer(self, level: str, logger: str, message: str, created: float | None = None) -> bool:
        """Queue one record unless this minute's quota (or the buffer) is used up."""
        now = self._clock()
        with self._lock:
            self._roll(now)
            if self._accepted >= self.per_minute or len(self._pending) >= self.max_pending:
                self._dropped += 1
                self.dropped_total += 1
                return False
            self._accepted += 1
            self._pending.append(self._row(level, logger, message, created if created is not None else now))
            return True

    def take(self) -> list[dict[str, Any]]:
        """Everything pending, oldest first (and the summary of a finished minute's drops)."""
        with self._lock:
            self._roll(self._clock())
            rows = list(self._pending)
            self._pending.clear()
            return rows

    def put_back(self, rows: list[dict[str, Any]]) -> None:
        """Rows a failed flush could not write wait for the next one, within `max_pending`."""
        with self._lock:
            room = max(0, self.max_pending - len(self._pending))
            self._pending.extendleft(reversed(rows[-room:] if room else []))
            lost = len(rows) - min(room, len(rows))
            self.dropped_total += lost

    def _roll(self, now: float) -> None:
        minute = int(now // 60)
        if minute == self._minute:
            return
        if self._dropped:
            summary = f"{self._dropped} log records dropped in one minute (cap {self.per_minute} a minute)"
            self._pending.append(self._row("WARNING", __name__, summary, self._minute * 60 + 59.999))
        self._minute, self._accepted, self._dropped = minute, 0, 0

    def _row(self, level: str, logger: str, message: str, created: float) -> dict[str, Any]:
        return {
            "level": level,
            "logger": truncate(logger, 100),
            "message": truncate(message, self.max_message),
            "created_at": datetime.fromtimestamp(created, timezone.utc),
        }


class SystemLogHandler(logging.Handler):
    """Feeds WARNING+ records to a sink; never raises, never waits."""

    def __init__(self, sink: SystemLogSink, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == __name__:
            return  # this module's own complaints (a failed flush) must not feed the sink
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message} [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
            self.sink.offer(level_name(record.levelno), record.name, message, record.created)
        except Exception:  # a logging handler must not break the code that logged
            self.handleError(record)


async def flush(sink: SystemLogSink, sessions: async_sessionmaker[AsyncSession]) -> int:
    """Write what is pending in one transaction; on failure the rows go back to the sink."""
    rows = sink.take()
    if not rows:
        return 0
    try:
        async with sessions.begin() as session:
            session.add_all([SystemLog(**row) for row in rows])
    except Exception as exc:
        sink.put_back(rows)
        log.warning("system log: could not write %d rows: %s", len(rows), exc)
        return 0
    return len(rows)


async def drain_forever(sink: SystemLogSink, sessions: async_sessionmaker[AsyncSession], interval_s: float = DRAIN_INTERVAL_S) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await flush(sink, sessions)


class SystemLogRecorder:
    """The app's lifespan hooks: attach the handler and start draining; on shutdown detach,
    stop and write what is left."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], sink: SystemLogSink | None = None, interval_s: float = DRAIN_INTERVAL_S) -> None:
        self.sessions = sessions
        self.sink = sink or SystemLogSink()
        self.handler = SystemLogHandler(self.sink)
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        logging.getLogger(ROOT_LOGGER).addHandler(self.handler)
        self._task = asyncio.create_task(drain_forever(self.sink, self.sessions, self.interval_s), name="system-log-drain")

    async def stop(self) -> None:
        logging.getLogger(ROOT_LOGGER).removeHandler(self.handler)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await flush(self.sink, self.sessions)
