"""Small helpers around amqtt's MQTTClient shared by the bridge and the station simulator.

amqtt's own auto-reconnect re-creates the session behind the caller's back and cannot re-run
the caller's post-connect steps (re-subscribe, re-send unacknowledged events, report an
inventory), so both users run their own reconnect loop with `auto_reconnect` off, and these
helpers make connecting and closing leave nothing open (a refused CONNECT otherwise leaks the
socket, which pytest's warnings-as-errors rightly reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from amqtt.client import ClientError, MQTTClient

QOS_1 = 1


def client_config(*, keep_alive_s: int = 10, will: tuple[str, str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "keep_alive": keep_alive_s,
        "ping_delay": 1,
        "default_qos": QOS_1,
        "auto_reconnect": False,
        "connection_timeout": 5,
        "plugins": {},  # no packet logging plugins on the hot path
    }
    if will is not None:
        topic, message = will
        config["will"] = {"topic": topic, "message": message, "qos": QOS_1, "retain": False}
    return config


async def connect(
    url: str,
    client_id: str,
    *,
    will: tuple[str, str] | None = None,
    keep_alive_s: int = 10,
    timeout_s: float = 10.0,
) -> MQTTClient:
    """A connected client (clean session), or an exception with nothing left open."""
    client = MQTTClient(client_id=client_id, config=client_config(keep_alive_s=keep_alive_s, will=will))
    attempt = asyncio.ensure_future(client.connect(url, cleansession=True))
    # Cancelled, amqtt's connect raises ConnectError rather than CancelledError, which
    # wait_for never reads: "Task exception was never retrieved". Read it here.
    attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait_for(attempt, timeout_s)
    except BaseException:
        await _close_transport(client)
        raise
    no_delay(getattr(getattr(client, "_handler", None), "writer", None))
    return client


def no_delay(writer: Any) -> None:
    """Send small packets at once (TCP_NODELAY) on an amqtt writer adapter's socket.

    MQTT is small request/answer packets (PUBLISH then PUBACK, an event then its ack); with
    Nagle's algorithm on one end and delayed ACKs on the other, each exchange can stall for
    the delayed-ACK timer (40 ms on Linux). amqtt leaves the option unset."""
    stream = getattr(writer, "_writer", None)
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def is_connected(client: MQTTClient | None) -> bool:
    return bool(client and client.session and client.session.transitions.is_connected())


async def close(client: MQTTClient | None) -> None:
    """Disconnect cleanly when still connected (no last will), and release the socket."""
    if client is None:
        return
    with contextlib.suppress(Exception):
        if is_connected(client):
            await asyncio.wait_for(client.disconnect(), 5)
    await _close_transport(client)
    task = getattr(client, "_disconnect_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def abort(client: MQTTClient | None) -> None:
    """Drop the TCP connection without an MQTT DISCONNECT, as a power cut would: the broker then
    publishes the client's last will. For fault injection and tests."""
    handler = getattr(client, "_handler", None)
    writer = getattr(handler, "writer", None)
    stream = getattr(writer, "_writer", None)
    if stream is not None:
        stream.transport.abort()


async def _close_transport(client: MQTTClient) -> None:
    """Close the socket. amqtt's own close() awaits drain() first and gives up (for good) if the
    peer has reset the connection, so the transport underneath is closed here as well."""
    handler = getattr(client, "_handler", None)
    writer = getattr(handler, "writer", None)
    if writer is not None:
        with contextlib.suppress(Exception):
            await writer.close()
        stream = getattr(writer, "_writer", None)
        if stream is not None:
            stream.close()


async def messages(client: MQTTClient) -> AsyncIterator[tuple[str, bytes]]:
    """(topic, payload) of every message delivered to `client`, until its connection is gone.

    Waits on amqtt's delivery queue and on the client's own disconnection task together, so an
    idle client costs nothing: no polling (with ten thousand simulated stations in a process, a
    one-second poll each is ten thousand task creations a second). Messages already queued when
    the connection drops are still handed over: amqtt PUBACKed them. Falls back to polling
    `deliver_message` if amqtt's internals are not where this expects them."""
    session = getattr(client, "session", None)
    queue = getattr(session, "delivered_message_queue", None)
    closed = getattr(client, "_disconnect_task", None)
    if queue is None or closed is None:
        async for item in _polled_messages(client):
            yield item
        return
    while True:
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            message = getter.result()
            yield message.topic, bytes(message.data or b"")
            continue
        while not queue.empty():
            message = queue.get_nowait()
            yield message.topic, bytes(message.data or b"")
        return


async def _polled_messages(client: MQTTClient) -> AsyncIterator[tuple[str, bytes]]:
    """amqtt's `deliver_message` only times out or raises; polling it with a short timeout is
    how a reader notices a dropped connection instead of waiting forever."""
    while True:
        try:
            message = await client.deliver_message(timeout_duration=1.0)
        except TimeoutError:
            message = None
        except ClientError:
            return
        if message is None:
            if not is_connected(client):
                return
            continue
        yield message.topic, bytes(message.data or b"")
