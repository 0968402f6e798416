"""Double-entry ledger primitives, used only by the Wallet actor.

Every movement is one immutable row in `ledger_transfers` between two accounts, idempotent by id.
Holds are two-phase: a `pending` row reserves funds; exactly one later row with `pending_id` set
resolves it, either `posted` (for at most the held amount) or `voided`. The unique index on
`pending_id` makes "exactly once" a database fact, not a hope.

A person's accounts (wallet, points) keep running totals, updated in the same transaction as the
transfer row, so the totals always equal the sum of the rows (checked by `ledger_discrepancies`).
Shared accounts (platform revenue, adjustments, clearing) keep no stored totals: every wallet's
actor moves money to or from them, and a stored total there would be one row that every wallet
writes. Different wallets' transactions would then queue on it and deadlock when batches touch
two shared accounts in different orders. Their balances are sums over the transfer rows instead.
"""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from powerbank.storage.db import insert_unless_exists
from powerbank.storage.models import LedgerAccount, LedgerTransfer
from powerbank.storage.types import utcnow


# Accounts with a single owner (one Wallet actor) keep running totals; shared ones do not.
OWNED_ACCOUNT_KINDS = frozenset({"user_wallet", "user_points"})


class LedgerError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Balance:
    posted_minor: int
    held_minor: int

    @property
    def available_minor(self) -> int:
        return self.posted_minor - self.held_minor


def credit_balance(account: LedgerAccount) -> Balance:
    """Balance of a credit-normal account (a person's wallet or points)."""
    return Balance(account.credits_posted - account.debits_posted, account.debits_pending)


async def get_or_create_account(
    session: AsyncSession, code: str, kind: str, currency: str, *, user_id=None, no_overdraft=False
) -> LedgerAccount:
    account = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == code))).scalar_one_or_none()
    if account is None:
        account = LedgerAccount(
            code=code, kind=kind, currency=currency, user_id=user_id, no_overdraft=no_overdraft
        )
        session.add(account)
        await session.flush()
    return account


# Shared accounts never change once created (they keep no totals), so each engine remembers
# them: a read saved in every transaction that moves money to or from one.
_SHARED_ACCOUNTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()
_SHARED_COLUMNS = ("id", "code", "kind", "currency", "no_overdraft", "user_id", "created_at")


async def system_account(session: AsyncSession, kind: str, currency: str) -> LedgerAccount:
    """A shared account (revenue, adjustments) per currency. Many wallets may create it at the
    same moment, so creation is an insert that yields to whoever committed first. A remembered
    one comes back as a fresh object outside the session (nothing ever writes a shared row)."""
    code = f"{kind}:{currency}"
    remembered = _shared_accounts_of(session)
    if code in remembered:
        return LedgerAccount(**remembered[code])
    account = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == code))).scalar_one_or_none()
    created_here = session.info.setdefault("shared_accounts_created", set())
    if account is not None and code not in created_here:
        # Found, and not this transaction's own uncommitted insert: it is committed for good.
        remembered[code] = {column: getattr(account, column) for column in _SHARED_COLUMNS}
    if account is not None:
        return account
    values = dict(id=uuid.uuid4(), code=code, kind=kind, currency=currency, no_overdraft=False, created_at=utcnow())
    await session.execute(insert_unless_exists(session.bind.dialect.name, LedgerAccount, values, ["code"]))
    created_here.add(code)
    return (await session.execute(select(LedgerAccount).where(LedgerAccount.code == code))).scalar_one()


def _shared_accounts_of(session: AsyncSession) -> dict[str, dict[str, Any]]:
    engine = getattr(session.bind, "sync_engine", None)
    return {} if engine is None else _SHARED_ACCOUNTS.setdefault(engine, {})


async def transfer(
    session: AsyncSession,
    *,
    transfer_id: uuid.UUID,
    debit: LedgerAccount,
    credit: LedgerAccount,
    amount_minor: int,
    kind: str,
    pending: bool = False,
    rental_id: uuid.UUID | None = None,
    description: str | None = None,
) -> LedgerTransfer:
    """Record a posted or pending transfer; a repeat with the same id and data returns the first."""
    _check_amount(amount_minor, debit, credit)
    existing = await session.get(LedgerTransfer, transfer_id)
    if existing is not None:
        return _same_transfer_or_error(existing, debit, credit, amount_minor, kind)
    _check_overdraft(debit, amount_minor)
    row = LedgerTransfer(
        id=transfer_id,
        debit_account_id=debit.id,
        credit_account_id=credit.id,
        amount_minor=amount_minor,
        currency=debit.currency,
        kind=kind,
        state="pending" if pending else "posted",
        rental_id=rental_id,
        description=description,
        created_at=utcnow(),
    )
    session.add(row)
    await _bump(session, debit, ("debits_pending" if pending else "debits_posted"), amount_minor)
    await _bump(session, credit, ("credits_pending" if pending else "credits_posted"), amount_minor)
    return row


