"""The signed-in person's own records: devices, profile, KYC, usage statistics and account
deletion.

None of it goes through an actor: these rows belong to one person, are written only by that
person's requests, and nothing that moves money or banks reads them to decide. Each change is one
transaction that also writes its UserAuditLog row.

Account deletion erases or anonymises everything that describes the person (phone, name, email,
KYC documents and their files, devices, favourites, notifications, rental GPS fixes, sign-in codes
and the SMS log's copy of the phone; issue reports lose their reporter) and keeps
what money and the fleet need: the user row (status `deleted`, phone null) that rentals, ledger
accounts and transactions point at, and the audit rows with their actor set null.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from sqlalchemy import Integer, case, delete as sql_delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY, AuthUser
from powerbank.http.deps import client_ip, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_media import media_store_of
from powerbank.http.schemas_app import (
    AccountDeleted,
    DeviceRequest,
    DeviceView,
    KycPatch,
    KycStatusView,
    KycSubmit,
    ProfilePatch,
    ProfilePut,
    ProfileView,
    UsageStats,
)
from powerbank.storage.models import (
    LedgerTransfer,
    MediaUpload,
    Notification,
    OtpChallenge,
    Rental,
    RentalLocation,
    SmsFcmLog,
    StationIssue,
    User,
    UserDevice,
    UserKyc,
    UserProfile,
    UserStationFavorite,
    Wallet,
)
from powerbank.storage.types import utcnow
from powerbank.storage.user_audit import detach_actor, record_user_action

OPEN_RENTAL_STATUSES = ("pending", "ejecting", "active", "overdue")
# A rejected check may be corrected and sent again; pending and approved ones are settled.
KYC_EDITABLE = ("pending", "rejected")
ERASED = "[erased]"


# --- pure decisions ---------------------------------------------------------------------------


def kyc_submit_refusal(current_status: str | None) -> ApiError | None:
    """A first submission, or a new one after a rejection; not while one waits or after approval."""
    if current_status == "pending":
        return ApiError(409, "kyc_pending", "your documents are being reviewed; change them with PATCH")
    if current_status == "approved":
        return ApiError(409, "kyc_already_approved", "your identity is already verified")
    return None


def kyc_patch_refusal(current_status: str | None) -> ApiError | None:
    if current_status is None:
        return ApiError(404, "kyc_not_found", "submit your documents first")
    if current_status not in KYC_EDITABLE:
        return ApiError(409, "kyc_already_approved", "an approved verification cannot be changed")
    return None


def deletion_refusal(open_rentals: int, dues_minor: int) -> ApiError | None:
    """An account with a bank out or money owed stays until that is settled: deleting it would
    leave a bank nobody answers for."""
    if open_rentals:
        return ApiError(409, "open_rentals", "return your power bank before deleting the account")
    if dues_minor:
        return ApiError(409, "unpaid_dues", "pay what you owe before deleting the account", due_minor=dues_minor)
    return None


def last4(value: str | None) -> str | None:
    return None if value is None else value[-4:]


def changed_fields(patch_data: msgspec.Struct) -> dict[str, Any]:
    return {f: v for f in patch_data.__struct_fields__ if (v := getattr(patch_data, f)) is not msgspec.UNSET}


# --- views ------------------------------------------------------------------------------------


def device_view(device: UserDevice) -> DeviceView:
    return DeviceView(
        id=device.id, device_id=device.device_id, platform=device.platform, push_token_set=device.push_token is not None,
        app_version=device.app_version, last_seen_at=device.last_seen_at, created_at=device.created_at,
    )


def kyc_view(kyc: UserKyc | None) -> KycStatusView:
    if kyc is None:
        return KycStatusView(
            status="not_submitted", document_type=None, document_number_last4=None, submitted_at=None,
            reviewed_at=None, rejection_reason=None,
        )
    return KycStatusView(
        status=kyc.status, document_type=kyc.document_type, document_number_last4=last4(kyc.document_number),
        submitted_at=kyc.submitted_at, reviewed_at=kyc.reviewed_at, rejection_reason=kyc.rejection_reason,
    )


async def profile_view(session: AsyncSession, user_id: uuid.UUID) -> ProfileView:
    user = await session.get(User, user_id)
    profile = await session.get(UserProfile, user_id)
    kyc_status = await session.scalar(select(UserKyc.status).where(UserKyc.user_id == user_id))
    return ProfileView(
        user_id=user.id, phone=user.phone, full_name=profile.full_name if profile else None,
        email=profile.email if profile else None, avatar_media_id=profile.avatar_media_id if profile else None,
        kyc_status=kyc_status or "not_submitted", created_at=user.created_at,
    )


# --- storage steps ----------------------------------------------------------------------------


async def own_media(session: AsyncSession, user_id: uuid.UUID, media_id: uuid.UUID | None, purpose: str) -> None:
    """A referenced upload must be the caller's and uploaded for this purpose (404 otherwise, so
    another person's upload ids reveal nothing)."""
    if media_id is None:
        return
    found = await session.scalar(
        select(func.count()).select_from(MediaUpload).where(
            MediaUpload.id == media_id, MediaUpload.user_id == user_id, MediaUpload.purpose == purpose
        )
    )
    if not found:
        raise ApiError(404, "media_not_found", f"no {purpose} upload {media_id}")


