"""The runtime's promises on both backends: one command at a time per entity, in acceptance
order, once per command id, with follow-ups committed atomically."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import func, select

from powerbank.actors import metrics
from powerbank.actors.bus import LocalBus
from powerbank.actors.runtime import AdvisoryLocks, CommandRejected, Runtime, handles, handles_batch
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import Base
from powerbank.storage.models import ActorCommand, AppConfig, OutboxMessage


@handles("wallet", "TestAppend")
async def _append(ctx, entity_id, payload):
    """Read-modify-write with a yield in between: interleaving two applies would lose an item."""
    key = f"test:{entity_id}"
    row = await ctx.session.get(AppConfig, key)
    items = list(row.value["items"]) if row else []
    await asyncio.sleep(random.random() / 1000)
    items.append(payload["item"])
    if row is None:
        ctx.session.add(AppConfig(key=key, value={"items": items}))
    else:
        row.value = {"items": items}
    await ctx.session.flush()
    return {"ok": True, "length": len(items)}


@handles("wallet", "TestForward")
async def _forward(ctx, entity_id, payload):
    await ctx.send("wallet", payload["to"], "TestAppend", {"item": payload["item"]}, f"fwd:{payload['item']}")
    if payload.get("explode"):
        raise RuntimeError("boom after sending")
    return {"ok": True}


@handles("wallet", "TestRefuse")
async def _refuse(ctx, entity_id, payload):
    raise CommandRejected("not_today", hint="tomorrow")


async def _items(runtime, entity_id):
    async with runtime.sessions() as session:
        row = await session.get(AppConfig, f"test:{entity_id}")
        return row.value["items"] if row else []


async def test_concurrent_senders_apply_one_at_a_time_in_order(runtime):
    entities = ["e1", "e2", "e3"]

    async def sender(sender_id: int):
        for n in range(15):
            entity = entities[(sender_id + n) % len(entities)]
            await runtime.submit("wallet", entity, "TestAppend", {"item": [sender_id, n]}, f"s{sender_id}-{n}")

    await asyncio.gather(*(sender(i) for i in range(8)))
    await runtime.test_dispatcher.settle()
    total = 0
    for entity in entities:
        items = await _items(runtime, entity)
        total += len(items)
        for sender_id in range(8):
            mine = [n for s, n in items if s == sender_id]
            assert mine == sorted(mine), f"sender {sender_id} reordered on {entity}: {mine}"
    assert total == 8 * 15


async def test_repeated_command_id_applies_once_and_returns_first_result(runtime):
    first = await runtime.call("wallet", "dup", "TestAppend", {"item": "a"}, "same-id")
    again = await runtime.call("wallet", "dup", "TestAppend", {"item": "a"}, "same-id")
    racing = await asyncio.gather(*(runtime.call("wallet", "dup", "TestAppend", {"item": "a"}, "same-id") for _ in range(5)))
    assert first == again == {"ok": True, "length": 1}
    assert all(result == first for result in racing)
    assert await _items(runtime, "dup") == ["a"]


async def test_command_id_reused_for_another_command_is_an_error(runtime):
    await runtime.call("wallet", "x", "TestAppend", {"item": 1}, "reused")
    try:
        await runtime.submit("wallet", "y", "TestAppend", {"item": 1}, "reused")
    except ValueError as error:
        assert "reused" in str(error)
    else:
        raise AssertionError("a reused command id was accepted")


async def test_rejection_is_a_result_not_a_failure(runtime):
    result = await runtime.call("wallet", "r", "TestRefuse", {}, "refuse-1")
    assert result == {"ok": False, "reason": "not_today", "hint": "tomorrow"}


async def test_follow_up_commands_commit_only_with_their_cause(runtime):
    ok = await runtime.call("wallet", "src", "TestForward", {"to": "dst", "item": "kept"}, "f1")
    failed = await runtime.call("wallet", "src", "TestForward", {"to": "dst", "item": "lost", "explode": True}, "f2")
    await runtime.test_dispatcher.settle()
    assert ok == {"ok": True}
    assert failed["reason"] == "internal_error"
    assert await _items(runtime, "dst") == ["kept"]
    async with runtime.sessions() as session:
        forwarded = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.command_id == "fwd:lost"))
    assert forwarded == 0


class _RecordingDoorbells:
    """Records doorbells by lane and drains nothing: only the runtime's follow-ups apply mail."""

    def __init__(self) -> None:
        self.fast: list[tuple[str, str]] = []
        self.durable: list[tuple[str, str]] = []

    def ring(self, kind, entity_id):
        self.fast.append((kind, entity_id))
        self.durable.append((kind, entity_id))

    def ring_soon(self, kind, entity_id):
        self.fast.append((kind, entity_id))