@dataclass(frozen=True)
class TransferRequest:
    transfer_id: uuid.UUID
    amount_minor: int
    kind: str
    rental_id: uuid.UUID | None = None
    description: str | None = None


async def transfer_many(
    session: AsyncSession, *, debit: LedgerAccount, credit: LedgerAccount, requests: list[TransferRequest]
) -> list[str | None]:
    """Posted transfers between the same two accounts, in order, with `transfer`'s rules and
    idempotence: per request None when it is posted (now or before), or why it was refused.

    Decided in memory against a running balance, then written with one multi-row INSERT and one
    UPDATE per account that keeps totals (on PostgreSQL one statement for both): what a busy
    wallet's batch of N costs, instead of N times four statements. A refused request writes
    nothing."""
    if len(requests) == 1 and session.bind.dialect.name == "postgresql":
        return [await _transfer_one_posted(session, debit, credit, requests[0])]
    existing = await _existing_transfers(session, [request.transfer_id for request in requests])
    available = credit_balance(debit).available_minor
    outcomes: list[str | None] = []
    rows: list[dict] = []
    for request in requests:
        try:
            row = _new_posted_row(request, debit, credit, existing, available)
        except LedgerError as error:
            outcomes.append(error.reason)
            continue
        outcomes.append(None)
        if row is not None:
            rows.append(row)
            existing[request.transfer_id] = row
            available -= request.amount_minor
    if rows:
        if await _write_posted(session, debit, credit, rows) != len(rows):
            # Only a concurrent writer of the same ids gets here (an actor owns `debit`).
            raise RuntimeError("ledger transfer ids were taken while the batch was being written")
    return outcomes


async def _transfer_one_posted(
    session: AsyncSession, debit: LedgerAccount, credit: LedgerAccount, request: TransferRequest
) -> str | None:
    """The idle case, optimistic: ids are new almost always, so write first and look for an
    earlier transfer with this id only when the write found one, or before a refusal (a repeat
    of a transfer that went through is not refused). One statement when it goes through."""
    try:
        row = _new_posted_row(request, debit, credit, {}, credit_balance(debit).available_minor)
    except LedgerError as error:
        if error.reason != "insufficient_funds":
            return error.reason
        return await _repeat_outcome(session, debit, credit, request, otherwise=error.reason)
    if await _write_posted(session, debit, credit, [row]):
        return None
    return await _repeat_outcome(session, debit, credit, request, otherwise="transfer_id_reused")


async def _repeat_outcome(session, debit, credit, request: TransferRequest, *, otherwise: str) -> str | None:
    existing = await _existing_transfers(session, [request.transfer_id])
    if not existing:
        return otherwise
    try:
        _new_posted_row(request, debit, credit, existing, 0)
    except LedgerError as error:
        return error.reason
    return None


# Rows in as arrays (one fixed statement for any batch size, where a multi-row VALUES list would
# be a new one per size), and the totals of the accounts that keep them bumped by what actually
# went in, in the same statement: one round trip for a whole run of debits.
_WRITE_POSTED_POSTGRES = text("""
    WITH inserted AS (
        INSERT INTO ledger_transfers
            (id, debit_account_id, credit_account_id, amount_minor, currency, kind, state, rental_id, description, created_at)
        SELECT id, :debit_account_id, :credit_account_id, amount_minor, :currency, kind, 'posted', rental_id, description, :created_at
        FROM unnest(CAST(:ids AS uuid[]), CAST(:amounts AS bigint[]), CAST(:kinds AS text[]),
                    CAST(:rental_ids AS uuid[]), CAST(:descriptions AS text[]))
             AS given(id, amount_minor, kind, rental_id, description)
        ON CONFLICT (id) DO NOTHING
        RETURNING amount_minor
    ), total AS (
        SELECT count(*) AS rows, CAST(coalesce(sum(amount_minor), 0) AS bigint) AS amount_minor FROM inserted
    ), bumped AS (
        UPDATE ledger_accounts AS account
        SET debits_posted = account.debits_posted
                + CASE WHEN account.id = :debit_account_id THEN total.amount_minor ELSE 0 END,
            credits_posted = account.credits_posted
                + CASE WHEN account.id = :credit_account_id THEN total.amount_minor ELSE 0 END
        FROM total
        WHERE account.id = ANY(CAST(:bumped_ids AS uuid[]))
        RETURNING account.id
    )
    SELECT rows, amount_minor, (SELECT count(*) FROM bumped) AS bumped FROM total
""")