async def profile_row(session: AsyncSession, user_id: uuid.UUID) -> UserProfile:
    profile = await session.get(UserProfile, user_id)
    if profile is None:
        profile = UserProfile(user_id=user_id)
        session.add(profile)
    return profile


async def apply_profile(state: State, request: Request, values: dict[str, Any]) -> ProfileView:
    user_id = request.user.id
    async with services_of(state).sessions.begin() as session:
        if "avatar_media_id" in values:
            await own_media(session, user_id, values["avatar_media_id"], "avatar")
        profile = await profile_row(session, user_id)
        for field, value in values.items():
            setattr(profile, field, value)
        profile.updated_at = utcnow()
        record_user_action(
            session, user_id, "profile_updated", target_type="user", target_id=user_id,
            ip=client_ip(request), details={"fields": sorted(values)},
        )
        await session.flush()
        return await profile_view(session, user_id)


def concurrent_change() -> ApiError:
    """Two requests of one person created the same row at once (a unique key refused the second)."""
    return ApiError(409, "concurrent_update", "the same change was being made at the same moment; try again")


async def upsert_device(state: State, request: Request, data: DeviceRequest, *, must_exist: bool) -> tuple[DeviceView, bool]:
    try:
        return await _upsert_device(state, request, data, must_exist=must_exist)
    except IntegrityError as exc:
        raise concurrent_change() from exc


async def _upsert_device(state: State, request: Request, data: DeviceRequest, *, must_exist: bool) -> tuple[DeviceView, bool]:
    user_id = request.user.id
    now = utcnow()
    async with services_of(state).sessions.begin() as session:
        device = (
            await session.execute(
                select(UserDevice).where(UserDevice.user_id == user_id, UserDevice.device_id == data.device_id)
            )
        ).scalar_one_or_none()
        created = device is None
        if created:
            if must_exist:
                raise ApiError(404, "device_not_found", f"no device {data.device_id!r}; register it with POST")
            device = UserDevice(user_id=user_id, device_id=data.device_id, created_at=now)
            session.add(device)
        device.platform = data.platform
        device.push_token = data.push_token
        device.app_version = data.app_version
        device.last_seen_at = now
        record_user_action(
            session, user_id, "device_registered" if created else "device_updated", target_type="device",
            target_id=data.device_id, ip=client_ip(request), details={"platform": data.platform},
        )
        await session.flush()
        return device_view(device), created


