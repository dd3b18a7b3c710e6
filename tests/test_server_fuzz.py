"""Schemathesis fuzzes the API from its own /openapi.json: no 5xx, no stack trace, errors as problem+json, and
every answer as the document says (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import schemathesis
from conftest import make_record
from controlplane import ControlPlane, serving
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from pipeline.config import Settings
from pipeline.runtime import Pipeline
from pipeline.server.ingest import BATCH_MEDIA_TYPE

pytestmark = pytest.mark.slow
# a sealed batch is opaque bytes on the wire
schemathesis.serializer.alias(BATCH_MEDIA_TYPE, "application/octet-stream")


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    import dask.config

    home: Path = tmp_path_factory.mktemp("fuzz") / "home"
    with dask.config.set({"pipeline.home": str(home)}):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
        pipeline.write_records(
            [make_record(account="acme"), make_record("software_env", account="acme", env_id="env-1", packages={})]
        )
        with serving(pipeline) as plane:
            yield plane
        pipeline.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx_or_a_stack_trace(plane: ControlPlane, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{plane.url}/openapi.json")
    tokens = {
        "admin": plane.tokens.create("admin", user="fuzz").token,
        "member": plane.tokens.create("member", "acme", "ann").token,
        "cluster": plane.tokens.create("cluster", "acme", cluster_id="c-fuzz", ttl=timedelta(days=1)).token,
    }

    def token_for(path: str, method: str) -> str:
        if path == "/v1/ingest":
            return tokens["cluster"]
        return tokens["member"] if method == "PATCH" or path == "/v1/erasure-requests" else tokens["admin"]

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def check(case: schemathesis.Case) -> None:
        token = token_for(case.operation.path, case.method.upper())
        response = case.call(base_url=plane.url, headers={"Authorization": f"Bearer {token}"})
        text = response.text
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {text[:300]}"
        assert "Traceback" not in text and 'File "' not in text
        if response.status_code >= 400:
            assert response.headers["content-type"] == ["application/problem+json"], text[:300]
        # every status, content type and body as /openapi.json documents it (a sealed batch is opaque bytes:
        # that a schema-valid one may be refused is its nature, not a gap in the document)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    check()
