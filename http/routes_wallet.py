"""The signed-in person's wallet and points, read from the ledger rows the Wallet actor keeps;
the hybrid-payment calculator; paying a rental's due (a Wallet-actor command).

Handlers are thin: reads go straight to the ledger rows, decisions to `actors/pricing.py`, and
the one write (pay-due) to the Wallet actor, which alone moves a person's money.
"""

from __future__ import annotations

import asyncio
import uuid

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from sqlalchemy import case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.actors import pricing
from powerbank.actors.wallet import MoneyConfig, load_money_config
from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import (
    CalculateOptionsRequest,
    PayDueRequest,
    PayDueResult,
    PaymentOption,
    PaymentOptions,
    PointsEntry,
    PointsHistoryPage,
    PointsRatioView,
    PointsSummary,
    WalletView,
)
from powerbank.storage.ledger import credit_balance
from powerbank.storage.models import LedgerAccount, LedgerTransfer, Rental, RentalPackage, Wallet

PAY_DUE_WAIT_S = 10.0
PAY_DUE_NAMESPACE = uuid.UUID("6f1b8e0a-3c55-4f57-9a3e-2f4d0c1b7a10")


def account_balance(account: LedgerAccount | None) -> tuple[int, int]:
    """(balance, held) of a credit-normal user account: posted credits minus posted debits,
    and the debits still pending (holds), which are not spendable but not gone either. Same
    arithmetic as the Wallet actor's `wallet.updated` events, so REST and websocket agree."""
    if account is None:
        return 0, 0
    balance = credit_balance(account)
    return balance.posted_minor, balance.held_minor


def wallet_view(
    currency: str, money: LedgerAccount | None, points: LedgerAccount | None, ratio: pricing.PointsRatio | None = None
) -> WalletView:
    balance, held = account_balance(money)
    points_balance, points_held = account_balance(points)
    return WalletView(
        currency=currency,
        balance_minor=balance,
        held_minor=held,
        available_minor=balance - held,
        points=points_balance,
        points_held=points_held,
        points_value_minor=pricing.points_value_minor(points_balance - points_held, ratio or pricing.PointsRatio()),
    )


async def read_wallet(session: AsyncSession, user_id: uuid.UUID, default_currency: str) -> WalletView:
    """Zeros in the default currency until the Wallet actor has opened the wallet."""
    wallet, money, points = await _wallet_rows(session, user_id)
    ratio = (await load_money_config(session)).ratio
    if wallet is None:
        return wallet_view(default_currency, None, None, ratio)
    return wallet_view(wallet.currency, money, points, ratio)


async def _wallet_rows(session: AsyncSession, user_id: uuid.UUID):
    wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one_or_none()
    if wallet is None:
        return None, None, None
    return wallet, await session.get(LedgerAccount, wallet.account_id), await session.get(LedgerAccount, wallet.points_account_id)


def ratio_view(ratio: pricing.PointsRatio) -> PointsRatioView:
    return PointsRatioView(points=ratio.points, minor_units=ratio.minor_units)


class UserWalletController(Controller):
    path = "/api/user"
    tags = ["wallet"]
    security = BEARER_SECURITY

    @get("/wallet", responses=error_responses(401))
    async def wallet(self, state: State, request: Request) -> WalletView:
        """Balance, held (funds reserved for running rentals), available (balance minus held),
        points (posted balance; `points_held` of it is reserved) and what the spendable points
        are worth at the configured ratio."""
        services = services_of(state)
        async with services.readonly() as session:
            return await read_wallet(session, request.user.id, services.settings.currency)


# --- points -----------------------------------------------------------------------------------


def _signed_points(account_id):
    """+amount when the transfer credits the points account, -amount when it debits it."""
    return case((LedgerTransfer.credit_account_id == account_id, LedgerTransfer.amount_minor), else_=-LedgerTransfer.amount_minor)