async def submit_kyc(state: State, request: Request, values: dict[str, Any], *, patching: bool) -> KycStatusView:
    try:
        return await _submit_kyc(state, request, values, patching=patching)
    except IntegrityError as exc:
        raise concurrent_change() from exc


async def _submit_kyc(state: State, request: Request, values: dict[str, Any], *, patching: bool) -> KycStatusView:
    user_id = request.user.id
    now = utcnow()
    async with services_of(state).sessions.begin() as session:
        kyc = (await session.execute(select(UserKyc).where(UserKyc.user_id == user_id))).scalar_one_or_none()
        current = kyc.status if kyc else None
        refusal = kyc_patch_refusal(current) if patching else kyc_submit_refusal(current)
        if refusal is not None:
            raise refusal
        for field in ("document_front_id", "document_back_id", "selfie_id"):
            await own_media(session, user_id, values.get(field), "kyc")
        if kyc is None:
            kyc = UserKyc(user_id=user_id)
            session.add(kyc)
        for field, value in values.items():
            setattr(kyc, field, value)
        kyc.status, kyc.rejection_reason, kyc.reviewed_at, kyc.reviewed_by = "pending", None, None, None
        kyc.submitted_at = now
        record_user_action(
            session, user_id, "kyc_updated" if patching else "kyc_submitted", target_type="kyc",
            ip=client_ip(request), details={"fields": sorted(values)},
        )
        await session.flush()
        return kyc_view(kyc)


async def usage_stats(session: AsyncSession, user_id: uuid.UUID) -> UsageStats:
    minutes = func.coalesce(
        func.sum(case((Rental.returned_at.is_not(None), minutes_between(session, Rental.started_at, Rental.returned_at)), else_=0)), 0
    )
    row = (
        await session.execute(
            select(
                func.count(),
                func.sum(case((Rental.status == "completed", 1), else_=0)),
                func.sum(case((Rental.status == "cancelled", 1), else_=0)),
                func.sum(case((Rental.status.in_(OPEN_RENTAL_STATUSES), 1), else_=0)),
                minutes,
                func.sum(case((Rental.quick_return.is_(True), 1), else_=0)),
                func.count(func.distinct(Rental.station_id)),
                func.coalesce(func.sum(Rental.charged_minor), 0),
                func.coalesce(func.sum(Rental.due_minor), 0),
                func.min(Rental.created_at),
                func.max(Rental.created_at),
            ).where(Rental.user_id == user_id)
        )
    ).one()
    wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one_or_none()
    money = await _posted_flows(session, wallet.account_id) if wallet else (0, 0)
    points = await _posted_flows(session, wallet.points_account_id) if wallet else (0, 0)
    total, completed, cancelled, open_, minutes_total, quick, stations, charged, due, first, last = row
    return UsageStats(
        rentals_total=total or 0, rentals_completed=int(completed or 0), rentals_cancelled=int(cancelled or 0),
        rentals_open=int(open_ or 0), minutes_rented_total=int(minutes_total or 0), quick_returns=int(quick or 0),
        stations_used=stations or 0, currency=wallet.currency if wallet else None, charged_minor_total=int(charged),
        due_minor_total=int(due), wallet_debits_minor=money[0], wallet_credits_minor=money[1],
        points_earned=points[1], points_spent=points[0], first_rental_at=_aware(first), last_rental_at=_aware(last),
    )


def minutes_between(session: AsyncSession, start, end):
    """Whole minutes (rounded: julianday arithmetic is a float) between two timestamp columns,
    in either dialect."""
    if session.bind.dialect.name == "sqlite":
        return func.cast(func.round((func.julianday(end) - func.julianday(start)) * 1440), Integer)
    return func.cast(func.round(func.extract("epoch", end - start) / 60), Integer)