async def _write_posted(session: AsyncSession, debit: LedgerAccount, credit: LedgerAccount, rows: list[dict]) -> int:
    """Insert posted rows between `debit` and `credit` (an id that exists is skipped) and bump
    the totals by what went in; returns how many went in."""
    if session.bind.dialect.name != "postgresql":
        await session.execute(LedgerTransfer.__table__.insert(), rows)
        total = sum(row["amount_minor"] for row in rows)
        await _bump(session, debit, "debits_posted", total)
        await _bump(session, credit, "credits_posted", total)
        return len(rows)
    await session.flush()  # text statements do not autoflush; earlier ORM writes go first
    bumped = [account for account in (debit, credit) if keeps_totals(account)]
    first = rows[0]
    written = (await session.execute(_WRITE_POSTED_POSTGRES, dict(
        debit_account_id=debit.id,
        credit_account_id=credit.id,
        currency=first["currency"],
        created_at=first["created_at"],
        ids=[row["id"] for row in rows],
        amounts=[row["amount_minor"] for row in rows],
        kinds=[row["kind"] for row in rows],
        rental_ids=[row["rental_id"] for row in rows],
        descriptions=[row["description"] for row in rows],
        bumped_ids=[account.id for account in bumped],
    ))).one()
    if written.amount_minor:
        _add_committed(debit, "debits_posted", written.amount_minor)
        _add_committed(credit, "credits_posted", written.amount_minor)
    return written.rows


def _add_committed(account: LedgerAccount, column: str, delta: int) -> None:
    """Keep the loaded object equal to the row the statement just updated, without marking
    it changed (the ORM must not write it again)."""
    if keeps_totals(account):
        set_committed_value(account, column, getattr(account, column) + delta)


_EXISTING_POSTGRES = text(
    "SELECT id, debit_account_id, credit_account_id, amount_minor, kind FROM ledger_transfers"
    " WHERE id = ANY(CAST(:ids AS uuid[]))"
)


async def _existing_transfers(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, dict]:
    """Transfers already recorded under these ids. On PostgreSQL one array parameter, not an
    IN list of hundreds rendered anew for each batch size."""
    if session.bind.dialect.name == "postgresql":
        found = await session.execute(_EXISTING_POSTGRES, {"ids": ids})
    else:
        table = LedgerTransfer.__table__
        found = await session.execute(
            select(table.c.id, table.c.debit_account_id, table.c.credit_account_id, table.c.amount_minor, table.c.kind)
            .where(table.c.id.in_(ids))
        )
    return {row.id: row._asdict() for row in found}


def _new_posted_row(request, debit, credit, existing: dict[uuid.UUID, dict], available_minor: int) -> dict | None:
    """The row to insert for one request; None when the same transfer exists (idempotent)."""
    _check_amount(request.amount_minor, debit, credit)
    earlier = existing.get(request.transfer_id)
    if earlier is not None:
        same = (earlier["debit_account_id"], earlier["credit_account_id"], earlier["amount_minor"], earlier["kind"])
        if same != (debit.id, credit.id, request.amount_minor, request.kind):
            raise LedgerError("transfer_id_reused")
        return None
    if debit.no_overdraft and available_minor < request.amount_minor:
        raise LedgerError("insufficient_funds")
    return dict(
        id=request.transfer_id,
        debit_account_id=debit.id,
        credit_account_id=credit.id,
        amount_minor=request.amount_minor,
        currency=debit.currency,
        kind=request.kind,
        state="posted",
        pending_id=None,
        rental_id=request.rental_id,
        description=request.description,
        created_at=utcnow(),
    )


async def resolve_pending(
    session: AsyncSession, pending: LedgerTransfer, *, post_amount_minor: int | None
) -> LedgerTransfer | None:
    """Post a pending transfer for at most its amount (None or 0 voids it). Idempotent: once
    resolved, the first resolution is returned."""
    resolution_id = uuid.uuid5(pending.id, "resolution")
    existing = await session.get(LedgerTransfer, resolution_id)
    if existing is not None:
        return existing
    if post_amount_minor is not None and not 0 <= post_amount_minor <= pending.amount_minor:
        raise LedgerError("post_exceeds_pending")
    posting = bool(post_amount_minor)
    amount = post_amount_minor if posting else pending.amount_minor
    row = LedgerTransfer(
        id=resolution_id,
        debit_account_id=pending.debit_account_id,
        credit_account_id=pending.credit_account_id,
        amount_minor=amount,
        currency=pending.currency,
        kind=pending.kind + (":post" if posting else ":void"),
        state="posted" if posting else "voided",
        pending_id=pending.id,
        rental_id=pending.rental_id,
        created_at=utcnow(),
    )
    session.add(row)
    debit = await session.get(LedgerAccount, pending.debit_account_id)
    credit = await session.get(LedgerAccount, pending.credit_account_id)
    await _bump(session, debit, "debits_pending", -pending.amount_minor)
    await _bump(session, credit, "credits_pending", -pending.amount_minor)
    if posting:
        await _bump(session, debit, "debits_posted", amount)
        await _bump(session, credit, "credits_posted", amount)
    return row


