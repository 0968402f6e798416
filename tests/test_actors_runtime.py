"""The runtime's promises on both backends: one command at a time per entity, in acceptance
order, once per command id, with follow-ups committed atomically."""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import func, select

from powerbank.actors.runtime import CommandRejected, handles
from powerbank.storage.models import ActorCommand, AppConfig


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


async def test_unknown_command_fails_without_blocking_the_mailbox(runtime):
    bad = await runtime.call("wallet", "m", "NoSuchCommand", {}, "bad-1")
    good = await runtime.call("wallet", "m", "TestAppend", {"item": 1}, "good-1")
    assert bad["reason"] == "unknown_command"
    assert good["ok"] is True