def _aware(value: datetime | str | None) -> datetime | None:
    """SQLite aggregates skip the column type's result processing."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


async def _posted_flows(session: AsyncSession, account_id: uuid.UUID) -> tuple[int, int]:
    """(debited, credited) in posted transfers of one account."""
    debited, credited = (
        await session.execute(
            select(
                func.coalesce(func.sum(case((LedgerTransfer.debit_account_id == account_id, LedgerTransfer.amount_minor), else_=0)), 0),
                func.coalesce(func.sum(case((LedgerTransfer.credit_account_id == account_id, LedgerTransfer.amount_minor), else_=0)), 0),
            ).where(
                LedgerTransfer.state == "posted",
                or_(LedgerTransfer.debit_account_id == account_id, LedgerTransfer.credit_account_id == account_id),
            )
        )
    ).one()
    return int(debited), int(credited)


async def erase_personal_data(session: AsyncSession, user: User, now: datetime) -> tuple[list[str], list[str]]:
    """Anonymise the person in this transaction; returns (what was erased, media keys to delete
    from the store once it commits)."""
    media_keys = list(
        (await session.execute(select(MediaUpload.storage_key).where(MediaUpload.user_id == user.id))).scalars()
    )
    phone = user.phone
    user.phone = None
    user.status = "deleted"
    user.updated_at = now
    rental_ids = select(Rental.id).where(Rental.user_id == user.id)
    # Order matters only for the foreign keys between these tables (KYC and profile point at uploads).
    for statement in (
        sql_delete(UserKyc).where(UserKyc.user_id == user.id),
        update(UserProfile).where(UserProfile.user_id == user.id).values(full_name=None, email=None, avatar_url=None, avatar_media_id=None),
        sql_delete(MediaUpload).where(MediaUpload.user_id == user.id),
        sql_delete(UserDevice).where(UserDevice.user_id == user.id),
        sql_delete(UserStationFavorite).where(UserStationFavorite.user_id == user.id),
        sql_delete(Notification).where(Notification.user_id == user.id),
        sql_delete(RentalLocation).where(RentalLocation.rental_id.in_(rental_ids)),
        update(StationIssue).where(StationIssue.user_id == user.id).values(user_id=None),
        # The phone lives on in sign-in codes and the SMS log too.
        sql_delete(OtpChallenge).where(OtpChallenge.phone == phone),
        update(SmsFcmLog)
        .where(or_(SmsFcmLog.user_id == user.id, SmsFcmLog.recipient == phone))
        .values(recipient=ERASED, body=ERASED, user_id=None),
    ):
        await session.execute(statement)
    await detach_actor(session, user.id)
    erased = [
        "phone", "profile", "kyc", "uploads", "devices", "favorites", "notifications", "rental_locations",
        "issue_reporter", "otp_codes", "message_log",
    ]
    return erased, media_keys


async def delete_account(state: State, request: Request) -> AccountDeleted:
    user_id = request.user.id
    now = utcnow()
    async with services_of(state).sessions.begin() as session:
        user = await session.get(User, user_id)
        open_rentals = await session.scalar(
            select(func.count()).select_from(Rental).where(Rental.user_id == user_id, Rental.status.in_(OPEN_RENTAL_STATUSES))
        )
        dues = await session.scalar(select(func.coalesce(func.sum(Rental.due_minor), 0)).where(Rental.user_id == user_id))
        refusal = deletion_refusal(open_rentals or 0, int(dues or 0))
        if refusal is not None:
            raise refusal
        erased, media_keys = await erase_personal_data(session, user, now)
        # Written after the detach, and without an actor: it must not point at the person either.
        record_user_action(session, None, "account_deleted", target_type="user", target_id=user_id, details={"erased": erased})
    store = media_store_of(state)
    for key in media_keys:
        await store.delete(key)
    return AccountDeleted(user_id=user_id, status="deleted", erased=erased)


# --- routes -----------------------------------------------------------------------------------


class DeviceController(Controller):
    path = "/api/auth"
    tags = ["auth"]
    security = BEARER_SECURITY

    @post("/device", status_code=201, responses={
        **error_responses(400, 401, 409),
        200: ResponseSpec(data_container=DeviceView, description="already registered: updated", generate_examples=False),
    })
    async def register_device(self, state: State, request: Request, data: JSONBody[DeviceRequest]) -> Response[DeviceView]:
        """Register this phone (or update it when already known: 200): platform, app version and
        the push token notifications are delivered to."""
        view, created = await upsert_device(state, request, data, must_exist=False)
        return Response(view, status_code=201 if created else 200)

    @put("/device", responses=error_responses(400, 401, 404, 409))
    async def update_device(self, state: State, request: Request, data: JSONBody[DeviceRequest]) -> DeviceView:
        """Update a registered device, e.g. a rotated push token (404 `device_not_found`)."""
        view, _ = await upsert_device(state, request, data, must_exist=True)
        return view

    @delete("/account", status_code=200, responses=error_responses(401, 409))
    async def delete_account(self, state: State, request: Request) -> AccountDeleted:
        """Delete the account: phone, name, email, KYC documents, uploads, devices, favourites,
        notifications and GPS fixes are erased; rentals, payments and the ledger stay (anonymous)
        and every token stops working. Refused while a bank is out (409 `open_rentals`) or money
        is owed (409 `unpaid_dues`)."""
        return await delete_account(state, request)

    @post("/kyc", status_code=201, responses=error_responses(400, 401, 404, 409))
    async def submit_kyc(self, state: State, request: Request, data: JSONBody[KycSubmit]) -> KycStatusView:
        """Submit identity documents for review (status `pending`). Document images are uploads
        with purpose `kyc`. 409 `kyc_pending` or `kyc_already_approved`."""
        return await submit_kyc(state, request, {f: getattr(data, f) for f in data.__struct_fields__}, patching=False)

    @patch("/kyc", responses=error_responses(400, 401, 404, 409))
    async def patch_kyc(self, state: State, request: Request, data: JSONBody[KycPatch]) -> KycStatusView:
        """Correct a pending or rejected submission; it goes (back) to `pending`."""
        return await submit_kyc(state, request, changed_fields(data), patching=True)

    @get("/kyc-status", responses=error_responses(401))
    async def kyc_status(self, state: State, request: Request) -> KycStatusView:
        """not_submitted, pending, approved or rejected (with the reason)."""
        async with services_of(state).readonly() as session:
            kyc = (await session.execute(select(UserKyc).where(UserKyc.user_id == request.user.id))).scalar_one_or_none()
            return kyc_view(kyc)


class ProfileController(Controller):
    path = "/api/user"
    tags = ["user"]
    security = BEARER_SECURITY

    @get("/profile", responses=error_responses(401))
    async def profile(self, state: State, request: Request) -> ProfileView:
        """The caller's profile with their KYC status."""
        async with services_of(state).readonly() as session:
            return await profile_view(session, request.user.id)

    @put("/profile", responses=error_responses(400, 401, 404))
    async def replace_profile(self, state: State, request: Request, data: JSONBody[ProfilePut]) -> ProfileView:
        """Replace the editable fields (an omitted one becomes empty). The avatar is an upload
        with purpose `avatar` (404 `media_not_found` otherwise)."""
        return await apply_profile(state, request, {f: getattr(data, f) for f in data.__struct_fields__})

    @patch("/profile", responses=error_responses(400, 401, 404))
    async def patch_profile(self, state: State, request: Request, data: JSONBody[ProfilePatch]) -> ProfileView:
        """Change only the fields sent."""
        return await apply_profile(state, request, changed_fields(data))

    @get("/analytics/usage-stats", responses=error_responses(401))
    async def usage_stats(self, state: State, request: Request) -> UsageStats:
        """The caller's totals: rentals by outcome, minutes rented, stations used, money charged
        and owed, wallet and points flows."""
        user: AuthUser = request.user
        async with services_of(state).readonly() as session:
            return await usage_stats(session, user.id)