@pytest.mark.postgres
async def test_a_worker_applies_the_mail_it_sent_itself_without_a_doorbell(postgres_url):
    from tests.conftest import engine_with_tables

    async with engine_with_tables(postgres_url) as engine:
        doorbells = _RecordingDoorbells()
        rt = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=doorbells, locks=AdvisoryLocks())
        rt.follow_up_locally = True
        await rt.submit("wallet", "src", "TestForward", {"to": "dst", "item": "x"}, "fwd-src-1")
        await rt.drain("wallet", "src")
        await asyncio.gather(*rt._follow_ups)
        assert await _items(rt, "dst") == ["x"]
        # Nobody else was woken for it; a worker dying mid-drain is the stalled-mailbox sweep's.
        assert ("wallet", "dst") not in doorbells.fast + doorbells.durable


async def test_unknown_command_fails_without_blocking_the_mailbox(runtime):
    bad = await runtime.call("wallet", "m", "NoSuchCommand", {}, "bad-1")
    good = await runtime.call("wallet", "m", "TestAppend", {"item": 1}, "good-1")
    assert bad["reason"] == "unknown_command"
    assert good["ok"] is True


_flaky_failures: dict[str, int] = {}


@handles("wallet", "TestFlaky")
async def _flaky(ctx, entity_id, payload):
    """Fails unexpectedly `fail_times` times (after writing and announcing), then appends."""
    await _append(ctx, entity_id, {"item": "flaky-side-effect"})
    ctx.notify(f"test:{entity_id}", {"attempt": True})
    seen = _flaky_failures.get(payload["key"], 0)
    if seen < payload["fail_times"]:
        _flaky_failures[payload["key"]] = seen + 1
        raise ConnectionError("transient")
    return {"ok": True, "after_failures": seen}


async def test_unexpected_error_is_retried_in_order_without_leaking_effects(runtime):
    async with runtime.bus.subscribe("test:flaky-entity") as announcements:
        await runtime.submit("wallet", "flaky-entity", "TestFlaky", {"key": "k1", "fail_times": 2}, "flaky-1")
        second = await runtime.call("wallet", "flaky-entity", "TestAppend", {"item": "after"}, "after-1")
        first = (await runtime.outcome("wallet", "flaky-1")).result
        announced = announcements.queue.qsize()
    assert first == {"ok": True, "after_failures": 2}
    assert second["ok"]
    # The failed attempts' writes and announcements were rolled back with them.
    assert await _items(runtime, "flaky-entity") == ["flaky-side-effect", "after"]
    assert announced == 1


async def test_a_command_failing_every_time_is_given_up_on(runtime):
    result = await runtime.call("wallet", "doomed", "TestFlaky", {"key": "k2", "fail_times": 99}, "doomed-1")
    async with runtime.sessions() as session:
        row = (await session.execute(select(ActorCommand).where(ActorCommand.command_id == "doomed-1"))).scalar_one()
    assert result == {"ok": False, "reason": "internal_error"}
    assert (row.status, row.attempts) == ("failed", 5)
    assert await _items(runtime, "doomed") == []


# --- batch handlers ---------------------------------------------------------------------------

_runs_seen: list[tuple[str, int]] = []


@handles_batch("wallet", "TestAddMany")
async def _add_many(ctx, entity_id, payloads):
    """Appends a run of items with one write; an item "poison" makes the whole run raise, and
    an item "refuse" is refused without writing."""
    _runs_seen.append((entity_id, len(payloads)))
    if any(p["item"] == "poison" for p in payloads):
        raise RuntimeError("a poisoned run")
    accepted = [p["item"] for p in payloads if p["item"] != "refuse"]
    key = f"test:{entity_id}"
    row = await ctx.session.get(AppConfig, key)
    items = list(row.value["items"]) if row else []
    start = len(items)
    items.extend(accepted)
    if row is None:
        ctx.session.add(AppConfig(key=key, value={"items": items}))
    else:
        row.value = {"items": items}
    await ctx.session.flush()
    results, position = [], start
    for p in payloads:
        if p["item"] == "refuse":
            results.append(CommandRejected("refused_item").as_result())
        else:
            position += 1
            results.append({"ok": True, "length": position})
    return results


