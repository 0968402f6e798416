"""End-of-run invariant checks, in the spirit of Jepsen's bank and set checks.

Each check returns a list of human-readable violations; an empty list means it holds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import (
    ActorCommand,
    LedgerAccount,
    LedgerTransfer,
    PaymentIntent,
    PowerBank,
    Rental,
    RentalPackage,
    Station,
    StationSlot,
    Transaction,
    Wallet,
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


# --- what the load generators saw, against the database ---------------------------------------

FINAL_RENTAL_STATUSES = ("completed", "cancelled", "lost")


@dataclass
class Observations:
    """What simulated riders and stations were told or did, for `audit_observations`."""

    acknowledged_rentals: set[str] = field(default_factory=set)  # rental ids a rider saw started
    returns: list[tuple[str, str, str]] = field(default_factory=list)  # (rental id, bank serial, station serial)
    credited_minor: dict[str, int] = field(default_factory=dict)  # user id -> money put into their wallet


async def acknowledged_rentals_not_final(session: AsyncSession, observed: Observations) -> list[str]:
    """A rental a rider was told had started is in the database, and no longer open."""
    ids = [uuid.UUID(rental_id) for rental_id in observed.acknowledged_rentals]
    found = await _statuses(session, ids)
    problems = [f"rental {rental_id} was acknowledged but is not in the database" for rental_id in ids if rental_id not in found]
    problems += [f"rental {rental_id} was acknowledged but is left {found[rental_id]}"
                 for rental_id in ids if rental_id in found and found[rental_id] not in FINAL_RENTAL_STATUSES]
    return problems


async def _statuses(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    found: dict[uuid.UUID, str] = {}
    for start in range(0, len(ids), 500):
        rows = await session.execute(select(Rental.id, Rental.status).where(Rental.id.in_(ids[start:start + 500])))
        found.update(dict(rows.all()))
    return found


async def returns_not_closing_their_rental(session: AsyncSession, observed: Observations) -> list[str]:
    """Every bank a rider pushed into a station closed that rider's rental, at that station."""
    closed = await _closed_rentals(session, [uuid.UUID(rental_id) for rental_id, _, _ in observed.returns])
    problems = []
    for rental_id, bank_serial, station_serial in observed.returns:
        seen = closed.get(uuid.UUID(rental_id))
        if seen != ("completed", bank_serial, station_serial):
            problems.append(f"bank {bank_serial} returned at {station_serial} left rental {rental_id} as {seen}")
    return problems


async def _closed_rentals(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple]:
    returned_at = aliased(Station)
    found: dict[uuid.UUID, tuple] = {}
    for start in range(0, len(ids), 500):
        rows = await session.execute(
            select(Rental.id, Rental.status, PowerBank.serial, returned_at.serial)
            .outerjoin(PowerBank, PowerBank.id == Rental.power_bank_id)
            .outerjoin(returned_at, returned_at.id == Rental.return_station_id)
            .where(Rental.id.in_(ids[start:start + 500]))
        )
        found.update({rental_id: (status, bank, station) for rental_id, status, bank, station in rows.all()})
    return found


CREDIT_KINDS = ("admin_credit", "topup")


async def money_in_not_as_credited(session: AsyncSession, observed: Observations) -> list[str]:
    """The money each person was credited arrived in their wallet once: none created, none lost."""
    received = dict((await session.execute(
        select(Wallet.user_id, func.coalesce(func.sum(LedgerTransfer.amount_minor), 0))
        .outerjoin(LedgerTransfer, (LedgerTransfer.credit_account_id == Wallet.account_id)
                   & (LedgerTransfer.state == "posted") & LedgerTransfer.kind.in_(CREDIT_KINDS))
        .group_by(Wallet.user_id)
    )).all())
    problems = []
    for user_id, credited in observed.credited_minor.items():
        arrived = int(received.get(uuid.UUID(user_id), 0))
        if arrived != credited:
            problems.append(f"user {user_id} was credited {credited} but their wallet received {arrived}")
    return problems


async def rentals_not_paid_as_billed(session: AsyncSession, observed: Observations) -> list[str]:
    """Every completed rental's fee follows from its times and package, and was paid (money
    into revenue, points back to the issuer) or left due, to the minor unit."""
    from powerbank.actors import pricing
    from powerbank.actors.rental import billable_s, extended_minutes
    from powerbank.actors.wallet import POINTS_ISSUER_KIND, load_money_config

    ratio = (await load_money_config(session)).ratio
    paid = await _paid_per_rental(session, POINTS_ISSUER_KIND)
    rows = (await session.execute(
        select(Rental, RentalPackage).join(RentalPackage, RentalPackage.id == Rental.package_id).where(Rental.status == "completed")
    )).all()
    problems = []
    for rental, package in rows:
        used_s = max(0.0, (rental.returned_at - rental.started_at).total_seconds())
        billed_s = billable_s(used_s, await extended_minutes(session, rental.id))
        expected_fee = pricing.rental_fee_minor(pricing.Tariff.of(package), billed_s)
        money, points = paid.get(rental.id, (0, 0))
        settled = money + pricing.points_value_minor(points, ratio) + rental.due_minor
        if rental.fee_minor != expected_fee:
            problems.append(f"rental {rental.id} billed {rental.fee_minor}, its times and package say {expected_fee}")
        elif settled != rental.fee_minor or rental.charged_minor + rental.due_minor != rental.fee_minor:
            problems.append(f"rental {rental.id} billed {rental.fee_minor}: ledger paid {money} + {points} points, "
                            f"charged {rental.charged_minor}, due {rental.due_minor}")
    return problems


async def _paid_per_rental(session: AsyncSession, points_issuer_kind: str) -> dict[uuid.UUID, tuple[int, int]]:
    """(money into revenue, points back to the issuer) per rental, from posted transfers."""
    rows = (await session.execute(
        select(LedgerTransfer.rental_id, LedgerAccount.kind, func.sum(LedgerTransfer.amount_minor))
        .join(LedgerAccount, LedgerAccount.id == LedgerTransfer.credit_account_id)
        .where(LedgerTransfer.rental_id.is_not(None), LedgerTransfer.state == "posted",
               LedgerAccount.kind.in_(("platform_revenue", points_issuer_kind)))
        .group_by(LedgerTransfer.rental_id, LedgerAccount.kind)
    )).all()
    paid: dict[uuid.UUID, tuple[int, int]] = {}
    for rental_id, kind, amount in rows:
        money, points = paid.get(rental_id, (0, 0))
        paid[rental_id] = (money + int(amount), points) if kind == "platform_revenue" else (money, points + int(amount))
    return paid


OBSERVATION_CHECKS = {
    "acknowledged_rental_not_final": acknowledged_rentals_not_final,
    "return_not_closing_rental": returns_not_closing_their_rental,
    "money_in_not_as_credited": money_in_not_as_credited,
    "rental_not_paid_as_billed": rentals_not_paid_as_billed,
}


async def audit_observations(sessions: async_sessionmaker[AsyncSession], observed: Observations) -> dict[str, list[str]]:
    """Every observation check; violations by check name (only non-empty ones)."""
    found: dict[str, list[str]] = {}
    async with sessions() as session:
        for name, check in OBSERVATION_CHECKS.items():
            problems = await check(session, observed)
            if problems:
                found[name] = problems
    return found
