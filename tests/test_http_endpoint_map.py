"""The endpoint map of the brief (seed 002) is the contract with the mobile app: every method and
path in it is in the OpenAPI document (path parameters may be named differently), documented with
its request body, its success response and its error responses."""

from __future__ import annotations

import functools
import re

import pytest

from powerbank.http.app import openapi_document

# Copied from the map (seed 002), path parameters as the map writes them; the map lists
# POST /api/rentals/start twice, it is here once.
ENDPOINT_MAP = [
    ("GET", "/api/app/version"),
    ("GET", "/api/app/health"),
    ("POST", "/api/app/upload"),
    ("GET", "/api/app/banners"),
    ("GET", "/api/app/countries"),
    ("GET", "/api/app/stations"),
    ("GET", "/api/app/stations/<SN>"),
    ("GET", "/api/app/stations/nearby"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/logout"),
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/get-otp"),
    ("POST", "/api/auth/verify-otp"),
    ("POST", "/api/auth/device"),
    ("PUT", "/api/auth/device"),
    ("GET", "/api/auth/me"),
    ("GET", "/api/user/profile"),
    ("PUT", "/api/user/profile"),
    ("PATCH", "/api/user/profile"),
    ("DELETE", "/api/auth/account"),
    ("POST", "/api/auth/kyc"),
    ("PATCH", "/api/auth/kyc"),
    ("GET", "/api/auth/kyc-status"),
    ("POST", "/api/auth/refresh"),
    ("GET", "/api/user/wallet"),
    ("GET", "/api/user/analytics/usage-stats"),
    ("POST", "/api/stations/{sn}/favorite"),
    ("GET", "/api/stations/favorites"),
    ("DELETE", "/api/stations/{sn}/favorite"),
    ("POST", "/api/stations/{sn}/report-issue"),
    ("GET", "/api/stations/my-reports"),
    ("GET", "/api/stations/{sn}/issues"),
    ("GET", "/api/user/notifications"),
    ("POST", "/api/user/notification/<id>"),
    ("POST", "/api/user/notifications/mark-all-read"),
    ("DELETE", "/api/user/notification/<id>"),
    ("GET", "/api/user/transactions"),
    ("GET", "/api/payment/packages"),
    ("GET", "/api/payment/methods"),
    ("POST", "/api/payment/wallet/topup-intent"),
    ("POST", "/api/payment/verify-topup"),
    ("POST", "/api/payment/calculate-options"),
    ("POST", "/api/rentals/{id}/pay-due"),
    ("GET", "/api/payment/status/{intent_id}"),
    ("POST", "/api/payment/cancel/{intent_id}"),
    ("POST", "/api/rentals/start"),
    ("POST", "/api/payment/refund/{transaction_id}"),
    ("GET", "/api/payment/refunds"),
    ("POST", "/api/payment/webhook/*"),
    ("GET", "/api/points/history"),
    ("GET", "/api/referral/my-code"),
    ("GET", "/api/referral/validate"),
    ("POST", "/api/referral/claim"),
    ("GET", "/api/points/summary"),
    ("POST", "/api/rentals/{id}/cancel"),
    ("POST", "/api/rentals/{id}/extend"),
    ("POST", "/api/rentals/{id}/location"),
    ("POST", "/api/rentals/{id}/report-issue"),
    ("GET", "/api/rentals/active"),
    ("GET", "/api/rentals/history"),
    ("GET", "/api/users/leaderboard"),
    ("GET", "/api/users/achievements"),
    ("POST", "/api/promotions/apply-coupon"),
    ("GET", "/api/promotions/my-coupons"),
    ("GET", "/api/content/terms-of-service"),
    ("GET", "/api/content/privacy-policy"),
    ("GET", "/api/content/about"),
    ("GET", "/api/content/contact"),
    ("GET", "/api/content/faq"),
    ("GET", "/api/content/app-updates"),
]


def shape(path: str) -> str:
    """A path with every parameter, however it is written (`{id}`, `<SN>`, `*`), as `{}`."""
    return re.sub(r"\{[^}]+\}|<[^>]+>|\*", "{}", path)


@functools.cache
def operations() -> dict[tuple[str, str], dict]:
    document = openapi_document()
    return {
        (method.upper(), shape(path)): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    }


def test_the_map_has_no_repeats():
    assert len({(m, shape(p)) for m, p in ENDPOINT_MAP}) == len(ENDPOINT_MAP) == 70


def test_every_endpoint_of_the_map_is_served():
    served = operations()
    assert [f"{m} {p}" for m, p in ENDPOINT_MAP if (m, shape(p)) not in served] == []


@pytest.mark.parametrize(("method", "path"), ENDPOINT_MAP, ids=[f"{m} {p}" for m, p in ENDPOINT_MAP])
def test_each_is_documented_with_its_request_response_and_errors(method, path):
    operation = operations()[(method, shape(path))]
    responses = operation["responses"]
    success = [code for code in responses if code.startswith("2")]
    # A read with no input can only fail on the server side (500 `internal_error`).
    errors = [code for code in responses if code[0] in "45"]
    assert success and errors, f"{method} {path}: responses {sorted(responses)}"
    for code in success:
        if code != "204":
            assert "content" in responses[code], f"{method} {path}: {code} has no body schema"
    for code in errors:
        assert responses[code]["content"]["application/json"]["schema"], f"{method} {path}: {code} has no error schema"
    if method in ("POST", "PUT", "PATCH") and "requestBody" in operation:
        body = operation["requestBody"]["content"]
        assert all(media.get("schema") for media in body.values()), f"{method} {path}: request body without a schema"