async def _submit_all(runtime, entity, items, prefix, name="TestAddMany"):
    for n, item in enumerate(items):
        await runtime.submit("wallet", entity, name, {"item": item}, f"{prefix}-{n}")


async def test_a_batch_handler_takes_a_backlog_as_one_run_with_results_in_order(runtime):
    runtime.dispatcher, dispatcher = None, runtime.dispatcher  # let a backlog build up
    await _submit_all(runtime, "b1", ["a", "refuse", "b", "c"], "run")
    runtime.dispatcher = dispatcher
    _runs_seen.clear()
    await runtime.drain("wallet", "b1")
    outcomes = [(await runtime.outcome("wallet", f"run-{n}")).result for n in range(4)]
    assert _runs_seen == [("b1", 4)]
    assert outcomes == [
        {"ok": True, "length": 1},
        {"ok": False, "reason": "refused_item"},
        {"ok": True, "length": 2},
        {"ok": True, "length": 3},
    ]
    assert await _items(runtime, "b1") == ["a", "b", "c"]


async def test_another_command_in_between_splits_the_run(runtime):
    runtime.dispatcher, dispatcher = None, runtime.dispatcher
    await _submit_all(runtime, "b2", ["a", "b"], "first")
    await runtime.submit("wallet", "b2", "TestAppend", {"item": "single"}, "between")
    await _submit_all(runtime, "b2", ["c"], "last")
    runtime.dispatcher = dispatcher
    _runs_seen.clear()
    await runtime.drain("wallet", "b2")
    assert _runs_seen == [("b2", 2), ("b2", 1)]
    assert await _items(runtime, "b2") == ["a", "b", "single", "c"]


async def test_a_raising_run_is_redone_one_command_at_a_time(runtime):
    runtime.dispatcher, dispatcher = None, runtime.dispatcher
    await _submit_all(runtime, "b3", ["a", "poison", "b"], "mixed")
    runtime.dispatcher = dispatcher
    _runs_seen.clear()
    await runtime.drain("wallet", "b3")
    await runtime.test_dispatcher.settle()
    outcomes = [(await runtime.outcome("wallet", f"mixed-{n}")) for n in range(3)]
    # The whole run was tried once, then each command alone; only the poison one failed.
    assert _runs_seen[0] == ("b3", 3)
    assert ("b3", 1) in _runs_seen[1:]
    assert [o.status for o in outcomes] == ["applied", "failed", "applied"]
    assert outcomes[1].result == {"ok": False, "reason": "internal_error"}
    assert await _items(runtime, "b3") == ["a", "b"]


async def test_concurrent_submits_share_statements_and_keep_each_callers_answer(runtime):
    """Group commit: many submits at once, duplicates among them, each caller told the truth."""
    ids = [f"g-{n % 40}" for n in range(60)]  # 20 ids submitted twice
    outcomes = await asyncio.gather(*(
        runtime.submit("wallet", "g", "TestAppend", {"item": command_id}, command_id) for command_id in ids
    ))
    await runtime.test_dispatcher.settle()
    fresh = [o for o in outcomes if not o.duplicate]
    assert len(fresh) == 40
    assert sorted(await _items(runtime, "g")) == sorted(set(ids))


# --- applied in the caller (PostgreSQL: the idle fast path) ----------------------------------


@pytest.fixture
async def caller_runtime(postgres_url):
    """Nobody drains: whatever is applied was applied by `call` itself."""
    engine = create_engine(postgres_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=AdvisoryLocks(), apply_in_caller=True)
    await engine.dispose()


def _applied_in_caller() -> float:
    return metrics.APPLIED_IN_CALLER.labels("wallet")._value.get()


@pytest.mark.postgres
async def test_an_idle_entity_is_applied_by_its_caller_once(caller_runtime):
    before = _applied_in_caller()
    first = await caller_runtime.call("wallet", "idle", "TestAppend", {"item": "a"}, "idle-1")
    again = await caller_runtime.call("wallet", "idle", "TestAppend", {"item": "a"}, "idle-1")
    assert first == again == {"ok": True, "length": 1}
    assert _applied_in_caller() - before == 1
    assert await _items(caller_runtime, "idle") == ["a"]
    outcome = await caller_runtime.outcome("wallet", "idle-1")
    assert (outcome.status, outcome.result) == ("applied", first)


