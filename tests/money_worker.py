"""A worker process for tests/test_money_concurrency.py, run by path with DATABASE_URL set.

It reads its share of the plan (JSON: top-ups, spends, rentals to hold and charge, all on
ONE wallet), submits them from 16 concurrent senders, and applies commands itself: its own
in-process dispatcher drains the wallet's mailbox, competing with the other worker process for
the wallet's advisory lock. A rental's PlaceHold is accepted before its CaptureHold is submitted
(one sender), so the hold exists when the charge applies. It exits once nothing is pending.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from sqlalchemy import select

import powerbank.actors.rental  # noqa: F401  (registers the handlers)
import powerbank.actors.wallet  # noqa: F401
from powerbank.actors import metrics
from powerbank.actors.bus import LocalBus
from powerbank.actors.dispatch import LoopDispatcher
from powerbank.actors.runtime import AdvisoryLocks, Runtime
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import ActorCommand

SENDERS = 16


async def main(plan_path: str) -> None:
    plan = json.loads(open(plan_path).read())
    engine = create_engine(os.environ["DATABASE_URL"])
    dispatcher = LoopDispatcher()
    runtime = Runtime(session_factory(engine), bus=LocalBus(), dispatcher=dispatcher, locks=AdvisoryLocks(),
                      single_writer=False, apply_in_caller=True)
    dispatcher.runtime = runtime
    user_id = plan["user_id"]
    queue: asyncio.Queue = asyncio.Queue()
    for op in plan["ops"]:
        queue.put_nowait(op)

    async def sender() -> None:
        while not queue.empty():
            op = queue.get_nowait()
            if op["op"] == "credit":
                payload = {"amount_minor": op["amount_minor"], "currency": "NPR", "transfer_id": op["id"], "reason": "top-up"}
                await runtime.submit("wallet", user_id, "CreditWallet", payload, f"credit:{op['id']}")
            elif op["op"] == "spend":
                payload = {"amount_minor": op["amount_minor"], "currency": "NPR", "transfer_id": op["id"], "reason": "purchase"}
                await runtime.submit("wallet", user_id, "SpendWallet", payload, f"spend:{op['id']}")
            else:
                hold = {"rental_id": op["rental_id"], "amount_minor": op["hold_minor"], "currency": "NPR", "max_active_rentals": 10**6}
                await runtime.submit("wallet", user_id, "PlaceHold", hold, f"hold:{op['rental_id']}")
                await asyncio.sleep(0)
                charge = {"rental_id": op["rental_id"], "amount_minor": op["fee_minor"]}
                await runtime.submit("wallet", user_id, "CaptureHold", charge, f"capture:{op['rental_id']}")

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    deadline = asyncio.get_running_loop().time() + 90
    while asyncio.get_running_loop().time() < deadline:
        async with runtime.sessions() as session:
            pending = (await session.execute(
                select(ActorCommand.kind, ActorCommand.entity_id).where(ActorCommand.status == "pending").distinct()
            )).all()
        if not pending:
            break
        for kind, entity_id in pending:  # the other worker may hold the lock, or have exited: knock again
            runtime.ring(kind, entity_id)
        await asyncio.sleep(0.05)
    await dispatcher.settle()
    await engine.dispose()
    # The last line tells the test how much of the work this process did itself.
    print(json.dumps({
        "applied_wallet": int(metrics.APPLIED.labels("wallet")._value.get()),
        "lock_busy_wallet": int(metrics.LOCK_BUSY.labels("wallet")._value.get()),
    }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
