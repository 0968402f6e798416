"""`ledger.transfer_many` against a reference model, on both backends: the same refusals and
idempotence as one `transfer` at a time, and books that balance after every batch."""

from __future__ import annotations

import random
import uuid

import pytest

from powerbank.storage import ledger
from powerbank.storage.db import session_factory
from powerbank.storage.models import LedgerAccount, LedgerTransfer, User

FUNDED_MINOR = 1_000


async def _wallet(sessions) -> tuple[uuid.UUID, uuid.UUID]:
    async with sessions.begin() as session:
        user = User(phone="+9779800000001", referral_code="LEDGER1")
        session.add(user)
        await session.flush()
        wallet = await ledger.get_or_create_account(
            session, f"wallet:{user.id}", "user_wallet", "NPR", user_id=user.id, no_overdraft=True
        )
        source = await ledger.system_account(session, "admin_adjustments", "NPR")
        await ledger.transfer(
            session, transfer_id=uuid.uuid4(), debit=source, credit=wallet, amount_minor=FUNDED_MINOR, kind="admin_credit"
        )
        revenue = await ledger.system_account(session, "platform_revenue", "NPR")
        return wallet.id, revenue.id


class Model:
    """What the books must say: the wallet's available balance and every transfer by id."""

    def __init__(self) -> None:
        self.available_minor = FUNDED_MINOR
        self.transfers: dict[uuid.UUID, tuple[int, str]] = {}

    def apply(self, request: ledger.TransferRequest) -> str | None:
        if not isinstance(request.amount_minor, int) or request.amount_minor <= 0:
            return "invalid_amount"
        earlier = self.transfers.get(request.transfer_id)
        if earlier is not None:
            return None if earlier == (request.amount_minor, request.kind) else "transfer_id_reused"
        if self.available_minor < request.amount_minor:
            return "insufficient_funds"
        self.available_minor -= request.amount_minor
        self.transfers[request.transfer_id] = (request.amount_minor, request.kind)
        return None


def _requests(rng: random.Random, known: list[uuid.UUID], max_size: int) -> list[ledger.TransferRequest]:
    """A batch mixing fresh debits, exact repeats, reused ids with other data, bad amounts and
    overdrafts, so every branch is taken in most batches."""
    batch = []
    for _ in range(rng.randint(1, max_size)):
        roll = rng.random()
        if roll < 0.2 and known:
            transfer_id, amount = rng.choice(known), rng.choice([5, 7])
        elif roll < 0.25:
            transfer_id, amount = uuid.uuid4(), rng.choice([0, -3])
        else:
            transfer_id, amount = uuid.uuid4(), rng.choice([5, 7, 60, 400])
        known.append(transfer_id)
        batch.append(ledger.TransferRequest(transfer_id, amount, "test_debit"))
    return batch


# Batches of one take PostgreSQL's optimistic path (write first, look for an earlier transfer
# only on a conflict or a refusal); longer ones look first.
@pytest.mark.parametrize("seed,max_batch", [(1, 12), (2, 12), (3, 12), (4, 1), (5, 1)])
async def test_transfer_many_matches_the_model_after_every_batch(engine, seed, max_batch):
    sessions = session_factory(engine)
    wallet_id, revenue_id = await _wallet(sessions)
    model, rng, known = Model(), random.Random(seed), []
    for _ in range(25 if max_batch > 1 else 120):
        requests = _requests(rng, known, max_batch)
        async with sessions.begin() as session:
            wallet = await session.get(LedgerAccount, wallet_id)
            revenue = await session.get(LedgerAccount, revenue_id)
            outcomes = await ledger.transfer_many(session, debit=wallet, credit=revenue, requests=requests)
            expected = [model.apply(request) for request in requests]
            # The loaded object follows the row it wrote, without being written again.
            assert ledger.credit_balance(wallet).available_minor == model.available_minor
            assert wallet not in session.dirty
        assert outcomes == expected
        async with sessions() as session:
            wallet = await session.get(LedgerAccount, wallet_id)
            assert ledger.credit_balance(wallet).available_minor == model.available_minor
            assert await ledger.ledger_discrepancies(session) == []
            rows = (await session.execute(
                LedgerTransfer.__table__.select().where(LedgerTransfer.kind == "test_debit")
            )).all()
            assert {row.id: (row.amount_minor, row.kind) for row in rows} == model.transfers


async def test_a_refused_request_writes_nothing(engine):
    sessions = session_factory(engine)
    wallet_id, revenue_id = await _wallet(sessions)
    async with sessions.begin() as session:
        wallet = await session.get(LedgerAccount, wallet_id)
        revenue = await session.get(LedgerAccount, revenue_id)
        too_much = ledger.TransferRequest(uuid.uuid4(), FUNDED_MINOR + 1, "test_debit")
        assert await ledger.transfer_many(session, debit=wallet, credit=revenue, requests=[too_much]) == ["insufficient_funds"]
    async with sessions() as session:
        assert await session.get(LedgerTransfer, too_much.transfer_id) is None
        assert ledger.credit_balance(await session.get(LedgerAccount, wallet_id)).available_minor == FUNDED_MINOR


async def test_a_shared_account_is_remembered_only_once_it_is_committed(engine):
    sessions = session_factory(engine)
    async with sessions() as session:
        await session.begin()
        created_id = (await ledger.system_account(session, "operator_payable", "USD")).id
        assert (await ledger.system_account(session, "operator_payable", "USD")).id == created_id
        await session.rollback()  # its own insert: must not outlive this transaction
    async with sessions.begin() as session:
        recreated = await ledger.system_account(session, "operator_payable", "USD")
    assert recreated.id != created_id
    async with sessions() as session:
        found = await ledger.system_account(session, "operator_payable", "USD")
    async with sessions() as session:
        remembered = await ledger.system_account(session, "operator_payable", "USD")
        assert remembered.id == found.id == recreated.id and remembered not in session
        assert (remembered.kind, remembered.currency, remembered.no_overdraft) == ("operator_payable", "USD", False)
