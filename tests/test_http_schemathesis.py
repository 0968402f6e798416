"""The running app against its own OpenAPI document: schemathesis generates requests for every
operation (valid ones, and invalid ones that must be refused), authenticated as a rider or an
admin as the path needs, against a real uvicorn server on the embedded default. Every response
must be a documented status with a body matching its schema, and none may be a server error.

Each operation gets a fresh rider, so an operation that signs out or deletes the account cannot
starve the ones after it of a valid token."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from powerbank.http.app import create_app
from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.testing import TEST_AUTH_POLICY, bearer, running_services, serve, settings_for_tests
from powerbank.payment_gateway import StripeGateway
from powerbank.simulators.stripe_emulator import StripeEmulator
from powerbank.storage.models import User
from powerbank.storage.seed import ensure_defaults

pytestmark = pytest.mark.slow

EXAMPLES_PER_MODE = 25
MIN_REQUESTS = 2000


@dataclass
class Tally:
    requests: int = 0
    failures: list[str] = field(default_factory=list)


def fuzz_operation(operation, base_url: str, headers: dict[str, str], tally: Tally) -> None:
    """Valid requests must get a documented answer whose body matches the schema; invalid ones
    anything but a server error."""
    for mode, checks in (
        (GenerationMode.POSITIVE, [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]),
        (GenerationMode.NEGATIVE, [not_a_server_error]),
    ):
        @settings(
            max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck), phases=[Phase.generate],
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            tally.requests += 1
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (no parameters, or only a path enum)
            continue
        except (Exception, BaseExceptionGroup) as error:  # one failing operation must not hide the others
            tally.failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: {str(error)[:1500]}")


async def rider_headers(services) -> dict[str, str]:
    async with services.sessions.begin() as session:
        user = User(phone=f"+97798{secrets.randbelow(10**8):08d}", referral_code=secrets.token_hex(5).upper())
        session.add(user)
    return bearer(create_access_token(services.settings, user.id, "user"))


async def test_every_operation_answers_as_documented_and_never_with_a_server_error(tmp_path):
    """With payments configured (the real SDK against the local Stripe emulator), so the
    payment endpoints are exercised rather than answering 503 `payments_unavailable`."""
    load_all_checks()
    tally = Tally()
    async with StripeEmulator(seed=5) as emulator:
        settings_ = settings_for_tests(
            tmp_path, stripe_secret_key=emulator.api_key, stripe_webhook_secret="whsec_schemathesis", stripe_api_base=emulator.api_base,
        )
        async with running_services(settings_) as services:
            await ensure_defaults(services.sessions, services.settings.currency)
            admin = bearer(await ensure_admin_token(services, "+9779800000001"))
            gateway = StripeGateway(emulator.api_key, emulator.api_base)
            try:
                async with serve(create_app(services, auth_policy=TEST_AUTH_POLICY, payment_gateway=gateway)) as base_url:
                    schema = await asyncio.to_thread(schemathesis.openapi.from_url, f"{base_url}/schema/openapi.json")
                    operations = [result.ok() for result in schema.get_all_operations()]
                    for operation in operations:
                        headers = admin if operation.path.startswith("/api/admin") else await rider_headers(services)
                        await asyncio.to_thread(fuzz_operation, operation, base_url, headers, tally)
            finally:
                await gateway.close()
    print(f"schemathesis: {tally.requests} requests over {len(operations)} operations, {len(tally.failures)} failing")
    assert tally.failures == [], "\n\n".join(tally.failures)
    assert tally.requests >= MIN_REQUESTS, f"only {tally.requests} requests over {len(operations)} operations"
