"""Small pieces every route module uses: reaching the services, paging, the caller's address.

Routes open short `services.sessions()` blocks themselves instead of one session per request:
on SQLite every transaction takes the write lock, and a request that awaits an actor (rental
start, wallet credit) must not hold it while the actor needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.params import QueryParameter

if TYPE_CHECKING:
    from powerbank.services import Services

MAX_PAGE_SIZE = 100


def services_of(state: State) -> "Services":
    return state.services


def client_ip(connection: ASGIConnection) -> str:
    """The peer address. Behind a reverse proxy, run uvicorn with --proxy-headers so this is the
    real client, not the proxy (otherwise every rider shares one OTP rate limit)."""
    return connection.client.host if connection.client else "unknown"


@dataclass(frozen=True)
class Paging:
    page: int
    page_size: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size


async def provide_paging(
    page: Annotated[int, QueryParameter(ge=1, le=100_000, description="1-based page number")] = 1,
    page_size: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE_SIZE, description="items per page")] = 20,
) -> Paging:
    return Paging(page=page, page_size=page_size)
