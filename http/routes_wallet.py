"""The signed-in person's wallet, read from the ledger rows the Wallet actor keeps."""

from __future__ import annotations

import uuid

from litestar import Controller, Request, get
from litestar.datastructures import State
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import services_of
from powerbank.http.errors import error_responses
from powerbank.http.schemas import WalletView
from powerbank.storage.ledger import credit_balance
from powerbank.storage.models import LedgerAccount, Wallet


def account_balance(account: LedgerAccount | None) -> tuple[int, int]:
    """(balance, held) of a credit-normal user account: posted credits minus posted debits,
    and the debits still pending (holds), which are not spendable but not gone either. Same
    arithmetic as the Wallet actor's `wallet.updated` events, so REST and websocket agree."""
    if account is None:
        return 0, 0
    balance = credit_balance(account)
    return balance.posted_minor, balance.held_minor


def wallet_view(currency: str, money: LedgerAccount | None, points: LedgerAccount | None) -> WalletView:
    balance, held = account_balance(money)
    points_balance, points_held = account_balance(points)
    return WalletView(
        currency=currency,
        balance_minor=balance,
        held_minor=held,
        available_minor=balance - held,
        points=points_balance,
        points_held=points_held,
    )


async def read_wallet(session: AsyncSession, user_id: uuid.UUID, default_currency: str) -> WalletView:
    """Zeros in the default currency until the Wallet actor has opened the wallet."""
    wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one_or_none()
    if wallet is None:
        return wallet_view(default_currency, None, None)
    money = await session.get(LedgerAccount, wallet.account_id)
    points = await session.get(LedgerAccount, wallet.points_account_id)
    return wallet_view(wallet.currency, money, points)


class UserWalletController(Controller):
    path = "/api/user"
    tags = ["wallet"]
    security = BEARER_SECURITY

    @get("/wallet", responses=error_responses(401))
    async def wallet(self, state: State, request: Request) -> WalletView:
        """Balance, held (funds reserved for running rentals), available (balance minus held),
        and points (posted balance; `points_held` of it is reserved)."""
        services = services_of(state)
        async with services.readonly() as session:
            return await read_wallet(session, request.user.id, services.settings.currency)
