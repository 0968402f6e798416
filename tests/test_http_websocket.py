"""The live websocket over a real server (uvicorn on a free port) and a real client."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import powerbank.actors.wallet  # noqa: F401
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy, create_access_token
from powerbank.http.testing import running_services, serve, settings_for_tests
from powerbank.http.websocket import user_channel

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)


@pytest.fixture
async def services(tmp_path):
    async with running_services(settings_for_tests(tmp_path)) as services:
        yield services


@pytest.fixture
async def base_url(services):
    async with serve(create_app(services, auth_policy=POLICY)) as url:
        yield url


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/api/ws"


async def sign_up(base_url: str, phone: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url) as client:
        code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
        return (await client.post("/api/auth/register", json={"phone": phone, "code": code})).json()


async def test_forwards_what_is_published_on_the_users_channel(base_url, services):
    body = await sign_up(base_url, "+9779814000001")
    user_id = body["user"]["id"]
    async with websockets.connect(f"{ws_url(base_url)}?token={body['access_token']}") as socket:
        hello = json.loads(await asyncio.wait_for(socket.recv(), 5))
        assert (hello["type"], hello["user_id"]) == ("hello", user_id) and isinstance(hello["cursor"], int)
        # Someone else's event must not arrive here; ours must, as sent.
        await services.bus.publish(user_channel(uuid.uuid4()), {"type": "rental.updated", "rental": {"id": "other"}})
        event = {"type": "rental.updated", "rental": {"id": "r1", "status": "active"}}
        await services.bus.publish(user_channel(user_id), event)
        assert json.loads(await asyncio.wait_for(socket.recv(), 5)) == event
        await socket.send("ping")
        assert json.loads(await asyncio.wait_for(socket.recv(), 5)) == {"type": "pong"}


async def test_authorization_header_is_accepted(base_url):
    body = await sign_up(base_url, "+9779814000002")
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    async with websockets.connect(ws_url(base_url), additional_headers=headers) as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["type"] == "hello"


@pytest.mark.parametrize("query", ["", "?token=garbage"])
async def test_bad_token_closes_with_4401(base_url, query):
    async with websockets.connect(ws_url(base_url) + query) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd.code == 4401


async def test_token_expiry_closes_the_socket(base_url, services):
    body = await sign_up(base_url, "+9779814000003")
    short = create_access_token(services.settings, body["user"]["id"], "user", ttl_s=2)
    async with websockets.connect(f"{ws_url(base_url)}?token={short}") as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["type"] == "hello"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd.code == 4401


async def test_disconnect_releases_the_subscription(base_url, services):
    body = await sign_up(base_url, "+9779814000004")
    channel = user_channel(body["user"]["id"])
    async with websockets.connect(f"{ws_url(base_url)}?token={body['access_token']}") as socket:
        await asyncio.wait_for(socket.recv(), 5)
        assert channel in services.bus._subscribers
    for _ in range(100):
        if channel not in services.bus._subscribers:
            break
        await asyncio.sleep(0.02)
    assert channel not in services.bus._subscribers


async def credit(services, user_id: str, amount_minor: int) -> None:
    transfer_id = str(uuid.uuid4())
    payload = {"amount_minor": amount_minor, "currency": "NPR", "transfer_id": transfer_id, "reason": "test"}
    assert (await services.runtime.call("wallet", user_id, "CreditWallet", payload, f"credit:{transfer_id}"))["ok"]


async def received(socket, count: int) -> list[dict]:
    return [json.loads(await asyncio.wait_for(socket.recv(), 5)) for _ in range(count)]


async def test_a_client_back_with_its_cursor_gets_every_missed_event_once_then_the_live_ones(base_url, services):
    body = await sign_up(base_url, "+9779814000005")
    user_id, url = body["user"]["id"], f"{ws_url(base_url)}?token={body['access_token']}"
    async with websockets.connect(url) as socket:
        cursor = json.loads(await asyncio.wait_for(socket.recv(), 5))["cursor"]
        await credit(services, user_id, 100)
        [seen] = await received(socket, 1)
        assert (seen["type"], seen["seq"], seen["wallet"]["balance_minor"]) == ("wallet.updated", cursor + 1, 100)
    # Away: three changes happen.
    for amount in (200, 300, 400):
        await credit(services, user_id, amount)
    async with websockets.connect(f"{url}&cursor={seen['seq']}") as socket:
        hello, *missed = await received(socket, 4)
        assert hello["cursor"] == seen["seq"] + 3
        assert [(e["seq"], e["wallet"]["balance_minor"]) for e in missed] == [(seen["seq"] + 1, 300), (seen["seq"] + 2, 600), (seen["seq"] + 3, 1000)]
        await credit(services, user_id, 500)
        [live] = await received(socket, 1)
        assert (live["seq"], live["wallet"]["balance_minor"]) == (seen["seq"] + 4, 1500)
        await socket.send("ping")
        assert await received(socket, 1) == [{"type": "pong"}]  # nothing sent twice in between


async def test_a_cursor_older_than_what_is_kept_asks_for_a_resync(base_url, services):
    from sqlalchemy import delete

    from powerbank.actors import user_events
    from powerbank.storage.models import UserEvent

    body = await sign_up(base_url, "+9779814000006")
    user_id = body["user"]["id"]
    for amount in (100, 200, 300):
        await credit(services, user_id, amount)
    async with services.sessions.begin() as session:  # as if all but the latest were pruned
        latest = await user_events.last_seq(session, uuid.UUID(user_id))
        await session.execute(delete(UserEvent).where(UserEvent.user_id == uuid.UUID(user_id), UserEvent.seq < latest))
    async with websockets.connect(f"{ws_url(base_url)}?token={body['access_token']}&cursor=0") as socket:
        hello, resync, kept = await received(socket, 3)
    assert hello["cursor"] == latest >= 3
    assert resync["type"] == "resync"
    assert (kept["seq"], kept["wallet"]["balance_minor"]) == (latest, 600)
    async with websockets.connect(f"{ws_url(base_url)}?token={body['access_token']}&cursor=abc") as socket:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd.code == 4400


# --- the map's station stream ----------------------------------------------------------------


async def add_station(services, serial: str, lat: float, lng: float) -> str:
    from powerbank.storage.models import PowerBank, Station, StationSlot
    from powerbank.storage.types import utcnow

    async with services.sessions.begin() as session:
        station = Station(serial=serial, name=serial, latitude=lat, longitude=lng, status="online", slot_count=2, last_seen_at=utcnow())
        session.add(station)
        await session.flush()
        bank = PowerBank(serial=f"{serial}-B1", charge_percent=90, status="in_slot", currency="NPR", station_id=station.id)
        session.add(bank)
        await session.flush()
        session.add_all([
            StationSlot(station_id=station.id, slot_number=1, status="occupied", power_bank_id=bank.id),
            StationSlot(station_id=station.id, slot_number=2, status="empty"),
        ])
        return str(station.id)


def stations_url(base_url: str, query: str) -> str:
    return base_url.replace("http://", "ws://") + "/api/ws/stations?" + query


async def test_a_map_gets_a_snapshot_then_changes_of_the_stations_in_its_area(base_url, services):
    import powerbank.actors.station  # noqa: F401  (registers SetMaintenance)

    near = await add_station(services, "ST-NEAR", 27.7000, 85.3000)
    other = await add_station(services, "ST-OTHER", 27.7100, 85.3100)  # about 1.5 km away
    far = await add_station(services, "ST-FAR", 27.9000, 85.3000)  # 22 km north
    async with websockets.connect(stations_url(base_url, "lat=27.7&lng=85.3&radius_m=1000")) as area, \
            websockets.connect(stations_url(base_url, f"stations={far}")) as one:
        snapshot = json.loads(await asyncio.wait_for(area.recv(), 5))
        assert snapshot["type"] == "stations.snapshot"
        assert [(s["serial"], s["available"], s["empty_slots"]) for s in snapshot["stations"]] == [("ST-NEAR", 1, 1)]
        assert [s["serial"] for s in json.loads(await asyncio.wait_for(one.recv(), 5))["stations"]] == ["ST-FAR"]
        for station_id in (other, far, near):  # changes outside the circle must not arrive there
            await services.runtime.call("station", station_id, "SetMaintenance", {"maintenance": True}, f"park-{station_id}")
        update = json.loads(await asyncio.wait_for(area.recv(), 5))
        assert (update["type"], update["serial"], update["status"]) == ("station.updated", "ST-NEAR", "maintenance")
        assert json.loads(await asyncio.wait_for(one.recv(), 5))["serial"] == "ST-FAR"
        await area.send("ping")
        assert json.loads(await asyncio.wait_for(area.recv(), 5)) == {"type": "pong"}


async def test_a_bad_station_subscription_is_refused(base_url):
    for query in ("", "stations=not-an-id", "lat=27.7&lng=85.3&radius_m=50000", "lat=100&lng=0"):
        async with websockets.connect(stations_url(base_url, query)) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 5)
        assert closed.value.rcvd.code == 4400, query


# --- the Procfile's shape: web, worker and mqtt as separate processes -------------------------


PROCESS_REDIS_DB = 14
LIVE_EVENT_BUDGET_S = 1.0


def _start_role(role: str, env: dict, log_path) -> "subprocess.Popen":
    import subprocess
    import sys

    with open(log_path, "w") as output:
        return subprocess.Popen([sys.executable, "-m", "powerbank.cli", role], env=env, stdout=output, stderr=subprocess.STDOUT)


async def _events_until(socket, wanted: str, seen: list) -> None:
    """Collect rental events (with their arrival time) until one named `wanted`."""
    import time

    while True:
        message = json.loads(await asyncio.wait_for(socket.recv(), 10))
        if message.get("type") == "rental.updated":
            seen.append((message["event"], message["rental"]["status"], time.monotonic()))
            if message["event"] == wanted:
                return


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_riders_websocket_sees_its_rental_live_across_processes(tmp_path):
    """Web, worker and mqtt in separate processes on PostgreSQL + Redis, a simulated station on
    real MQTT: the rider's socket gets requested, started (active), returned and charged, in
    order, each within a second of what caused it (the tap, or the bank going back in)."""
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import time

    from powerbank.demo import free_port
    from powerbank.http.auth import ensure_admin_token
    from powerbank.http.testing import settings_for_tests
    from powerbank.services import build_services
    from powerbank.simulators.stations import StationSimulator, provision_fleet
    from powerbank.storage.testing import create_postgres_database, drop_postgres_database, isolated_redis_url

    name, database_url = await create_postgres_database()
    http_port, mqtt_port, secret = free_port(), free_port(), secrets.token_urlsafe(32)
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": isolated_redis_url(PROCESS_REDIS_DB),
           "PORT": str(http_port), "MQTT_PORT": str(mqtt_port), "JWT_SECRET": secret, "MQTT_BRIDGE_PASSWORD": secret,
           "POWERBANK_DATA_DIR": str(tmp_path), "POWERBANK_OTP_ECHO": "1", "OTP_RATE_PER_IP": "10000"}
    processes, station = [], None
    services = build_services(settings_for_tests(tmp_path, database_url, redis_url=env["REDIS_URL"], jwt_secret=secret))
    try:
        assert subprocess.run([sys.executable, "-m", "powerbank.cli", "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
        processes = [_start_role(role, env, tmp_path / f"{role}.log") for role in ("web", "worker", "mqtt")]
        base_url = f"http://127.0.0.1:{http_port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
            for _ in range(200):
                try:
                    if (await http.get("/api/app/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            [spec] = await provision_fleet(services.sessions, 1, 4, 2, serial_prefix=f"LIVE{secrets.token_hex(2).upper()}")
            station = StationSimulator(spec, f"mqtt://127.0.0.1:{mqtt_port}", heartbeat_interval_s=30)
            await station.start(wait_s=20)
            for _ in range(100):
                if (await http.get(f"/api/app/stations/{spec.serial}")).json().get("status") == "online":
                    break
                await asyncio.sleep(0.1)
            body = await sign_up(base_url, "+9779814000077")
            rider = {"Authorization": f"Bearer {body['access_token']}"}
            admin = {"Authorization": f"Bearer {await ensure_admin_token(services, '+9779800000077')}"}
            credit = await http.post(f"/api/admin/wallets/{body['user']['id']}/credit", json={"amount_minor": 100_000, "currency": "NPR", "reason": "test"}, headers=admin)
            assert credit.status_code == 200, credit.text
            package_id = (await http.get("/api/payment/packages")).json()[0]["id"]

            seen: list = []
            async with websockets.connect(f"{ws_url(base_url)}?token={body['access_token']}") as socket:
                await asyncio.wait_for(socket.recv(), 10)  # hello
                tapped_at = time.monotonic()
                started = await http.post("/api/rentals/start", json={"station_sn": spec.serial, "package_id": package_id}, headers=rider)
                assert started.status_code == 201, started.text
                await _events_until(socket, "started", seen)
                [bank] = station.handed_out
                returned_at = time.monotonic()
                await station.insert_bank(bank)
                await _events_until(socket, "charged", seen)
    finally:
        if station is not None:
            await station.stop()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        await services.close()
        await drop_postgres_database(name)

    events = [event for event, _, _ in seen]
    for first, then in (("requested", "started"), ("started", "returned"), ("returned", "charged")):
        assert events.index(first) < events.index(then), events
    arrival = {event: (status, at) for event, status, at in seen}
    assert arrival["started"][0] == "active" and arrival["returned"][0] == "completed"
    for event, cause in (("requested", tapped_at), ("started", tapped_at), ("returned", returned_at), ("charged", returned_at)):
        assert arrival[event][1] - cause <= LIVE_EVENT_BUDGET_S, (event, round(arrival[event][1] - cause, 3), events)
    print({event: round(at - (tapped_at if event in ("requested", "started") else returned_at), 3) for event, (_, at) in arrival.items()})


@pytest.mark.slow
async def test_away_for_thirty_seconds_a_client_catches_up_on_everything_once(base_url, services):
    """The issue's case as stated: away 30 s while things keep happening, then back with the
    cursor; every missed event once, in order, and the live stream after it."""
    body = await sign_up(base_url, "+9779814000008")
    user_id, url = body["user"]["id"], f"{ws_url(base_url)}?token={body['access_token']}"
    async with websockets.connect(url) as socket:
        cursor = json.loads(await asyncio.wait_for(socket.recv(), 5))["cursor"]
    away_started = asyncio.get_running_loop().time()
    for amount in (100, 200, 300, 400, 500, 600):
        await credit(services, user_id, amount)
        await asyncio.sleep(5)
    assert asyncio.get_running_loop().time() - away_started >= 30
    async with websockets.connect(f"{url}&cursor={cursor}") as socket:
        hello, *missed = await received(socket, 7)
        assert [e["seq"] for e in missed] == list(range(cursor + 1, cursor + 7))
        assert [e["wallet"]["balance_minor"] for e in missed] == [100, 300, 600, 1000, 1500, 2100]
        await credit(services, user_id, 700)
        [live] = await received(socket, 1)
        assert (live["seq"], live["wallet"]["balance_minor"]) == (cursor + 7, 2800)
