"""The OpenAPI schema tells the truth: a bounded schemathesis run, every check, against a real uvicorn (tiny models).

Each operation gets up to EXAMPLES generated requests (positive and negative; hypothesis derandomized, so the same
requests every run: 17 operations, about 30 s on 2 cores), and
every check schemathesis has must pass: no 5xx, only documented status codes, content types and headers, responses
matching their schemas, schema-valid requests accepted and invalid ones rejected. Caps are small so that a
generated request costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Server

schemathesis = pytest.importorskip("schemathesis", reason="needs the [test] extra: schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402 - schemathesis brings hypothesis

EXAMPLES = 40
CAPS = {"MG_MAX_STEPS": "3", "MG_MAX_RESTARTS": "2", "MG_DEFAULT_STEPS": "2", "MG_DEFAULT_RESTARTS": "1",
        "MG_ENCODER_STEPS": "1", "MG_MAX_BATCH_IMAGES": "4", "MG_MAX_REQUEST_COST": "24"}  # fmt: skip


@pytest.fixture(scope="module")
def api(tiny_models: Path) -> Iterator[Server]:
    with Server.running(tiny_models, False, **CAPS) as srv:
        yield srv


# Schema-valid requests these operations refuse for what JSON Schema cannot say: bytes that are no decodable image
# (400/415), steps=0 without a warm start, a call over the compute budget, a shipped-elsewhere model (422, 404).
# Every such answer is documented; every other check applies to them unchanged.
CONTENT_CHECKED = r"^/(v1/(classify|purify|detect)|v2/models/.+/infer|predictions/.+)$"
CONFIG = {
    "seed": 20261201,
    "operations": [{"include-path-regex": CONTENT_CHECKED, "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "400", "404", "413", "415", "422"]}}}],
}  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(api: Server) -> object:
    from schemathesis.config import SchemathesisConfig

    return schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # fmt: skip
def test_api_conforms_to_its_schema(case: object) -> None:
    case.call_and_validate(timeout=30)  # type: ignore[attr-defined]
