"""End-of-run invariant checks, in the spirit of Jepsen's bank and set checks.

Each check returns a list of human-readable violations; an empty list means it holds.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import (
    ActorCommand,
    LedgerTransfer,
    PaymentIntent,
    PowerBank,
    Rental,
    StationSlot,
    Transaction,
)

TRANSIENT_RENTAL_STATUSES = ("pending", "ejecting")
OPEN_RENTAL_STATUSES = ("active", "overdue")


async def banks_in_two_places(session: AsyncSession) -> list[str]:
    """A bank is in at most one slot, at most one open rental, and never in both at once."""
    problems = []
    in_rentals = (
        await session.execute(
            select(Rental.power_bank_id, func.count())
            .where(Rental.status.in_(OPEN_RENTAL_STATUSES), Rental.power_bank_id.is_not(None))
            .group_by(Rental.power_bank_id)
        )
    ).all()
    for bank_id, count in in_rentals:
        if count > 1:
            problems.append(f"bank {bank_id} is in {count} open rentals")
    rented = {bank_id for bank_id, _ in in_rentals}
    slotted = set(
        (await session.execute(select(StationSlot.power_bank_id).where(StationSlot.power_bank_id.is_not(None)))).scalars()
    )
    for bank_id in rented & slotted:
        problems.append(f"bank {bank_id} is both in a slot and out on a rental")
    return problems


async def rentals_left_transient(session: AsyncSession) -> list[str]:
    rows = (await session.execute(select(Rental.id, Rental.status).where(Rental.status.in_(TRANSIENT_RENTAL_STATUSES)))).all()
    return [f"rental {rental_id} left in {status}" for rental_id, status in rows]


async def commands_left_pending(session: AsyncSession) -> list[str]:
    count = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.status == "pending"))
    return [f"{count} commands still pending"] if count else []


async def commands_failed(session: AsyncSession) -> list[str]:
    rows = (await session.execute(select(ActorCommand.kind, ActorCommand.name, ActorCommand.entity_id).where(ActorCommand.status == "failed"))).all()
    return [f"command {name} on {kind}/{entity} failed" for kind, name, entity in rows]


async def rented_banks_without_rental(session: AsyncSession) -> list[str]:
    rented = set((await session.execute(select(PowerBank.id).where(PowerBank.status == "rented"))).scalars())
    open_ = set(
        (await session.execute(select(Rental.power_bank_id).where(Rental.status.in_(OPEN_RENTAL_STATUSES)))).scalars()
    )
    return [f"bank {bank_id} marked rented with no open rental" for bank_id in rented - open_]


PAID_STATUSES = ("confirmed", "refunded")
PAYMENT_TYPES = ("topup", "auto_refill", "rental")


async def payments_settled_once(session: AsyncSession) -> list[str]:
    """Every paid provider intent moved money exactly once (one transaction row, backed by a
    ledger transfer of the amount received); an unpaid one moved none."""
    problems = []
    rows = (await session.execute(
        select(PaymentIntent.id, PaymentIntent.status, PaymentIntent.amount_received_minor,
               func.count(Transaction.id), func.min(LedgerTransfer.amount_minor), func.count(LedgerTransfer.id))
        .outerjoin(Transaction, (Transaction.payment_intent_id == PaymentIntent.id) & Transaction.type.in_(PAYMENT_TYPES))
        .outerjoin(LedgerTransfer, LedgerTransfer.id == Transaction.ledger_transfer_id)
        .group_by(PaymentIntent.id, PaymentIntent.status, PaymentIntent.amount_received_minor)
    )).all()
    for intent_id, status, received, transactions, transfer_amount, transfers in rows:
        expected = 1 if status in PAID_STATUSES else 0
        if transactions != expected or transfers != expected:
            problems.append(f"intent {intent_id} ({status}) has {transactions} payment transactions, {transfers} transfers")
        elif expected and transfer_amount != received:
            problems.append(f"intent {intent_id} received {received} but moved {transfer_amount}")
    return problems


CHECKS = {
    "bank_in_two_places": banks_in_two_places,
    "rental_transient": rentals_left_transient,
    "ledger": ledger_discrepancies,
    "command_pending": commands_left_pending,
    "command_failed": commands_failed,
    "rented_bank_without_rental": rented_banks_without_rental,
    "payments": payments_settled_once,
}


async def audit(sessions: async_sessionmaker[AsyncSession]) -> dict[str, list[str]]:
    """Run every check; returns violations by check name (only non-empty ones)."""
    found: dict[str, list[str]] = {}
    async with sessions() as session:
        for name, check in CHECKS.items():
            problems = await check(session)
            if problems:
                found[name] = problems
    return found
