"""Coupons and referrals: the pure decisions, the endpoints over ASGI on SQLite, and the coupon
limit under 5N concurrent appliers on both SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

import powerbank.actors.wallet  # noqa: F401  (OpenWallet)
import powerbank.actors.wallet_rewards  # noqa: F401  (AwardPoints)
from powerbank.actors import promotions
from powerbank.actors.promotions import CouponFacts, ReferralFacts, coupon_refusal, referral_refusal
from powerbank.actors.wallet_rewards import award_envelope, award_refusal
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy, create_access_token, ensure_admin_token
from powerbank.http.testing import running_services, settings_for_tests
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import ActorCommand, AppConfig, Coupon, CouponUsage, LedgerAccount, LedgerTransfer, Referral, User, Wallet

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


# --- pure decisions ---------------------------------------------------------------------------


def facts(**overrides) -> CouponFacts:
    values = dict(active=True, valid_from=None, valid_until=None, max_uses=10, uses=0, per_user_limit=1)
    return CouponFacts(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides, uses_by_user, reason",
    [
        ({}, 0, None),
        ({"max_uses": None, "uses": 10**6}, 0, None),
        ({"active": False}, 0, "coupon_inactive"),
        ({"valid_from": NOW + timedelta(seconds=1)}, 0, "coupon_not_yet_valid"),
        ({"valid_from": NOW}, 0, None),
        ({"valid_until": NOW}, 0, "coupon_expired"),
        ({"valid_until": NOW + timedelta(seconds=1)}, 0, None),
        ({}, 1, "coupon_already_used"),
        ({"per_user_limit": 3}, 2, None),
        ({"uses": 10}, 0, "coupon_exhausted"),
        ({"uses": 10}, 1, "coupon_already_used"),
    ],
)
def test_coupon_refusal(overrides, uses_by_user, reason):
    assert coupon_refusal(facts(**overrides), NOW, uses_by_user) == reason


def referral(**overrides) -> ReferralFacts:
    referrer, referee = uuid.uuid4(), uuid.uuid4()
    values = dict(
        referrer_id=referrer, referrer_active=True, referee_id=referee, referee_created_at=NOW - timedelta(days=1),
        referee_has_claimed=False, referrer_referred_by_referee=False,
    )
    return ReferralFacts(**{**values, **overrides})


def test_referral_refusal():
    assert referral_refusal(referral(), NOW, 7) is None
    same = uuid.uuid4()
    assert referral_refusal(referral(referrer_id=same, referee_id=same), NOW, 7) == "self_referral"
    assert referral_refusal(referral(referrer_active=False), NOW, 7) == "referral_code_not_found"
    assert referral_refusal(referral(referee_has_claimed=True), NOW, 7) == "referral_already_claimed"
    assert referral_refusal(referral(referee_created_at=NOW - timedelta(days=8)), NOW, 7) == "referral_window_closed"
    assert referral_refusal(referral(referrer_referred_by_referee=True), NOW, 7) == "referral_cycle"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["referrer_points", "referee_points", "claim_window_days", "other"]),
                       st.one_of(st.integers(), st.booleans(), st.text(max_size=3), st.none(), st.floats())))
def test_referral_rewards_from_config_stay_within_bounds(value):
    rewards = promotions.referral_rewards_from(value)
    assert 0 <= rewards.referrer_points <= promotions.MAX_REWARD_POINTS
    assert 0 <= rewards.referee_points <= promotions.MAX_REWARD_POINTS
    assert 0 <= rewards.claim_window_days <= 3650
    for name in ("referrer_points", "referee_points", "claim_window_days"):
        raw = value.get(name)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw == getattr(rewards, name):
            continue
        assert getattr(rewards, name) == getattr(promotions.ReferralRewards(), name)


def test_coupon_definition_problem_and_deterministic_ids():
    assert promotions.coupon_definition_problem("discount_percent", 101, None, None, None)[0] == "value"
    assert promotions.coupon_definition_problem("discount_minor", 500, None, None, None)[0] == "currency"
    assert promotions.coupon_definition_problem("points", 5, "NPR", None, None)[0] == "currency"
    assert promotions.coupon_definition_problem("points", 5, None, NOW, NOW)[0] == "valid_until"
    assert promotions.coupon_definition_problem("discount_minor", 500, "NPR", NOW, NOW + timedelta(days=1)) is None
    usage = uuid.uuid4()
    assert promotions.usage_points_transfer_id(usage) == promotions.usage_points_transfer_id(usage)
    ref = uuid.uuid4()
    assert promotions.referral_transfer_id(ref, "referee") != promotions.referral_transfer_id(ref, "referrer")
    assert promotions.normalize_code("  welcome10 ") == "WELCOME10"


# --- endpoints --------------------------------------------------------------------------------


@pytest.fixture
async def services(tmp_path):
    async with running_services(settings_for_tests(tmp_path)) as services:
        yield services


@pytest.fixture
async def client(services):
    app = create_app(services, auth_policy=POLICY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def admin(services):
    return {"Authorization": f"Bearer {await ensure_admin_token(services, '+9779800000009')}"}


async def sign_up(client, phone: str) -> tuple[dict[str, str], dict]:
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    response = await client.post("/api/auth/register", json={"phone": phone, "code": code})
    assert response.status_code == 201, response.text
    body = response.json()
    return {"Authorization": f"Bearer {body['access_token']}"}, body["user"]


async def points_of(client, headers) -> int:
    return (await client.get("/api/user/wallet", headers=headers)).json()["points"]


async def create_coupon(client, admin, **fields) -> dict:
    body = {"code": "WELCOME", "kind": "points", "value": 30, "max_uses": 100, **fields}
    response = await client.post("/api/admin/coupons", json=body, headers=admin)
    assert response.status_code == 201, response.text
    return response.json()


async def count(services, model, *where) -> int:
    async with services.readonly() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where))


async def test_admin_creates_coupons_and_users_may_not(client, admin):
    user, _ = await sign_up(client, "+9779811000001")
    body = {"code": "spring-25", "kind": "discount_percent", "value": 25, "max_uses": 5}
    assert (await client.post("/api/admin/coupons", json=body, headers=user)).status_code == 403
    created = await client.post("/api/admin/coupons", json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["code"] == "SPRING-25" and created.json()["uses"] == 0
    taken = await client.post("/api/admin/coupons", json={**body, "code": "SPRING-25"}, headers=admin)
    assert taken.status_code == 409 and taken.json()["error"] == "coupon_code_taken"
    for bad in (
        {**body, "value": 101},
        {**body, "kind": "discount_minor", "value": 500},
        {**body, "value": 0},
        {**body, "max_uses": 0},
        {**body, "code": "x"},
        {**body, "valid_from": "2026-01-01T00:00:00"},  # naive: refused
        {**body, "kind": "cashback"},
    ):
        refused = await client.post("/api/admin/coupons", json={**bad, "code": bad["code"] + "X"}, headers=admin)
        assert refused.status_code == 400 and refused.json()["error"] == "validation_failed", (bad, refused.text)


async def test_points_coupon_credits_once_and_a_second_application_is_refused(client, admin, services):
    headers, user = await sign_up(client, "+9779811000002")
    await create_coupon(client, admin, code="WELCOME", value=30)
    applied = await client.post("/api/promotions/apply-coupon", json={"code": " welcome"[1:]}, headers=headers)
    assert applied.status_code == 200, applied.text
    body = applied.json()
    assert (body["code"], body["points"], body["points_credited"], body["use_number"], body["replayed"]) == ("WELCOME", 30, True, 1, False)
    assert await points_of(client, headers) == 30
    again = await client.post("/api/promotions/apply-coupon", json={"code": "WELCOME"}, headers=headers)
    assert again.status_code == 409 and again.json()["error"] == "coupon_already_used"
    assert await points_of(client, headers) == 30
    assert await count(services, CouponUsage, CouponUsage.user_id == uuid.UUID(user["id"])) == 1
    mine = (await client.get("/api/promotions/my-coupons", headers=headers)).json()
    assert mine["total"] == 1 and mine["items"][0]["code"] == "WELCOME" and mine["items"][0]["points"] == 30
    async with services.readonly() as session:
        assert await ledger_discrepancies(session) == []


async def test_retried_application_with_a_key_is_replayed(client, admin, services):
    headers, _ = await sign_up(client, "+9779811000003")
    await create_coupon(client, admin, code="MULTI", value=10, per_user_limit=3)
    first = await client.post("/api/promotions/apply-coupon", json={"code": "MULTI", "idempotency_key": "tap-1"}, headers=headers)
    retry = await client.post("/api/promotions/apply-coupon", json={"code": "MULTI", "idempotency_key": "tap-1"}, headers=headers)
    assert first.status_code == retry.status_code == 200
    assert retry.json()["usage_id"] == first.json()["usage_id"] and retry.json()["replayed"] is True
    assert await points_of(client, headers) == 10
    other = await client.post("/api/promotions/apply-coupon", json={"code": "MULTI", "idempotency_key": "tap-2"}, headers=headers)
    assert other.status_code == 200 and other.json()["use_number"] == 2
    assert await points_of(client, headers) == 20
    reused = await client.post("/api/promotions/apply-coupon", json={"code": "WELCOME", "idempotency_key": "tap-1"}, headers=headers)
    assert reused.status_code == 409 and reused.json()["error"] == "idempotency_key_reused"


async def test_same_person_applying_at_once_gets_one_usage(client, admin, services):
    headers, user = await sign_up(client, "+9779811000004")
    await create_coupon(client, admin, code="ONCE", value=7)
    responses = await asyncio.gather(*[
        client.post("/api/promotions/apply-coupon", json={"code": "ONCE"}, headers=headers) for _ in range(5)
    ])
    assert sorted(r.status_code for r in responses) == [200, 409, 409, 409, 409]
    assert {r.json()["error"] for r in responses if r.status_code == 409} == {"coupon_already_used"}
    assert await count(services, CouponUsage, CouponUsage.user_id == uuid.UUID(user["id"])) == 1
    assert await points_of(client, headers) == 7


async def test_unusable_coupons_are_clear_refusals_and_write_nothing(client, admin, services):
    headers, _ = await sign_up(client, "+9779811000005")
    now = datetime.now(timezone.utc)
    await create_coupon(client, admin, code="OFF", active=False)
    await create_coupon(client, admin, code="OLD", valid_from=(now - timedelta(days=2)).isoformat(), valid_until=(now - timedelta(days=1)).isoformat())
    await create_coupon(client, admin, code="SOON", valid_from=(now + timedelta(days=1)).isoformat())
    await create_coupon(client, admin, code="GONE", max_uses=1)
    async with services.sessions.begin() as session:
        await session.execute(update(Coupon).where(Coupon.code == "GONE").values(uses=1))
    for code, status, error in (
        ("OFF", 409, "coupon_inactive"),
        ("OLD", 409, "coupon_expired"),
        ("SOON", 409, "coupon_not_yet_valid"),
        ("GONE", 409, "coupon_exhausted"),
        ("NOPE", 404, "coupon_not_found"),
    ):
        response = await client.post("/api/promotions/apply-coupon", json={"code": code}, headers=headers)
        assert (response.status_code, response.json()["error"]) == (status, error), code
        assert response.json()["detail"]
    await _nothing_written(services, client, headers)


@pytest.mark.parametrize(
    "body",
    [
        {"code": ""},
        {"code": "A" * 33},
        {"code": "A" * 100_000},
        {"code": 12345},
        {"code": None},
        {"code": ["WELCOME"]},
        {"code": "WEL COME"},
        {"code": "WELCOME", "extra": 1},
        {"code": "WELCOME", "idempotency_key": ""},
        {},
        [],
        "WELCOME",
    ],
)
async def test_bad_coupon_input_is_400_and_writes_nothing(client, admin, services, body):
    headers, _ = await sign_up(client, "+9779811000006")
    await create_coupon(client, admin, code="WELCOME")
    response = await client.post("/api/promotions/apply-coupon", json=body, headers=headers)
    assert response.status_code in (400, 413), response.text
    assert response.json()["error"] == "validation_failed" or response.status_code == 413
    await _nothing_written(services, client, headers)


async def test_coupon_endpoints_need_a_token(client):
    assert (await client.post("/api/promotions/apply-coupon", json={"code": "X"})).status_code == 401
    assert (await client.get("/api/promotions/my-coupons")).status_code == 401
    assert (await client.get("/api/referral/my-code")).status_code == 401


async def _nothing_written(services, client, headers) -> None:
    assert await count(services, CouponUsage) == 0
    async with services.readonly() as session:
        assert set((await session.execute(select(Coupon.uses))).scalars()) <= {0, 1}
        assert await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.name == "AwardPoints")) == 0
    assert await points_of(client, headers) == 0


# --- referrals --------------------------------------------------------------------------------


async def test_referral_claim_credits_both_once(client, services):
    referrer_headers, referrer = await sign_up(client, "+9779812000001")
    headers, referee = await sign_up(client, "+9779812000002")
    mine = (await client.get("/api/referral/my-code", headers=referrer_headers)).json()
    assert mine["code"] == referrer["referral_code"] and mine["referred_count"] == 0
    check = (await client.get("/api/referral/validate", params={"code": mine["code"].lower()}, headers=headers)).json()
    assert (check["exists"], check["claimable"], check["reason"]) == (True, True, None)
    claimed = await client.post("/api/referral/claim", json={"code": mine["code"].lower()}, headers=headers)
    assert claimed.status_code == 201, claimed.text
    body = claimed.json()
    assert (body["points"], body["referrer_points"], body["points_credited"]) == (50, 100, True)
    await _settle(services)
    assert await points_of(client, headers) == 50
    assert await points_of(client, referrer_headers) == 100
    mine = (await client.get("/api/referral/my-code", headers=referrer_headers)).json()
    assert (mine["referred_count"], mine["points_earned"]) == (1, 100)
    # Claiming again (a retry, or another code) is refused and credits nothing more.
    again = await client.post("/api/referral/claim", json={"code": mine["code"]}, headers=headers)
    assert again.status_code == 409 and again.json()["error"] == "referral_already_claimed"
    check = (await client.get("/api/referral/validate", params={"code": mine["code"]}, headers=headers)).json()
    assert (check["claimable"], check["reason"]) == (False, "referral_already_claimed")
    # Redelivering the award commands, under their own ids or re-derived ones, credits nothing.
    async with services.readonly() as session:
        row = (await session.execute(select(Referral))).scalar_one()
    for award in promotions.referral_awards(row):
        first = await services.runtime.call(award.kind, award.entity_id, award.name, award.payload, command_id=award.command_id)
        rederived = await services.runtime.call(award.kind, award.entity_id, award.name, award.payload, command_id=f"retry:{uuid.uuid4()}")
        assert first["ok"] and rederived["ok"]
    assert await points_of(client, headers) == 50
    assert await points_of(client, referrer_headers) == 100
    assert await count(services, LedgerTransfer, LedgerTransfer.kind.like("referral_%")) == 2
    async with services.readonly() as session:
        assert await ledger_discrepancies(session) == []
    assert referee["id"] != referrer["id"]


async def test_referral_refusals(client, services):
    a_headers, a = await sign_up(client, "+9779812000011")
    b_headers, b = await sign_up(client, "+9779812000012")
    own = await client.post("/api/referral/claim", json={"code": a["referral_code"]}, headers=a_headers)
    assert own.status_code == 422 and own.json()["error"] == "self_referral"
    unknown = await client.post("/api/referral/claim", json={"code": "ZZZZZZZZ"}, headers=a_headers)
    assert unknown.status_code == 404 and unknown.json()["error"] == "referral_code_not_found"
    for bad in ({"code": ""}, {"code": "A" * 17}, {"code": 5}, {"code": "AB-CD"}, {}, {"code": "ABCD", "x": 1}):
        response = await client.post("/api/referral/claim", json=bad, headers=a_headers)
        assert response.status_code == 400 and response.json()["error"] == "validation_failed", bad
    assert (await client.get("/api/referral/validate", params={"code": ""}, headers=a_headers)).status_code == 400
    assert (await client.get("/api/referral/validate", params={"code": "A" * 40}, headers=a_headers)).status_code == 400
    assert (await client.get("/api/referral/validate", headers=a_headers)).status_code == 400
    assert await count(services, Referral) == 0
    # b claims a's code; a may not then claim b's (a pair farming each other).
    assert (await client.post("/api/referral/claim", json={"code": a["referral_code"]}, headers=b_headers)).status_code == 201
    cycle = await client.post("/api/referral/claim", json={"code": b["referral_code"]}, headers=a_headers)
    assert cycle.status_code == 409 and cycle.json()["error"] == "referral_cycle"
    # Past the window after sign-up.
    c_headers, c = await sign_up(client, "+9779812000013")
    async with services.sessions.begin() as session:
        await session.execute(update(User).where(User.id == uuid.UUID(c["id"])).values(created_at=datetime.now(timezone.utc) - timedelta(days=8)))
    late = await client.post("/api/referral/claim", json={"code": a["referral_code"]}, headers=c_headers)
    assert late.status_code == 409 and late.json()["error"] == "referral_window_closed"
    assert await count(services, Referral) == 1


async def test_referral_rewards_follow_app_config(client, services):
    async with services.sessions.begin() as session:
        session.add(AppConfig(key="referral_rewards", value={"referrer_points": 5, "referee_points": 0, "claim_window_days": 1}))
    _, a = await sign_up(client, "+9779812000021")
    b_headers, _ = await sign_up(client, "+9779812000022")
    claimed = await client.post("/api/referral/claim", json={"code": a["referral_code"]}, headers=b_headers)
    assert claimed.status_code == 201
    assert (claimed.json()["points"], claimed.json()["points_credited"], claimed.json()["referrer_points"]) == (0, False, 5)
    await _settle(services)
    assert await count(services, LedgerTransfer, LedgerTransfer.kind == "referral_referrer") == 1
    assert await count(services, LedgerTransfer, LedgerTransfer.kind == "referral_referee") == 0


async def test_concurrent_double_claim_credits_once(client, services):
    _, a = await sign_up(client, "+9779812000031")
    _, b = await sign_up(client, "+9779812000032")
    headers, _ = await sign_up(client, "+9779812000033")
    responses = await asyncio.gather(*[
        client.post("/api/referral/claim", json={"code": code}, headers=headers)
        for code in (a["referral_code"], b["referral_code"], a["referral_code"])
    ])
    assert sorted(r.status_code for r in responses) == [201, 409, 409]
    await _settle(services)
    assert await count(services, Referral) == 1
    assert await points_of(client, headers) == 50


async def _settle(services, timeout_s: float = 20.0) -> None:
    """Wait until every accepted command is applied. The loop dispatcher drains in the
    background; like the scheduler in production, re-ring mailboxes whose commands wait (the
    runtime can drop a doorbell that arrives while a contended drain is finishing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if not await count(services, ActorCommand, ActorCommand.status == "pending"):
            return
        await services.runtime.ring_stalled(older_than_s=0.5)
        await asyncio.sleep(0.1)
    raise AssertionError("commands still pending")


# --- the acceptance test: max N uses, 5N appliers at once -------------------------------------

LIMIT_N = 10


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_services(request, tmp_path):
    if request.param == "sqlite":
        async with running_services(settings_for_tests(tmp_path)) as services:
            yield services
        return
    from powerbank.storage.testing import create_postgres_database, drop_postgres_database

    name, url = await create_postgres_database()
    try:
        async with running_services(settings_for_tests(tmp_path, database_url=url)) as services:
            yield services
    finally:
        await drop_postgres_database(name)


@pytest.mark.parametrize("early_check", [True, False], ids=["early-check", "database-only"])
async def test_coupon_with_n_uses_applied_by_5n_people_at_once(any_services, monkeypatch, early_check):
    """`database-only` switches off the early exhaustion check, so only the conditional UPDATE
    stands between 5N appliers and the limit."""
    services = any_services
    if not early_check:
        decide = promotions.coupon_refusal
        monkeypatch.setattr(promotions, "coupon_refusal", lambda facts, now, uses: decide(replace(facts, max_uses=None), now, uses))
    app = create_app(services, auth_policy=POLICY)
    people = await _people_with_wallets(services, 5 * LIMIT_N)
    async with services.sessions.begin() as session:
        session.add(Coupon(code="RUSH", kind="points", value=25, max_uses=LIMIT_N, uses=0, per_user_limit=1, active=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
        responses = await asyncio.gather(*[
            client.post("/api/promotions/apply-coupon", json={"code": "rush"}, headers=headers) for headers in people.values()
        ])
    winners = [r for r in responses if r.status_code == 200]
    losers = [r for r in responses if r.status_code != 200]
    assert len(winners) == LIMIT_N, [r.text for r in responses[:3]]
    assert {(r.status_code, r.json()["error"]) for r in losers} == {(409, "coupon_exhausted")}
    await _settle(services)
    async with services.readonly() as session:
        assert await session.scalar(select(Coupon.uses).where(Coupon.code == "RUSH")) == LIMIT_N
        assert await session.scalar(select(func.count()).select_from(CouponUsage)) == LIMIT_N
        credited = (await session.execute(
            select(LedgerAccount.credits_posted).join(Wallet, Wallet.points_account_id == LedgerAccount.id)
        )).scalars().all()
        assert sorted(credited, reverse=True)[: LIMIT_N + 1] == [25] * LIMIT_N + [0]
        assert await ledger_discrepancies(session) == []


async def _people_with_wallets(services, how_many: int) -> dict[uuid.UUID, dict[str, str]]:
    async with services.sessions.begin() as session:
        users = [User(phone=f"+97798{n:08d}", referral_code=f"RUSH{n:04d}") for n in range(how_many)]
        session.add_all(users)
    await asyncio.gather(*[
        services.runtime.call("wallet", str(user.id), "OpenWallet", {"currency": "NPR"}, command_id=f"open:{user.id}")
        for user in users
    ])
    return {
        user.id: {"Authorization": f"Bearer {create_access_token(services.settings, user.id, 'user')}"} for user in users
    }


def test_award_envelope_names_its_command_after_the_transfer():
    transfer = uuid.uuid4()
    envelope = award_envelope(uuid.uuid4(), 5, transfer, "coupon_points", "x")
    assert envelope.command_id == f"award:{transfer}" and envelope.name == "AwardPoints"


async def test_the_use_limit_is_a_check_constraint_too(any_services):
    services = any_services
    async with services.sessions.begin() as session:
        session.add(Coupon(code="CAPPED", kind="points", value=1, max_uses=2, uses=2, per_user_limit=1, active=True))
    with pytest.raises(IntegrityError):
        async with services.sessions.begin() as session:
            await session.execute(update(Coupon).where(Coupon.code == "CAPPED").values(uses=Coupon.uses + 1))


def test_award_refusal_of_malformed_payloads():
    good = {"points": 5, "kind": "coupon_points", "transfer_id": str(uuid.uuid4())}
    assert award_refusal(good) is None
    assert award_refusal({**good, "points": 0}) == "invalid_points"
    assert award_refusal({**good, "points": True}) == "invalid_points"
    assert award_refusal({**good, "points": 1.5}) == "invalid_points"
    assert award_refusal({**good, "kind": "gift"}) == "invalid_reward_kind"
    assert award_refusal({**good, "transfer_id": "nope"}) == "invalid_transfer_id"


async def test_a_claim_committed_but_never_awaited_still_credits_once(client, services):
    """The request died after its transaction committed (no ring, no wait): the awards are in
    the mailboxes; the person's retry is refused and the points arrive once."""
    referrer_headers, a = await sign_up(client, "+9779812000041")
    headers, b = await sign_up(client, "+9779812000042")
    async with services.sessions.begin() as session:
        await promotions.claim_referral(session, referee_id=uuid.UUID(b["id"]), code=a["referral_code"], now=datetime.now(timezone.utc))
    retry = await client.post("/api/referral/claim", json={"code": a["referral_code"]}, headers=headers)
    assert retry.status_code == 409 and retry.json()["error"] == "referral_already_claimed"
    for user in (a, b):
        services.runtime.ring("wallet", user["id"])  # what the scheduler's stalled-mailbox sweep does
    await _settle(services)
    assert (await points_of(client, headers), await points_of(client, referrer_headers)) == (50, 100)


async def test_discount_coupon_is_recorded_without_points(client, admin, services):
    headers, _ = await sign_up(client, "+9779811000007")
    await create_coupon(client, admin, code="TENOFF", kind="discount_minor", value=1000, currency="NPR")
    applied = await client.post("/api/promotions/apply-coupon", json={"code": "tenoff"}, headers=headers)
    assert applied.status_code == 200, applied.text
    assert (applied.json()["points"], applied.json()["points_credited"], applied.json()["currency"]) == (0, False, "NPR")
    listed = (await client.get("/api/promotions/my-coupons", headers=headers)).json()["items"]
    assert [(item["code"], item["kind"], item["value"]) for item in listed] == [("TENOFF", "discount_minor", 1000)]
    assert await count(services, ActorCommand, ActorCommand.name == "AwardPoints") == 0


async def test_accounts_without_a_wallet_get_no_points_promotion(client, admin, services):
    """An operator's account (no wallet, none opening) cannot take a points coupon or a referral
    whose award would be refused after the use was taken."""
    await create_coupon(client, admin, code="PTS")
    response = await client.post("/api/promotions/apply-coupon", json={"code": "PTS"}, headers=admin)
    assert response.status_code == 409 and response.json()["error"] == "wallet_not_found"
    headers, _ = await sign_up(client, "+9779811000008")
    async with services.readonly() as session:
        admin_code = await session.scalar(select(User.referral_code).where(User.phone == "+9779800000009"))
    check = (await client.get("/api/referral/validate", params={"code": admin_code}, headers=headers)).json()
    assert (check["exists"], check["claimable"], check["reason"]) == (False, False, "referral_code_not_found")
    claim = await client.post("/api/referral/claim", json={"code": admin_code}, headers=headers)
    assert claim.status_code == 404 and claim.json()["error"] == "referral_code_not_found"
    assert await count(services, CouponUsage) == 0 and await count(services, Referral) == 0
