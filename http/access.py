"""Who on the staff may do what, as plain decisions (no I/O), and the guard that admits staff.

Roles, from most to least power: superadmin, admin (every tenant), operator (the stations of
one tenant), user (a rider; no staff access). A staff member's tenant is read from the users
table on every request, like the role, so moving someone to another operator or demoting them
takes effect at once.

Out of scope answers are 404, never 403: an operator probing another operator's station ids
learns nothing about which exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from powerbank.http.auth import ADMIN_ROLES, AuthUser
from powerbank.http.errors import ApiError
from powerbank.storage.models import USER_ROLES

STAFF_ROLES = frozenset({"operator"}) | ADMIN_ROLES
# What each role may hand out (and take away): an admin manages riders and operators; only a
# superadmin makes or unmakes admins.
GRANTABLE_ROLES = {
    "superadmin": frozenset(USER_ROLES),
    "admin": frozenset({"user", "operator"}),
}


@dataclass(frozen=True)
class StaffScope:
    """The part of the network a staff member sees: everything, or one tenant's stations."""

    role: str
    tenant_id: uuid.UUID | None

    @property
    def sees_every_tenant(self) -> bool:
        return self.role in ADMIN_ROLES

    def covers(self, tenant_id: uuid.UUID | None) -> bool:
        """An operator without a tenant covers nothing; a platform-run station (no tenant)
        is for admins only."""
        return self.sees_every_tenant or (self.tenant_id is not None and tenant_id == self.tenant_id)


def scope_of(user: AuthUser) -> StaffScope:
    return StaffScope(role=user.role, tenant_id=user.tenant_id)


def is_staff(user: object) -> bool:
    """Both the stored role and the token's claim must be staff, as for admins."""
    return isinstance(user, AuthUser) and user.role in STAFF_ROLES and user.claims.role in STAFF_ROLES


def require_staff(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: operator, admin or superadmin."""
    if not is_staff(connection.scope.get("user")):
        raise ApiError(403, "forbidden", "staff role required")


def role_change_refusal(
    actor_role: str, actor_id: uuid.UUID, target_id: uuid.UUID, current_role: str, new_role: str,
    tenant_id: uuid.UUID | None,
) -> str | None:
    """Why this role change may not happen, or None. An operator belongs to exactly one tenant
    and nobody else belongs to any; nobody changes their own role (a lone superadmin cannot
    lock the platform out by accident)."""
    grantable = GRANTABLE_ROLES.get(actor_role, frozenset())
    if actor_id == target_id:
        return "cannot_change_own_role"
    if new_role not in grantable or current_role not in grantable:
        return "role_not_grantable"
    if new_role == "operator" and tenant_id is None:
        return "tenant_required"
    if new_role != "operator" and tenant_id is not None:
        return "tenant_only_for_operators"
    return None


def status_change_refusal(actor_role: str, actor_id: uuid.UUID, target_id: uuid.UUID, target_role: str) -> str | None:
    """Why this person may not be blocked or unblocked by this actor, or None: the same reach
    as for roles (an admin blocks riders and operators, a superadmin anyone but themselves)."""
    if actor_id == target_id:
        return "cannot_change_own_status"
    if target_role not in GRANTABLE_ROLES.get(actor_role, frozenset()):
        return "role_not_grantable"
    return None
