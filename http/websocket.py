"""`GET /api/ws`: live events for the signed-in person.

The socket subscribes to the bus channel `user:{user_id}`, where actors publish after commit
(`{"type": "rental.updated", "rental": {...}}` and the like), and forwards every message as a
JSON text frame. The bus is not the source of truth: an app that reconnects re-reads the REST
endpoints for anything it may have missed.

Frames: the first is `{"type": "hello", "user_id": ...}`; a client may send the text `ping`
and gets `{"type": "pong"}`. Close codes: 4401 for a missing, bad or expired token (also when
the access token expires while connected: reconnect with a fresh one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from litestar import WebSocket, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect

from powerbank.http.auth import AuthUser, authenticate_token, bearer_token
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401


def user_channel(user_id: object) -> str:
    return f"user:{user_id}"


def seconds_until_expiry(user: AuthUser) -> float:
    return max(0.0, (user.claims.expires_at - utcnow()).total_seconds())


@websocket("/api/ws", opt={"exclude_from_auth": True})
async def live_events(socket: WebSocket, state: State) -> None:
    """Authenticate (query `token` or `Authorization: Bearer`), then forward the person's
    events until either side closes or the token expires."""
    await socket.accept()
    token = socket.query_params.get("token") or bearer_token(socket.headers.get("authorization"))
    services = services_of(state)
    try:
        user = await authenticate_token(services, token)
    except ApiError as exc:
        await socket.close(code=CLOSE_UNAUTHORIZED, reason=exc.detail[:120])
        return
    async with services.bus.subscribe(user_channel(user.id)) as subscription:
        await socket.send_json({"type": "hello", "user_id": str(user.id)})
        forwarding = asyncio.create_task(_forward(socket, subscription))
        listening = asyncio.create_task(_listen(socket))
        done, pending = await asyncio.wait(
            {forwarding, listening}, timeout=seconds_until_expiry(user), return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("websocket of %s ended: %r", user.id, task.exception())
        if not done:
            await _close_quietly(socket, CLOSE_UNAUTHORIZED, "token expired")
        elif listening not in done:
            await _close_quietly(socket, 1011, "event stream ended")


async def _forward(socket: WebSocket, subscription: Any) -> None:
    while True:
        _, message = await subscription.get()
        await socket.send_json(message)


async def _listen(socket: WebSocket) -> None:
    """Reads client frames: detects the close, answers pings."""
    try:
        while True:
            text = await socket.receive_text()
            if text.strip().lower() == "ping":
                await socket.send_json({"type": "pong"})
    except WebSocketDisconnect:
        return


async def _close_quietly(socket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await socket.close(code=code, reason=reason)
