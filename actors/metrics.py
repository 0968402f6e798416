"""Prometheus metrics of the actor runtime, per actor kind.

Counters and histograms are recorded where the work happens (the process that applies or
submits). Mailbox depth and the age of the oldest pending command are facts of the shared
database, so a sampler reads them from there every second; any process can export them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timezone

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select

from powerbank.storage.models import ACTOR_KINDS, ActorCommand
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

APPLY_SECONDS = Histogram(
    "powerbank_actor_apply_seconds", "Time a handler took to apply one command", ["kind"], buckets=LATENCY_BUCKETS_S
)
COMMAND_LATENCY_SECONDS = Histogram(
    "powerbank_actor_command_latency_seconds",
    "From acceptance (commit of the mailbox row) to the commit that applied it",
    ["kind"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "powerbank_actor_batch_commands", "Commands applied per transaction", ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
APPLIED = Counter("powerbank_actor_commands_applied_total", "Commands applied (including refusals)", ["kind"])
FAILED = Counter("powerbank_actor_commands_failed_total", "Commands given up on after repeated errors", ["kind"])
RETRIED = Counter("powerbank_actor_command_retries_total", "Attempts that hit an unexpected error and will retry", ["kind"])
DUPLICATES = Counter(
    "powerbank_actor_duplicates_suppressed_total", "Commands submitted again with a known id (no second effect)", ["kind"]
)
EMPTY_DRAINS = Counter(
    "powerbank_actor_redundant_doorbells_total",
    "Doorbells (redelivered, duplicated or fallback) that found the mailbox already empty",
    ["kind"],
)
APPLIED_IN_CALLER = Counter(
    "powerbank_actor_applied_in_caller_total",
    "Commands accepted and applied by the calling process itself (idle entity, empty mailbox)",
    ["kind"],
)
LOCK_BUSY = Counter("powerbank_actor_lock_busy_total", "Drains that found another drainer holding the entity", ["kind"])
MAILBOX_DEPTH = Gauge("powerbank_actor_mailbox_depth", "Commands pending, all entities of a kind", ["kind"])
OLDEST_PENDING_AGE = Gauge(
    "powerbank_actor_oldest_pending_age_seconds", "Age of the oldest pending command of a kind (0 when none)", ["kind"]
)
ALL_KINDS = "all"  # label for the single-writer pump, which drains every kind at once


async def sample_mailboxes(sessions) -> dict[str, tuple[int, float]]:
    """(pending count, oldest age in seconds) per kind, written to the gauges."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(ActorCommand.kind, func.count(), func.min(ActorCommand.accepted_at))
                .where(ActorCommand.status == "pending")
                .group_by(ActorCommand.kind)
            )
        ).all()
    now = utcnow()
    found = {kind: (int(count), _age_s(now, oldest)) for kind, count, oldest in rows}
    for kind in ACTOR_KINDS:
        depth, age_s = found.get(kind, (0, 0.0))
        MAILBOX_DEPTH.labels(kind).set(depth)
        OLDEST_PENDING_AGE.labels(kind).set(age_s)
    return found


def _age_s(now: datetime, oldest: datetime | str | None) -> float:
    if oldest is None:
        return 0.0
    if isinstance(oldest, str):  # SQLite may hand an aggregate back as text
        oldest = datetime.fromisoformat(oldest)
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return max(0.0, (now - oldest).total_seconds())


async def run_mailbox_sampler(sessions, interval_s: float = 1.0) -> None:
    while True:
        with contextlib.suppress(Exception):
            await sample_mailboxes(sessions)
        await asyncio.sleep(interval_s)