async def open_holds(session: AsyncSession, account_id: uuid.UUID, kind: str) -> list[LedgerTransfer]:
    """Pending transfers out of the account that have not been resolved yet."""
    resolved = select(LedgerTransfer.pending_id).where(LedgerTransfer.pending_id.is_not(None))
    query = select(LedgerTransfer).where(
        LedgerTransfer.debit_account_id == account_id,
        LedgerTransfer.state == "pending",
        LedgerTransfer.kind == kind,
        LedgerTransfer.id.not_in(resolved),
    )
    return list((await session.execute(query)).scalars())


def _check_amount(amount_minor: int, debit: LedgerAccount, credit: LedgerAccount) -> None:
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
        raise LedgerError("invalid_amount")
    if debit.currency != credit.currency:
        raise LedgerError("currency_mismatch")
    if debit.id == credit.id:
        raise LedgerError("same_account")


def _check_overdraft(debit: LedgerAccount, amount_minor: int) -> None:
    if debit.no_overdraft and credit_balance(debit).available_minor < amount_minor:
        raise LedgerError("insufficient_funds")


def _same_transfer_or_error(existing, debit, credit, amount_minor, kind) -> LedgerTransfer:
    same = (
        existing.debit_account_id == debit.id
        and existing.credit_account_id == credit.id
        and existing.amount_minor == amount_minor
        and existing.kind == kind
    )
    if not same:
        raise LedgerError("transfer_id_reused")
    return existing


def keeps_totals(account: LedgerAccount) -> bool:
    """Only accounts owned by one actor (a person's) store running totals."""
    return account.kind in OWNED_ACCOUNT_KINDS


async def _bump(session: AsyncSession, account: LedgerAccount, column: str, delta: int) -> None:
    if not keeps_totals(account):
        return
    # An atomic increment; the ORM's default synchronize_session keeps the loaded object current.
    await session.execute(
        update(LedgerAccount)
        .where(LedgerAccount.id == account.id)
        .values({column: getattr(LedgerAccount, column) + delta})
    )


async def ledger_discrepancies(session: AsyncSession) -> list[str]:
    """Every way the books disagree with themselves; empty means balanced.

    Recomputed from the transfer rows: total debits equal total credits (posted and pending),
    every stored running total equals its rows, and no account that must not go negative is.
    Used by the demo's final audit and by tests after every step."""
    problems: list[str] = []
    expected = await _expected_totals(session)
    columns = list(zip(*expected.values())) or [(), (), (), ()]
    if sum(columns[0]) != sum(columns[1]) or sum(columns[2]) != sum(columns[3]):
        problems.append(f"debits != credits: {[sum(c) for c in columns]}")
    for account in (await session.execute(select(LedgerAccount))).scalars():
        want = tuple(expected.get(account.id, (0, 0, 0, 0)))
        have = (account.debits_posted, account.credits_posted, account.debits_pending, account.credits_pending)
        if keeps_totals(account) and want != have:
            problems.append(f"account {account.code}: stored {have} != transfers {want}")
        if not keeps_totals(account) and have != (0, 0, 0, 0):
            problems.append(f"shared account {account.code} has stored totals {have}")
        if account.no_overdraft and want[0] + want[2] > want[1]:
            problems.append(f"account {account.code} is overdrawn: {want}")
    return problems


async def _expected_totals(session: AsyncSession) -> dict[uuid.UUID, list[int]]:
    """Recompute (debits_posted, credits_posted, debits_pending, credits_pending) from the rows."""
    resolved_ids = set((await session.execute(
        select(LedgerTransfer.pending_id).where(LedgerTransfer.pending_id.is_not(None))
    )).scalars())
    expected: dict[uuid.UUID, list[int]] = {}
    rows = (await session.execute(select(LedgerTransfer))).scalars()
    for row in rows:
        debit = expected.setdefault(row.debit_account_id, [0, 0, 0, 0])
        credit = expected.setdefault(row.credit_account_id, [0, 0, 0, 0])
        if row.state == "posted":
            debit[0] += row.amount_minor
            credit[1] += row.amount_minor
        elif row.state == "pending" and row.id not in resolved_ids:
            debit[2] += row.amount_minor
            credit[3] += row.amount_minor
    return expected