@pytest.mark.postgres
async def test_a_caller_queues_behind_pending_mail_and_keeps_the_order(caller_runtime):
    await caller_runtime.submit("wallet", "busy", "TestAppend", {"item": "queued"}, "busy-1")
    waiting = asyncio.create_task(caller_runtime.call("wallet", "busy", "TestAppend", {"item": "later"}, "busy-2"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # it did not jump the queue
    await caller_runtime.drain("wallet", "busy")
    assert (await asyncio.wait_for(waiting, 10))["ok"]
    assert await _items(caller_runtime, "busy") == ["queued", "later"]


@pytest.mark.postgres
async def test_a_refusal_or_error_in_the_caller_leaves_nothing_and_goes_to_the_queue(caller_runtime):
    before = _applied_in_caller()
    refused = asyncio.create_task(caller_runtime.call("wallet", "r", "TestRefuse", {}, "refuse-in-caller"))
    forwarded = asyncio.create_task(
        caller_runtime.call("wallet", "src", "TestForward", {"to": "dst", "item": "x", "explode": True}, "explode-in-caller")
    )
    await asyncio.sleep(0.3)
    assert _applied_in_caller() == before
    async with caller_runtime.sessions() as session:
        sent = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.command_id == "fwd:x"))
    assert sent == 0  # the follow-up the exploding handler sent was rolled back with it
    await caller_runtime.drain("wallet", "r")
    for _ in range(5):  # no dispatcher here to re-ring a retried command: drain by hand
        await caller_runtime.drain("wallet", "src")
    assert await asyncio.wait_for(refused, 10) == {"ok": False, "reason": "not_today", "hint": "tomorrow"}
    assert (await asyncio.wait_for(forwarded, 10))["reason"] == "internal_error"


class _BusyOnceLocks:
    """The entity is locked elsewhere on the first try; the re-ring that a busy lock schedules
    comes back while that drain is still running (here: at once)."""

    def __init__(self, runtime_ref: list) -> None:
        self.tries, self.runtime_ref = 0, runtime_ref

    async def try_lock(self, session, kind, entity_id) -> bool:
        self.tries += 1
        if self.tries == 1:
            assert await self.runtime_ref[0].drain(kind, entity_id) == 0  # only "drain again"
            return False
        return True

    async def try_lock_idle(self, session, kind, entity_id) -> bool:
        return False

    def release(self, kind, entity_id) -> None:
        return None


async def test_a_ring_that_comes_back_while_a_busy_drain_is_closing_is_not_lost(engine):
    runtime_ref: list = []
    locks = _BusyOnceLocks(runtime_ref)
    runtime = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=locks)
    runtime_ref.append(runtime)
    await runtime.submit("wallet", "ring-1", "TestAppend", {"item": 1}, "ring-1:1")
    assert await runtime.drain("wallet", "ring-1") == 1
    assert locks.tries == 2 and await _items(runtime, "ring-1") == [1]


_CONTEXTS_SEEN: list[tuple[int, str]] = []


@handles("wallet", "TestSlow")
async def _slow(ctx, entity_id, payload):
    await asyncio.sleep(0.02)
    _CONTEXTS_SEEN.append((id(ctx), entity_id))
    return {"ok": True}


async def test_the_single_writer_pump_keeps_each_transaction_short_and_applies_everything(tmp_path, monkeypatch):
    """On SQLite everything queues behind the pump's transaction (one writer): a backlog is
    applied in transactions of bounded length, in acceptance order, none left behind."""
    from powerbank.actors import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "MAX_PUMP_TRANSACTION_S", 0.05)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pump.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    pump = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=None, single_writer=True)
    _CONTEXTS_SEEN.clear()
    entities = [f"slow-{n}" for n in range(12)]
    for n, entity in enumerate(entities):
        await pump.submit("wallet", entity, "TestSlow", {}, f"slow:{n}")
    assert await pump.drain("wallet", entities[0]) == len(entities)
    assert [entity for _, entity in _CONTEXTS_SEEN] == entities
    transactions = len({context for context, _ in _CONTEXTS_SEEN})
    assert 3 <= transactions < len(entities)
    await engine.dispose()


