"""Acceptance 1: a hypothesis stateful reference model of the Wallet actor and its ledger.

Random top-ups (operator credits, and repeats of them), rental holds (wallet, and points
when the wallet is short; refused while a due is unpaid), due payments, captures (partial, or
above the hold: the wallet, then points, then a due), voids, refunds, point awards and spends,
all as Wallet-actor commands through the runtime. After every step: debits equal credits over
all transfers, every stored running total equals its rows, no account is below its limit
(`ledger_discrepancies`), and the wallet's and the points' balances equal the model's.

The model does its own arithmetic (10 points pay 100 minor units, the seeded ratio), so it
checks `actors/pricing.py` rather than repeating it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule, run_state_machine_as_test,
)
from sqlalchemy import select

import powerbank.actors.rental  # noqa: F401  (registers the Rental handlers)
import powerbank.actors.wallet  # noqa: F401
from powerbank.actors.bus import LocalBus
from powerbank.actors.dispatch import LoopDispatcher
from powerbank.actors.runtime import AdvisoryLocks, ProcessLocks, Runtime
from powerbank.actors.wallet import hold_id, points_hold_id
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.ledger import credit_balance, ledger_discrepancies
from powerbank.storage.models import Base, LedgerAccount, LedgerTransfer, Rental, RentalPackage, Station, User
from powerbank.storage.seed import ensure_defaults
from powerbank.storage.testing import create_postgres_database, drop_postgres_database

MINOR_PER_POINT = 10  # the seeded ratio: 10 points = 100 minor units
amounts = st.integers(1, 20_000)


class World:
    """An engine and a runtime on a private event loop: hypothesis' state machines are
    synchronous, so each rule runs its coroutine to completion on this loop."""

    def __init__(self, backend: str, tmp_path) -> None:
        self.loop = asyncio.new_event_loop()
        self.backend = backend
        self.db_name = None
        url = f"sqlite+aiosqlite:///{tmp_path / 'stateful.sqlite3'}"
        if backend == "postgres":
            self.db_name, url = self.run(create_postgres_database())
        self.engine = create_engine(url)
        self.run(self._setup())

    async def _setup(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        sqlite = self.engine.dialect.name == "sqlite"
        self.dispatcher = LoopDispatcher()
        self.runtime = Runtime(
            session_factory(self.engine), bus=LocalBus(), dispatcher=self.dispatcher,
            locks=ProcessLocks() if sqlite else AdvisoryLocks(), single_writer=sqlite, apply_in_caller=not sqlite,
        )
        self.dispatcher.runtime = self.runtime
        await ensure_defaults(self.runtime.sessions, "NPR")
        async with self.runtime.sessions.begin() as session:
            station = Station(serial="SN-MODEL", name="s", latitude=0, longitude=0, slot_count=4)
            package = RentalPackage(code="model", name="p", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=600)
            session.add_all([station, package])
        self.station_id, self.package_id = station.id, package.id

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def call(self, name: str, user_id: str, payload: dict, command_id: str | None = None) -> dict:
        result = await self.runtime.call("wallet", user_id, name, payload, command_id or f"{name}:{uuid.uuid4()}")
        await self.dispatcher.settle()
        return result

    def close(self) -> None:
        self.run(self.dispatcher.settle())
        self.run(self.engine.dispose())
        if self.db_name:
            self.run(drop_postgres_database(self.db_name))
        self.loop.close()


def machine_for(world: World):
    class WalletMachine(RuleBasedStateMachine):
        holds = Bundle("holds")  # open rental holds: (rental_id, amount)
        charges = Bundle("charges")  # refundable transfers: (transfer_id, "wallet"|"points")
        credits = Bundle("credits")  # earlier top-ups: (transfer_id, amount)

        def __init__(self) -> None:
            super().__init__()
            self.user_id = world.run(self._open())
            self.balance_minor = self.held_minor = self.points = self.points_held = 0
            self.refundable: dict[str, int] = {}
            self.dues: dict[str, int] = {}  # rental id -> unpaid due

        async def _open(self) -> str:
            async with world.runtime.sessions.begin() as session:
                user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:10])
                session.add(user)
            assert (await world.call("OpenWallet", str(user.id), {"currency": "NPR"}))["ok"]
            return str(user.id)

        # --- money in ---------------------------------------------------------------------

        @rule(target=credits, amount=amounts)
        def top_up(self, amount):
            transfer_id = str(uuid.uuid4())
            payload = {"amount_minor": amount, "currency": "NPR", "transfer_id": transfer_id, "reason": "top-up"}
            assert world.run(world.call("CreditWallet", self.user_id, payload))["ok"]
            self.balance_minor += amount
            return (transfer_id, amount)

        @rule(credit=credits)
        def repeat_top_up(self, credit):
            """The same transfer again under a new command id (a retried webhook): no change."""
            transfer_id, amount = credit
            payload = {"amount_minor": amount, "currency": "NPR", "transfer_id": transfer_id, "reason": "again"}
            assert world.run(world.call("CreditWallet", self.user_id, payload))["ok"]

        @rule(credit=credits, delta=st.integers(1, 100))
        def reuse_a_transfer_id_with_other_data(self, credit, delta):
            transfer_id, amount = credit
            payload = {"amount_minor": amount + delta, "currency": "NPR", "transfer_id": transfer_id, "reason": "x"}
            result = world.run(world.call("CreditWallet", self.user_id, payload))
            assert result == {"ok": False, "reason": "transfer_id_reused"}

        @rule(target=charges, amount=amounts)
        def spend(self, amount):
            transfer_id = str(uuid.uuid4())
            payload = {"amount_minor": amount, "currency": "NPR", "transfer_id": transfer_id, "reason": "purchase"}
            result = world.run(world.call("SpendWallet", self.user_id, payload))
            if amount <= self.balance_minor - self.held_minor:
                assert result["ok"], result
                self.balance_minor -= amount
                self.refundable[transfer_id] = amount
                return (transfer_id, "wallet")
            assert result == {"ok": False, "reason": "insufficient_funds"}
            return multiple()

        @rule(points=st.integers(1, 500))
        def award_points(self, points):
            payload = {"points": points, "transfer_id": str(uuid.uuid4()), "reason": "achievement"}
            assert world.run(world.call("GrantPoints", self.user_id, payload))["ok"]
            self.points += points

        @rule(target=charges, points=st.integers(1, 800))
        def spend_points(self, points):
            transfer_id = str(uuid.uuid4())
            result = world.run(world.call("SpendPoints", self.user_id, {"points": points, "transfer_id": transfer_id}))
            if points <= self.points - self.points_held:
                assert result["ok"], result
                self.points -= points
                self.refundable[transfer_id] = points
                return (transfer_id, "points")
            assert result == {"ok": False, "reason": "insufficient_funds"}
            return multiple()

        # --- holds ------------------------------------------------------------------------

        @rule(target=holds, amount=amounts)
        def place_hold(self, amount):
            """The wallet first; when it is short, the rest from points (whole points, rounded up)."""
            rental_id = world.run(self._rental())
            payload = {"rental_id": rental_id, "amount_minor": amount, "currency": "NPR", "max_active_rentals": 10**6}
            result = world.run(world.call("PlaceHold", self.user_id, payload))
            wallet_available = self.balance_minor - self.held_minor
            points_available = self.points - self.points_held
            if self.dues:
                assert result == {"ok": False, "reason": "unpaid_dues"}
                return multiple()
            if amount <= wallet_available + points_available * MINOR_PER_POINT:
                assert result["ok"], result
                wallet_part = min(amount, wallet_available)
                points_part = -(-(amount - wallet_part) // MINOR_PER_POINT)
                assert (result["held_minor"], result["points_held"]) == (wallet_part, points_part)
                self.held_minor += wallet_part
                self.points_held += points_part
                return (rental_id, wallet_part, points_part)
            assert result == {"ok": False, "reason": "insufficient_funds"}
            return multiple()

        async def _rental(self) -> str:
            async with world.runtime.sessions.begin() as session:
                rental = Rental(user_id=uuid.UUID(self.user_id), station_id=world.station_id, package_id=world.package_id,
                                currency="NPR", status="active")
                session.add(rental)
            return str(rental.id)

        @rule(target=charges, hold=consumes(holds), fraction=st.floats(0, 3), award=st.integers(0, 50))
        def capture(self, hold, fraction, award):
            """Charge a fee from 0 to three times the hold: the wallet's hold, the points hold,
            then the wallet, then points, then a due."""
            rental_id, hold_minor, hold_points = hold
            fee = int((hold_minor + hold_points * MINOR_PER_POINT) * fraction)
            payload = {"rental_id": rental_id, "amount_minor": fee, "award_points": award}
            result = world.run(world.call("CaptureHold", self.user_id, payload))
            from_hold = min(fee, hold_minor)
            self.held_minor -= hold_minor
            self.balance_minor -= from_hold
            rest = fee - from_hold
            points_hold_minor = min(rest, hold_points * MINOR_PER_POINT)
            from_points_hold = -(-points_hold_minor // MINOR_PER_POINT)
            rest -= points_hold_minor
            self.points_held -= hold_points
            self.points -= from_points_hold
            from_wallet = min(rest, self.balance_minor - self.held_minor)
            self.balance_minor -= from_wallet
            rest -= from_wallet
            points_minor = min(rest, (self.points - self.points_held) * MINOR_PER_POINT)
            points = -(-points_minor // MINOR_PER_POINT)
            self.points -= points
            due = rest - points_minor
            self.points += award
            if due:
                self.dues[rental_id] = due
            assert result == {"ok": True, "charged_minor": fee - due, "due_minor": due,
                              "points_spent": from_points_hold + points, "points_awarded": award}
            made = []
            rental = uuid.UUID(rental_id)
            for transfer_id, amount, where in (
                (uuid.uuid5(hold_id(rental_id), "resolution"), from_hold, "wallet"),
                (uuid.uuid5(points_hold_id(rental_id), "resolution"), from_points_hold, "points"),
                (uuid.uuid5(rental, "overage"), from_wallet, "wallet"),
                (uuid.uuid5(rental, "points"), points, "points"),
            ):
                if amount:
                    self.refundable[str(transfer_id)] = amount
                    made.append((str(transfer_id), where))
            return multiple(*made)

        @precondition(lambda self: self.dues)
        @rule(target=charges, data=st.data(), mode=st.sampled_from(["points_first", "wallet_first"]))
        def pay_due(self, data, mode):
            """All or nothing, in the chosen order; a second payment of the same due is a no-op."""
            rental_id = data.draw(st.sampled_from(sorted(self.dues)))
            due = self.dues[rental_id]
            result = world.run(world.call("PayDue", self.user_id, {"rental_id": rental_id, "payment_mode": mode}))
            wallet_available = self.balance_minor - self.held_minor
            points_worth = (self.points - self.points_held) * MINOR_PER_POINT
            if mode == "points_first":
                points_minor = min(due, points_worth)
                wallet_minor = min(due - points_minor, wallet_available)
            else:
                wallet_minor = min(due, wallet_available)
                points_minor = min(due - wallet_minor, points_worth)
            if points_minor + wallet_minor < due:
                assert result["ok"] is False and result["reason"] == "insufficient_funds", result
                return multiple()
            points = -(-points_minor // MINOR_PER_POINT)
            assert result["ok"] and (result["paid_minor"], result["wallet_minor"], result["points"]) == (due, wallet_minor, points), result
            self.balance_minor -= wallet_minor
            self.points -= points
            del self.dues[rental_id]
            again = world.run(world.call("PayDue", self.user_id, {"rental_id": rental_id, "payment_mode": mode}))
            assert again["ok"] and again["already_paid"]
            made = []
            for tag, amount, where in (("due-wallet", wallet_minor, "wallet"), ("due-points", points, "points")):
                if amount:
                    transfer_id = str(uuid.uuid5(uuid.UUID(rental_id), tag))
                    self.refundable[transfer_id] = amount
                    made.append((transfer_id, where))
            return multiple(*made)

        @rule(hold=consumes(holds))
        def void(self, hold):
            rental_id, hold_minor, hold_points = hold
            assert world.run(world.call("VoidHold", self.user_id, {"rental_id": rental_id}))["ok"]
            self.held_minor -= hold_minor
            self.points_held -= hold_points
            # Voiding again is harmless.
            assert world.run(world.call("VoidHold", self.user_id, {"rental_id": rental_id}))["ok"]

        # --- refunds ----------------------------------------------------------------------

        @rule(charge=charges, fraction=st.floats(0.01, 1.5))
        def refund(self, charge, fraction):
            transfer_id, where = charge
            left = self.refundable[transfer_id]
            amount = max(1, int(self.refundable_original(transfer_id) * fraction))
            payload = {"transfer_id": transfer_id, "refund_id": str(uuid.uuid4()), "amount_minor": amount}
            result = world.run(world.call("RefundTransfer", self.user_id, payload))
            if amount > left:
                assert result["ok"] is False and result["reason"] == "exceeds_refundable", result
                return
            assert result["ok"], result
            self.refundable[transfer_id] = left - amount
            if where == "wallet":
                self.balance_minor += amount
            else:
                self.points += amount

        def refundable_original(self, transfer_id: str) -> int:
            return world.run(self._amount_of(transfer_id))

        async def _amount_of(self, transfer_id: str) -> int:
            async with world.runtime.sessions() as session:
                return (await session.get(LedgerTransfer, uuid.UUID(transfer_id))).amount_minor

        @rule(amount=st.sampled_from([0, -1, 10**13]))
        def refuse_bad_amounts(self, amount):
            payload = {"amount_minor": amount, "currency": "NPR", "transfer_id": str(uuid.uuid4()), "reason": "bad"}
            result = world.run(world.call("CreditWallet", self.user_id, payload))
            if amount <= 0:
                assert result == {"ok": False, "reason": "invalid_amount"}
            else:  # huge is not refused by the ledger (the HTTP layer caps amounts): keep the model in step
                assert result["ok"]
                self.balance_minor += amount

        # --- after every step -------------------------------------------------------------

        @invariant()
        def books_balance_and_match_the_model(self):
            world.run(self._check())

        async def _check(self) -> None:
            async with world.runtime.sessions() as session:
                assert await ledger_discrepancies(session) == []
                money = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == f"wallet:{self.user_id}"))).scalar_one()
                points = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == f"points:{self.user_id}"))).scalar_one()
                balance = credit_balance(money)
                assert (balance.posted_minor, balance.held_minor) == (self.balance_minor, self.held_minor)
                assert (credit_balance(points).posted_minor, credit_balance(points).held_minor) == (self.points, self.points_held)
                for account in (money, points):  # never below the limit, from the stored totals too
                    assert account.credits_posted - account.debits_posted - account.debits_pending >= 0

    return WalletMachine


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_wallet_actor_matches_the_reference_model(backend, tmp_path):
    world = World(backend, tmp_path)
    try:
        run_state_machine_as_test(
            machine_for(world),
            settings=settings(max_examples=8, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
        )
    finally:
        world.close()
