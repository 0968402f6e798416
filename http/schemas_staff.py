"""Request and response bodies of the admin and operator endpoints (same conventions as
schemas.py: requests forbid unknown fields)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from powerbank.http.schemas import Request, Response, WalletView

Role = Literal["user", "operator", "admin", "superadmin"]
Slug = Annotated[str, Meta(min_length=2, max_length=160, pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", description="lowercase words joined by hyphens, e.g. acme-power")]
StatusReason = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_\-]+$")]


class TenantCreate(Request):
    name: Annotated[str, Meta(min_length=1, max_length=150)]
    slug: Slug
    email: Annotated[str, Meta(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    url: Annotated[str, Meta(max_length=200, pattern=r"^https?://")] | None = None
    description: Annotated[str, Meta(max_length=2000)] | None = None


class TenantView(Response):
    id: uuid.UUID
    name: str
    slug: str
    email: str | None
    url: str | None
    description: str | None
    is_active: bool
    stations: int
    staff: int
    created_at: datetime


class TenantPage(Response):
    items: list[TenantView]
    page: int
    page_size: int
    total: int


class StationTenantChange(Request):
    # None hands the station back to the platform.
    tenant_id: uuid.UUID | None


class RoleChange(Request):
    role: Role
    # Required for `operator`, refused for every other role.
    tenant_id: uuid.UUID | None = None


class UserRoleView(Response):
    user_id: uuid.UUID
    role: str
    tenant_id: uuid.UUID | None


class IssueStatusChange(Request):
    status: Literal["open", "acknowledged", "resolved", "dismissed"]


class MaintenanceChange(Request):
    maintenance: bool
    reason: StatusReason | None = None


class StaffStationView(Response):
    id: uuid.UUID
    serial: str
    name: str
    status: str
    tenant_id: uuid.UUID | None
    slot_count: int
    firmware_version: str | None
    last_seen_at: datetime | None


class StaffStationPage(Response):
    items: list[StaffStationView]
    page: int
    page_size: int
    total: int


class AdminActionView(Response):
    id: int
    actor_id: uuid.UUID | None
    actor_role: str
    tenant_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    details: dict[str, Any]
    created_at: datetime


class AdminActionPage(Response):
    items: list[AdminActionView]
    page: int
    page_size: int
    total: int


class AdminUserView(Response):
    id: uuid.UUID
    phone: str | None
    full_name: str | None
    role: str
    status: str
    tenant_id: uuid.UUID | None
    created_at: datetime
    last_login_at: datetime | None


class AdminUserPage(Response):
    items: list[AdminUserView]
    page: int
    page_size: int
    total: int


class AdminUserDetail(Response):
    user: AdminUserView
    wallet: WalletView
    rentals_total: int
    rentals_open: int
    due_minor: int


class StatusChange(Request):
    status: Literal["active", "blocked"]
    reason: Annotated[str, Meta(min_length=1, max_length=200)]
