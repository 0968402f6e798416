"""Who on the staff may do what: the plain decisions of http/access.py."""

from __future__ import annotations

import uuid

import pytest

from powerbank.http.access import StaffScope, role_change_refusal

ME, SOMEONE, TENANT, OTHER_TENANT = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


@pytest.mark.parametrize("role", ["admin", "superadmin"])
def test_admins_cover_every_tenant_and_the_platform(role):
    scope = StaffScope(role=role, tenant_id=None)
    assert scope.covers(TENANT) and scope.covers(OTHER_TENANT) and scope.covers(None)


def test_an_operator_covers_only_their_own_tenant():
    scope = StaffScope(role="operator", tenant_id=TENANT)
    assert scope.covers(TENANT)
    assert not scope.covers(OTHER_TENANT)
    assert not scope.covers(None)  # platform-run stations are the admins'


def test_an_operator_without_a_tenant_covers_nothing():
    scope = StaffScope(role="operator", tenant_id=None)
    assert not scope.covers(None) and not scope.covers(TENANT)


@pytest.mark.parametrize(
    ("actor", "current", "new", "tenant", "refusal"),
    [
        ("admin", "user", "operator", TENANT, None),
        ("admin", "operator", "user", None, None),
        ("admin", "user", "admin", None, "role_not_grantable"),
        ("admin", "admin", "user", None, "role_not_grantable"),  # demoting a peer
        ("superadmin", "admin", "user", None, None),
        ("superadmin", "user", "superadmin", None, None),
        ("operator", "user", "operator", TENANT, "role_not_grantable"),
        ("user", "user", "operator", TENANT, "role_not_grantable"),
        ("admin", "user", "operator", None, "tenant_required"),
        ("admin", "operator", "user", TENANT, "tenant_only_for_operators"),
    ],
)
def test_role_changes(actor, current, new, tenant, refusal):
    assert role_change_refusal(actor, ME, SOMEONE, current, new, tenant) == refusal


def test_nobody_changes_their_own_role():
    assert role_change_refusal("superadmin", ME, ME, "superadmin", "user", None) == "cannot_change_own_role"


def test_status_changes_have_the_reach_of_role_changes():
    from powerbank.http.access import status_change_refusal

    assert status_change_refusal("admin", ME, SOMEONE, "user") is None
    assert status_change_refusal("admin", ME, SOMEONE, "operator") is None
    assert status_change_refusal("admin", ME, SOMEONE, "admin") == "role_not_grantable"
    assert status_change_refusal("superadmin", ME, SOMEONE, "admin") is None
    assert status_change_refusal("superadmin", ME, ME, "superadmin") == "cannot_change_own_status"