async def test_a_single_writer_counts_the_commands_waiting_without_a_query(tmp_path):
    """The embedded broker's login gate watches this count (embedded.Admission): accepted
    commands and follow-ups add to it, applied or failed ones take from it."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'count.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    pump = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=None, single_writer=True)
    for n in range(3):
        await pump.submit("wallet", f"count-{n}", "TestSlow", {}, f"count:{n}")
    await pump.submit("wallet", "count-0", "TestSlow", {}, "count:0")  # a duplicate adds nothing
    await pump.submit("wallet", "count-9", "NoSuchCommand", {}, "count:unknown")  # fails, still counted
    assert pump.backlog() == 4
    await pump.drain("wallet", "count-0")
    assert pump.backlog() == 0
    assert Runtime(session_factory(engine), bus=LocalBus(), single_writer=False).backlog() is None
    await engine.dispose()


class _CountingDispatcher:
    def __init__(self) -> None:
        self.rings: list[tuple[str, str]] = []

    def ring(self, kind: str, entity_id: str) -> None:
        self.rings.append((kind, entity_id))


async def test_a_single_writer_sends_one_pump_doorbell_at_a_time_and_rings_again_when_one_is_overdue(tmp_path, monkeypatch):
    """Every doorbell runs the same pump over every mailbox: one outstanding is enough, a ring
    while the pump runs makes it look again, and a doorbell overdue (lost) is rung again."""
    from powerbank.actors import runtime as runtime_module

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bells.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    dispatcher = _CountingDispatcher()
    pump = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=dispatcher, locks=None, single_writer=True)
    _CONTEXTS_SEEN.clear()
    entities = [f"bell-{n}" for n in range(20)]
    await asyncio.gather(*(pump.submit("wallet", e, "TestSlow", {}, f"bell:{e}") for e in entities))
    assert len(dispatcher.rings) == 1
    late = asyncio.ensure_future(pump.submit("wallet", "bell-late", "TestSlow", {}, "bell:late"))
    assert await pump.drain(*dispatcher.rings[0]) == len(entities) + 1  # the late one made it look again
    await late
    assert len(dispatcher.rings) == 1 and sorted(e for _, e in _CONTEXTS_SEEN) == sorted([*entities, "bell-late"])
    await pump.submit("wallet", "bell-after", "TestSlow", {}, "bell:after")
    assert len(dispatcher.rings) == 2  # the pump had stopped: a new doorbell
    monkeypatch.setattr(runtime_module, "PUMP_DOORBELL_OVERDUE_S", 0.0)
    await pump.submit("wallet", "bell-lost", "TestSlow", {}, "bell:lost")
    assert len(dispatcher.rings) == 3  # the previous one never arrived: rung again
    assert await pump.drain(*dispatcher.rings[-1]) == 2
    await engine.dispose()


@handles("wallet", "TestPublish")
async def _publish(ctx, entity_id, payload):
    await ctx.publish_mqtt(f"test/{entity_id}", {"n": payload["n"]})
    return {"ok": True}


class _SlowSink:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, int]] = []
        self.gate = asyncio.Event()

    async def deliver(self, messages) -> None:
        await self.gate.wait()
        self.delivered.extend((m.topic, m.payload["n"]) for m in messages)


async def test_a_single_writers_pump_does_not_wait_for_mqtt_and_its_rows_leave_in_commit_order(tmp_path, monkeypatch):
    """The pump applied every station's boot, and waited for every PUBACK of the configs it
    wrote before the next transaction. Now the rows leave from a background task, batch after
    batch in commit order; wait_idle also waits for them."""
    from powerbank.actors import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "OUTBOX_DELIVERY_BATCH", 2)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sink = _SlowSink()
    pump = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=None, single_writer=True, outbox_sink=sink)
    for n in range(3):
        await pump.submit("wallet", "pub-a", "TestPublish", {"n": n}, f"pub:a:{n}")
    assert await asyncio.wait_for(pump.drain("wallet", "pub-a"), 5) == 3  # the sink has not answered yet
    for n in range(3, 5):
        await pump.submit("wallet", "pub-a", "TestPublish", {"n": n}, f"pub:a:{n}")
    assert await asyncio.wait_for(pump.drain("wallet", "pub-a"), 5) == 2
    assert sink.delivered == [] and not await pump.wait_idle(timeout_s=0.2)
    sink.gate.set()
    assert await pump.wait_idle(timeout_s=5)
    assert sink.delivered == [("test/pub-a", n) for n in range(5)]
    async with pump.sessions() as session:
        unsent = await session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None)))
    assert unsent == 0
    await pump.close()
    await engine.dispose()
