"""A person's events kept for catch-up: numbered per person in commit order, only what
committed, pruned by age. Through the real runtime on SQLite and (marked) PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select

from powerbank.actors import user_events
from powerbank.actors.runtime import CommandRejected, handles
from powerbank.storage.models import UserEvent
from powerbank.storage.types import utcnow


@handles("wallet", "TestTellPerson")
async def tell_person(ctx, entity_id, payload):
    """Test-only: tells a person something, then maybe refuses (a refusal's words must vanish)."""
    ctx.notify(f"user:{payload['user']}", {"type": "test.told", "n": payload["n"]})
    ctx.notify(f"station:{entity_id}", {"type": "not.a.person"})
    if payload.get("refuse"):
        raise CommandRejected("refused_on_purpose")
    return {"ok": True}


async def kept(runtime, user_id) -> list[tuple[int, int]]:
    async with runtime.sessions() as session:
        rows = await session.execute(select(UserEvent.seq, UserEvent.payload).where(UserEvent.user_id == user_id).order_by(UserEvent.seq))
        return [(seq, payload["n"]) for seq, payload in rows.all()]


async def test_events_are_numbered_per_person_in_the_order_they_commit(runtime):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    for n, (entity, person) in enumerate([("e1", alice), ("e2", alice), ("e1", bob), ("e3", alice)], start=1):
        await runtime.call("wallet", entity, "TestTellPerson", {"user": str(person), "n": n}, f"tell-{n}")
    await runtime.test_dispatcher.settle()
    assert await kept(runtime, alice) == [(1, 1), (2, 2), (3, 4)]
    assert await kept(runtime, bob) == [(1, 3)]
    async with runtime.sessions() as session:
        assert await user_events.last_seq(session, alice) == 3
        assert [e["n"] for e in await user_events.since(session, alice, 1)] == [2, 4]


async def test_a_refused_command_keeps_nothing_and_a_batch_keeps_the_rest(runtime):
    person = uuid.uuid4()
    # Queued together so one transaction applies them; the refusal sends it to savepoints.
    for n in (1, 2, 3):
        await runtime.submit("wallet", "busy", "TestTellPerson", {"user": str(person), "n": n, "refuse": n == 2}, f"batch-{n}")
    await runtime.test_dispatcher.settle()
    await runtime.wait_idle(timeout_s=10)
    assert await kept(runtime, person) == [(1, 1), (2, 3)]


async def test_a_duplicate_command_is_not_a_second_event(runtime):
    person = uuid.uuid4()
    for _ in range(3):
        await runtime.call("wallet", "dup", "TestTellPerson", {"user": str(person), "n": 7}, "same-command")
    assert await kept(runtime, person) == [(1, 7)]


async def test_old_events_are_pruned(runtime):
    person = uuid.uuid4()
    await runtime.call("wallet", "old", "TestTellPerson", {"user": str(person), "n": 1}, "old-1")
    async with runtime.sessions.begin() as session:
        assert await user_events.prune(session, utcnow() + timedelta(days=6)) == 0
        assert await user_events.prune(session, utcnow() + timedelta(days=8)) == 1
    assert await kept(runtime, person) == []
    async with runtime.sessions() as session:
        assert await user_events.last_seq(session, person) == 1  # numbers are never reused
