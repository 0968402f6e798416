"""The runtime's metrics move with the work: applied, duplicates, depth and age of mailboxes."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from powerbank.actors import metrics
from powerbank.actors.runtime import handles


@handles("wallet", "MetricsNoop")
async def _noop(ctx, entity_id, payload):
    return {"ok": True}


def _value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_applied_duplicates_and_latency_are_counted(runtime):
    applied_before = _value("powerbank_actor_commands_applied_total", kind="wallet")
    duplicates_before = _value("powerbank_actor_duplicates_suppressed_total", kind="wallet")
    latency_before = _value("powerbank_actor_command_latency_seconds_count", kind="wallet")
    command_id = f"metrics-{uuid.uuid4()}"
    await runtime.call("wallet", "m1", "MetricsNoop", {}, command_id)
    await runtime.call("wallet", "m1", "MetricsNoop", {}, command_id)
    await runtime.test_dispatcher.settle()
    assert _value("powerbank_actor_commands_applied_total", kind="wallet") == applied_before + 1
    assert _value("powerbank_actor_duplicates_suppressed_total", kind="wallet") == duplicates_before + 1
    assert _value("powerbank_actor_command_latency_seconds_count", kind="wallet") == latency_before + 1


async def test_mailbox_depth_and_oldest_age_are_sampled_from_storage(engine):
    from powerbank.actors.bus import LocalBus
    from powerbank.actors.runtime import Runtime
    from powerbank.storage.db import session_factory

    idle = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None)  # nobody drains
    for n in range(3):
        await idle.submit("rental", f"r{n}", "MetricsNoop", {}, f"depth-{n}-{uuid.uuid4()}")
    found = await metrics.sample_mailboxes(idle.sessions)
    assert found["rental"][0] == 3 and found["rental"][1] >= 0.0
    assert _value("powerbank_actor_mailbox_depth", kind="rental") == 3
    assert _value("powerbank_actor_mailbox_depth", kind="station") == 0
