"""Schemathesis drives the locally served API from the committed openapi.json: whatever the
document allows (and the edges around it), no request gets a 5xx."""

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from devtools.local_stack import LocalStack

pytestmark = pytest.mark.slow
schema = schemathesis.openapi.from_path(Path(__file__).resolve().parents[2] / "openapi.json")
session = requests.Session()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_the_document_allows_gets_a_server_error(case, stack: LocalStack):
    # Given the stack's admin key, so requests reach the functions behind the authorizer
    headers = {"Authorization": f"Bearer {stack.server_key}"}
    # When Schemathesis sends a generated request / Then it is never a 5xx
    response = case.call(base_url=stack.api_url, session=session, headers=headers)
    case.validate_response(response, checks=[not_a_server_error])
