"""`GET /api/ws`: live events for the signed-in person, with catch-up after a disconnect.

The socket subscribes to the bus channel `user:{user_id}`, where actors publish after commit
(`{"type": "rental.updated", "seq": 41, "rental": {...}}` and the like), and forwards every message
as a JSON text frame. Each such event is also kept, numbered per person in commit order
(actors/user_events.py): a client that reconnects with `?cursor=<the last seq it saw>` first gets
every kept event after it, in order, then the live stream, each event once. See docs/websocket.md.

Frames: the first is `{"type": "hello", "user_id": ..., "cursor": <the latest seq>}`; with a
cursor older than what is kept, a `{"type": "resync"}` follows (re-read the REST endpoints). A
client may send the text `ping` and gets `{"type": "pong"}`. Close codes: 4400 for a cursor that
is not a number, 4401 for a missing, bad or expired token (also when the access token expires
while connected: reconnect with a fresh one and the cursor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from litestar import WebSocket, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect

from powerbank.actors import user_events
from powerbank.http.auth import AuthUser, authenticate_token, bearer_token
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_BAD_REQUEST = 4400


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
        cursor = parse_cursor(socket.query_params.get("cursor"))
    except ApiError as exc:
        await socket.close(code=CLOSE_UNAUTHORIZED if exc.status_code == 401 else CLOSE_BAD_REQUEST, reason=exc.detail[:120])
        return
    async with services.bus.subscribe(user_channel(user.id)) as subscription:
        # Subscribed before reading what was kept: an event committed meanwhile is in both, and
        # the numbers drop the second copy.
        async with services.readonly() as session:
            latest = await user_events.last_seq(session, user.id)
        await socket.send_json({"type": "hello", "user_id": str(user.id), "cursor": latest})
        sent_up_to = await _catch_up(socket, services, user.id, cursor) if cursor is not None else latest
        forwarding = asyncio.create_task(_forward(socket, subscription, sent_up_to))
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


def parse_cursor(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, "bad_cursor", "cursor must be the seq of an event, a whole number")
    return int(raw)


async def _catch_up(socket: WebSocket, services, user_id, cursor: int) -> int:
    """Send every kept event after `cursor`, oldest first; the last seq sent (or the cursor)."""
    async with services.readonly() as session:
        oldest = await user_events.oldest_kept_seq(session, user_id)
    if oldest is not None and cursor < oldest - 1:
        await socket.send_json({"type": "resync", "reason": "events after your cursor are no longer kept"})
    while True:
        async with services.readonly() as session:
            missed = await user_events.since(session, user_id, cursor)
        for event in missed:
            await socket.send_json(event)
            cursor = event["seq"]
        if len(missed) < user_events.REPLAY_LIMIT:
            return cursor


async def _forward(socket: WebSocket, subscription: Any, sent_up_to: int) -> None:
    """Live events, skipping any the catch-up already sent (kept events carry their `seq`)."""
    while True:
        _, message = await subscription.get()
        seq = message.get("seq") if isinstance(message, dict) else None
        if isinstance(seq, int):
            if seq <= sent_up_to:
                continue
            sent_up_to = seq
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