class PointsController(Controller):
    path = "/api/points"
    tags = ["points"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @get("/history", responses=error_responses(400, 401))
    async def history(self, state: State, request: Request, paging: NamedDependency[Paging]) -> PointsHistoryPage:
        """Posted points movements, newest first, each with the balance right after it."""
        async with services_of(state).readonly() as session:
            wallet, _, points = await _wallet_rows(session, request.user.id)
            if wallet is None:
                return PointsHistoryPage(items=[], page=paging.page, page_size=paging.page_size, total=0)
            mine = (
                (LedgerTransfer.state == "posted")
                & or_(LedgerTransfer.debit_account_id == points.id, LedgerTransfer.credit_account_id == points.id)
            )
            signed = _signed_points(points.id)
            order = (LedgerTransfer.created_at, LedgerTransfer.id)
            running = func.sum(signed).over(order_by=order).label("balance_after")
            ranked = select(LedgerTransfer, signed.label("points"), running).where(mine).subquery()
            entry = select(ranked).order_by(ranked.c.created_at.desc(), ranked.c.id.desc())
            rows = (await session.execute(entry.offset(paging.offset).limit(paging.page_size))).all()
            total = await session.scalar(select(func.count()).select_from(LedgerTransfer).where(mine))
        items = [
            PointsEntry(
                id=row.id, kind=row.kind, points=int(row.points), balance_after=int(row.balance_after),
                rental_id=row.rental_id, description=row.description, created_at=row.created_at,
            )
            for row in rows
        ]
        return PointsHistoryPage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0)

    @get("/summary", responses=error_responses(401))
    async def summary(self, state: State, request: Request) -> PointsSummary:
        """Balance, what it is worth, and how it was earned and spent."""
        services = services_of(state)
        async with services.readonly() as session:
            config = await load_money_config(session)
            wallet, _, points = await _wallet_rows(session, request.user.id)
            balance, held = account_balance(points)
            earned_by_kind: dict[str, int] = {}
            if points is not None:
                earned = await session.execute(
                    select(LedgerTransfer.kind, func.sum(LedgerTransfer.amount_minor))
                    .where(LedgerTransfer.credit_account_id == points.id, LedgerTransfer.state == "posted")
                    .group_by(LedgerTransfer.kind)
                )
                earned_by_kind = {kind: int(total) for kind, total in earned}
        return PointsSummary(
            points=balance,
            points_held=held,
            value_minor=pricing.points_value_minor(balance - held, config.ratio),
            currency=wallet.currency if wallet else services.settings.currency,
            ratio=ratio_view(config.ratio),
            earned_total=points.credits_posted if points else 0,
            spent_total=points.debits_posted if points else 0,
            earned_by_kind=earned_by_kind,
        )


# --- hybrid payment ---------------------------------------------------------------------------


def payment_options(purpose: str, amount_minor: int, currency: str, wallet: WalletView, config: MoneyConfig) -> PaymentOptions:
    """Every way the person could pay `amount_minor` now, one per mode, best first as listed."""
    points_available = wallet.points - wallet.points_held
    options = []
    for mode in pricing.PAYMENT_MODES:
        split = pricing.split_payment(
            amount_minor, wallet_available_minor=wallet.available_minor, points_available=points_available,
            ratio=config.ratio, mode=mode,
        )
        options.append(PaymentOption(
            mode=mode, points=split.points, points_minor=split.points_minor, wallet_minor=split.wallet_minor,
            shortfall_minor=split.shortfall_minor, sufficient=split.sufficient,
        ))
    return PaymentOptions(
        purpose=purpose, amount_minor=amount_minor, currency=currency,
        wallet_available_minor=wallet.available_minor, points_available=points_available,
        points_value_minor=pricing.points_value_minor(points_available, config.ratio),
        ratio=ratio_view(config.ratio), options=options,
    )


async def _amount_to_pay(session: AsyncSession, data: CalculateOptionsRequest, user_id: uuid.UUID, wallet: WalletView) -> tuple[str, int, str]:
    """(purpose, amount, currency) the request names; exactly one way of naming it."""
    given = [data.package_id is not None, data.rental_id is not None, data.amount_minor is not None]
    if sum(given) != 1:
        raise ApiError(422, "one_of_required", "give exactly one of package_id, rental_id, amount_minor")
    if data.currency is not None and data.amount_minor is None:
        raise ApiError(422, "currency_without_amount", "currency goes with amount_minor")
    if data.package_id is not None:
        package = await session.get(RentalPackage, data.package_id)
        if package is None or not package.is_active:
            raise ApiError(404, "package_not_found", f"no package {data.package_id}")
        return "package", package.price_minor, package.currency
    if data.rental_id is not None:
        rental = await session.get(Rental, data.rental_id)
        if rental is None or rental.user_id != user_id:
            raise ApiError(404, "rental_not_found", f"no rental {data.rental_id}")
        if rental.due_minor <= 0:
            raise ApiError(409, "nothing_due", "this rental has no due")
        return "due", rental.due_minor, rental.currency
    if data.currency is None:
        raise ApiError(422, "currency_required", "amount_minor needs its currency")
    if data.currency != wallet.currency:
        raise ApiError(422, "unknown_currency", f"this wallet holds {wallet.currency}, not {data.currency}", currency=wallet.currency)
    return "amount", data.amount_minor, data.currency


