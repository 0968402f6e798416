"""Leaderboard and achievements over ASGI; one run on PostgreSQL for the minute arithmetic
(julianday on SQLite, extract(epoch) on PostgreSQL) that usage stats share."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy
from powerbank.http.routes_social import display_name, is_stale, period_start, rank_rows
from powerbank.http.testing import insert_rental, running_services, settings_for_tests, sign_up
from powerbank.storage.models import UserLeaderboard
from powerbank.storage.seed import ensure_defaults
from powerbank.storage.types import utcnow


def test_display_names_never_show_a_full_name():
    user_id = uuid.UUID("00000000-0000-0000-0000-00000000abcd")
    assert display_name("Asha Maya Karki", user_id) == "Asha K."
    assert display_name("Asha", user_id) == "Asha"
    assert display_name(None, user_id) == display_name("  ", user_id) == "Rider abcd"


def test_ranking_shares_places_on_ties():
    a, b, c, d = (uuid.UUID(int=i) for i in range(1, 5))
    ranked = rank_rows([(a, 3, 100), (b, 5, 10), (c, 3, 100), (d, 1, 999)])
    assert [(u, r) for u, r, _, _ in ranked] == [(b, 1), (a, 2), (c, 2), (d, 4)]


def test_staleness_and_periods():
    now = utcnow()
    assert is_stale(None, now) and is_stale(now - timedelta(seconds=300), now) and not is_stale(now, now)
    assert period_start("all_time", now) is None and period_start("month", now).day == 1


async def complete(services, user_id, count: int, minutes: int = 30, serial: str | None = None):
    for _ in range(count):
        started = utcnow() - timedelta(minutes=minutes + 1)
        await insert_rental(
            services, user_id, status="completed", serial=serial, started_at=started,
            due_at=started + timedelta(minutes=60), returned_at=started + timedelta(minutes=minutes),
        )


async def test_leaderboard_ranks_completed_rentals_and_shows_the_callers_place(app_client, app_services):
    alice, alice_id = await sign_up(app_client, "+9779810100001")
    bob, bob_id = await sign_up(app_client, "+9779810100002")
    carol, _ = await sign_up(app_client, "+9779810100003")
    await app_client.put("/api/user/profile", headers=alice, json={"full_name": "Alice Adhikari"})
    await complete(app_services, alice_id, 3)
    await complete(app_services, bob_id, 1, minutes=45)
    await insert_rental(app_services, bob_id, status="cancelled")

    board = (await app_client.get("/api/users/leaderboard", headers=bob)).json()
    assert [(e["rank"], e["display_name"], e["rentals_completed"]) for e in board["items"]] == [
        (1, "Alice A.", 3), (2, f"Rider {bob_id.hex[-4:]}", 1)
    ]
    assert board["items"][1]["minutes_total"] == 45 and board["items"][1]["is_you"]
    assert board["you"]["rank"] == 2
    assert "+97798" not in str(board)
    assert (await app_client.get("/api/users/leaderboard", headers=carol)).json()["you"] is None
    assert (await app_client.get("/api/users/leaderboard", headers=carol, params={"period": "year"})).status_code == 400
    assert (await app_client.get("/api/users/leaderboard")).status_code == 401


async def test_leaderboard_is_a_snapshot_refreshed_after_its_ttl(app_client, app_services):
    alice, alice_id = await sign_up(app_client, "+9779810100004")
    await complete(app_services, alice_id, 1)
    first = (await app_client.get("/api/users/leaderboard", headers=alice)).json()
    await complete(app_services, alice_id, 1)
    assert (await app_client.get("/api/users/leaderboard", headers=alice)).json()["you"]["rentals_completed"] == 1
    async with app_services.sessions.begin() as session:
        await session.execute(update(UserLeaderboard).values(computed_at=utcnow() - timedelta(hours=1)))
    later = (await app_client.get("/api/users/leaderboard", headers=alice)).json()
    assert later["you"]["rentals_completed"] == 2 and later["computed_at"] > first["computed_at"]


async def test_achievements_track_progress_and_unlock_once(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779810100005")
    fresh = {a["code"]: a for a in (await app_client.get("/api/users/achievements", headers=headers)).json()}
    assert set(fresh) == {"first-rental", "regular", "on-time", "explorer"}
    assert all(not a["unlocked"] and a["progress"] == 0 for a in fresh.values())
    await complete(app_services, user_id, 2, serial="ACH-1")
    await complete(app_services, user_id, 1, serial="ACH-2")
    after = {a["code"]: a for a in (await app_client.get("/api/users/achievements", headers=headers)).json()}
    assert after["first-rental"]["unlocked"] and after["first-rental"]["progress"] == 3
    assert not after["regular"]["unlocked"] and after["regular"]["progress"] == 3
    assert after["on-time"]["progress"] == 3 and after["explorer"]["progress"] == 2
    again = {a["code"]: a for a in (await app_client.get("/api/users/achievements", headers=headers)).json()}
    assert again["first-rental"]["unlocked_at"] == after["first-rental"]["unlocked_at"]


@pytest.mark.postgres
async def test_minutes_and_rankings_on_postgres(tmp_path):
    from powerbank.storage.testing import create_postgres_database, drop_postgres_database

    name, url = await create_postgres_database()
    try:
        async with running_services(settings_for_tests(tmp_path, url)) as services:
            await ensure_defaults(services.sessions, "NPR")
            app = create_app(services, auth_policy=AuthPolicy(otp_echo=True, otp_rate_per_ip=1000))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                headers, user_id = await sign_up(client, "+9779810100006")
                await complete(services, user_id, 2, minutes=40)
                stats = (await client.get("/api/user/analytics/usage-stats", headers=headers)).json()
                assert (stats["rentals_completed"], stats["minutes_rented_total"]) == (2, 80)
                board = (await client.get("/api/users/leaderboard", headers=headers, params={"period": "month"})).json()
                assert board["you"]["minutes_total"] == 80 and board["you"]["rank"] == 1
                assert (await client.get("/api/users/achievements", headers=headers)).json()[0]["unlocked"]
    finally:
        await drop_postgres_database(name)


async def test_concurrent_first_reads_of_achievements_both_answer(app_client):
    headers, _ = await sign_up(app_client, "+9779810100007")
    responses = await asyncio.gather(*(app_client.get("/api/users/achievements", headers=headers) for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(len(r.json()) == 4 for r in responses)