class PaymentOptionsController(Controller):
    path = "/api/payment"
    tags = ["payment"]
    security = BEARER_SECURITY

    @post("/calculate-options", status_code=200, responses=error_responses(400, 401, 404, 409, 422))
    async def calculate_options(self, state: State, request: Request, data: JSONBody[CalculateOptionsRequest]) -> PaymentOptions:
        """How a package's price, a rental's due or an amount would be paid right now: for each
        mode (points first, wallet first, wallet only, points only) how many points, how much
        from the wallet, and whether it is enough. Reads only; nothing is reserved."""
        services = services_of(state)
        async with services.readonly() as session:
            wallet = await read_wallet(session, request.user.id, services.settings.currency)
            config = await load_money_config(session)
            purpose, amount_minor, currency = await _amount_to_pay(session, data, request.user.id, wallet)
        if currency != wallet.currency:
            raise ApiError(422, "currency_mismatch", f"priced in {currency}, the wallet holds {wallet.currency}")
        return payment_options(purpose, amount_minor, currency, wallet, config)


# --- paying a due -----------------------------------------------------------------------------


def pay_due_command_id(user_id: uuid.UUID, rental_id: uuid.UUID, idempotency_key: str | None) -> str:
    """With a key, a repeat returns the first answer. Without one each request is a new command
    (a refusal for want of funds must not stick after a top-up); the due's deterministic
    transfer ids still make a second payment impossible."""
    if idempotency_key is None:
        return f"pay-due:{uuid.uuid4()}"
    return f"pay-due:{uuid.uuid5(PAY_DUE_NAMESPACE, f'{user_id}:{rental_id}:{idempotency_key}')}"


PAY_DUE_STATUS = {"rental_not_found": 404, "wallet_not_found": 404, "nothing_due": 409, "insufficient_funds": 409,
                  "currency_mismatch": 422}


class PayDueController(Controller):
    path = "/api/rentals"
    tags = ["rentals"]
    security = BEARER_SECURITY

    @post("/{rental_id:uuid}/pay-due", status_code=200, responses=error_responses(400, 401, 404, 409, 422, 503))
    async def pay_due(
        self, state: State, request: Request, rental_id: FromPath[uuid.UUID], data: JSONBody[PayDueRequest]
    ) -> PayDueResult:
        """Pay the whole due of one of your rentals from points and the wallet, in the order
        `payment_mode` says (points first by default). All or nothing: 409 `insufficient_funds`
        with `shortfall_minor` when they cannot cover it."""
        services = services_of(state)
        user_id: uuid.UUID = request.user.id
        async with services.readonly() as session:
            rental = await session.get(Rental, rental_id)
            if rental is None or rental.user_id != user_id:
                raise ApiError(404, "rental_not_found", f"no rental {rental_id}")
        payload = {"rental_id": str(rental_id), "payment_mode": data.payment_mode}
        try:
            result = await services.runtime.call(
                "wallet", str(user_id), "PayDue", payload,
                command_id=pay_due_command_id(user_id, rental_id, data.idempotency_key), timeout_s=PAY_DUE_WAIT_S,
            )
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise ApiError(503, "wallet_timeout", "accepted but not applied yet; repeat with the same idempotency_key") from exc
        if not result.get("ok"):
            reason = str(result.get("reason") or "pay_due_refused")
            details = {k: v for k, v in result.items() if k not in ("ok", "reason") and isinstance(v, (int, str))}
            raise ApiError(PAY_DUE_STATUS.get(reason, 409), reason, f"the due was not paid: {reason}", **details)
        async with services.readonly() as session:
            wallet = await read_wallet(session, user_id, services.settings.currency)
        # All or nothing: once paid, nothing is due (the rental's own row catches up when the
        # Rental actor applies DuePaid, a moment later).
        return PayDueResult(
            rental_id=rental_id, paid_minor=int(result.get("paid_minor", 0)), wallet_minor=int(result.get("wallet_minor", 0)),
            points=int(result.get("points", 0)), already_paid=bool(result.get("already_paid", False)),
            due_minor=0, wallet=wallet,
        )
