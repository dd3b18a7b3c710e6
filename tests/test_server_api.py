"""The control plane's HTTP API over real HTTP: tokens, scoping, problem+json, and the attacks on them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_record
from controlplane import ControlPlane, assert_problem, ndjson, serving
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.db import metadata
from pipeline.intake import load_public_key, seal_batch
from pipeline.records import KINDS, utcnow
from pipeline.runtime import Pipeline

SECRET_NAMES = ("acme-Holdings", "globex-Corp", "ann.smith", "bob.jones")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, home: Path) -> str:
    """The metadata database every test here runs on: the embedded SQLite file, and PostgreSQL."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else f"sqlite:///{home}/metadata.db"


@pytest.fixture
def plane(database_url: str) -> Iterator[ControlPlane]:
    pipeline = Pipeline.open(Settings.from_config(long_term_url=database_url), create=True)
    pipeline.write_records(
        [
            make_record(account="acme-Holdings", user="ann.smith", cluster_id="c-acme"),
            make_record(account="acme-Holdings", user="ann.smith", kind="job", job_id="j1", tasks_total=3),
            make_record(account="globex-Corp", user="bob.jones", cluster_id="c-globex"),
        ]
    )
    with serving(pipeline) as plane:
        yield plane
    pipeline.close()


def test_member_reads_only_own_account_with_the_record_schema_fields(plane: ControlPlane) -> None:
    with plane.member("acme-Holdings", "ann.smith") as ann:
        rows = ndjson(ann.get("/v1/records"))
        jobs = ndjson(ann.get("/v1/records", params={"kind": "job"}))
    assert {r["account"] for r in rows} == {"acme-Holdings"} and len(rows) == 2
    (job,) = jobs
    assert list(job) == [f.name for f in KINDS["job"].schema]
    assert (job["job_id"], job["tasks_total"]) == ("j1", 3)


def test_another_accounts_records_answer_exactly_like_an_unknown_account(plane: ControlPlane) -> None:
    with plane.member("globex-Corp", "bob.jones") as bob:
        other = bob.get("/v1/records", params={"account": "acme-Holdings"})
        unknown = bob.get("/v1/records", params={"account": "no-such-account"})
        own = bob.get("/v1/records", params={"account": "globex-Corp"})
    assert_problem(other, 404)
    assert other.content == unknown.content
    assert {k: v for k, v in other.headers.items() if k != "date"} == {
        k: v for k, v in unknown.headers.items() if k != "date"
    }
    assert own.status_code == 200
    with plane.member("initech", "new.hire") as newcomer:  # a member's own account, before any record
        empty = newcomer.get("/v1/records")
    assert (empty.status_code, empty.text) == (200, "")


def test_admin_reads_every_account_and_filters(plane: ControlPlane) -> None:
    with plane.admin() as admin:
        everything = ndjson(admin.get("/v1/records"))
        acme = ndjson(admin.get("/v1/records", params={"account": "acme-Holdings", "data_type": "cluster_jobs"}))
        future = ndjson(admin.get("/v1/records", params={"since": (utcnow() + timedelta(hours=1)).isoformat()}))
        past = ndjson(admin.get("/v1/records", params={"until": (utcnow() - timedelta(hours=1)).isoformat()}))
        assert_problem(admin.get("/v1/records", params={"account": "nobody"}), 404)
    assert {r["account"] for r in everything} == {"acme-Holdings", "globex-Corp"} and len(everything) == 3
    assert len(acme) == 2 and future == [] and past == []


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing bearer token"),
        ("Bearer mp_" + "A" * 43, "unknown token"),
        ("Bearer not-a-token", "malformed token"),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", "missing bearer token"),
    ],
)
def test_missing_malformed_or_unknown_token_is_401(plane: ControlPlane, header: str | None, reason: str) -> None:
    with plane.client() as anonymous:
        response = anonymous.get("/v1/records", headers={"Authorization": header} if header else {})
    body = assert_problem(response, 401)
    assert reason in body["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_revocation_takes_effect_on_the_next_request(plane: ControlPlane) -> None:
    issued = plane.tokens.create("member", "acme-Holdings", "ann.smith")
    with plane.client(issued.token) as ann:
        assert ann.get("/v1/records").status_code == 200
        plane.tokens.revoke(issued.token_id)
        assert "revoked" in assert_problem(ann.get("/v1/records"), 401)["detail"]


def test_expired_cluster_token_is_401(plane: ControlPlane) -> None:
    long_ago = utcnow() - timedelta(days=31)
    issued = plane.tokens.create("cluster", "acme-Holdings", cluster_id="c-1", ttl=timedelta(days=30), now=long_ago)
    with plane.client(issued.token) as cluster:
        assert "expired" in assert_problem(cluster.post("/v1/ingest", content=b"x"), 401)["detail"]


def test_cluster_token_cannot_read_anything(plane: ControlPlane) -> None:
    issued = plane.tokens.create("cluster", "acme-Holdings", cluster_id="c-acme", ttl=timedelta(days=1))
    with plane.client(issued.token) as cluster:
        for path in ("/v1/records", "/v1/clusters", "/v1/erasure-requests", "/metrics"):
            assert_problem(cluster.get(path), 403)
        assert_problem(cluster.post("/v1/erasure-requests", json={"account": "acme-Holdings"}), 403)


def test_member_token_may_not_ingest(plane: ControlPlane) -> None:
    with plane.member("acme-Holdings", "ann.smith") as ann:
        assert_problem(ann.post("/v1/ingest", content=b"sealed?"), 403)


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"account": ""}', b'{"account": "acme-Holdings", "extra": 1}', b'{"name": "x"}'],
)
def test_malformed_bodies_are_400_problems_never_422(plane: ControlPlane, body: bytes) -> None:
    with plane.member("acme-Holdings", "ann.smith") as ann:
        response = ann.post("/v1/clusters", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 400)


@pytest.mark.parametrize("suppress", ["yes", 0, "true"])
def test_a_flag_that_is_not_a_json_boolean_is_400(plane: ControlPlane, suppress: object) -> None:
    """``"suppress": "yes"`` filed an erasure that dropped the subject's later records (pydantic's lax mode)."""
    with plane.admin() as admin:
        response = admin.post("/v1/erasure-requests", json={"account": "acme-Holdings", "suppress": suppress})
    assert_problem(response, 400)


def test_a_json_body_over_64_kib_is_refused_before_it_is_read(plane: ControlPlane) -> None:
    with plane.member("acme-Holdings", "ann.smith") as ann:
        response = ann.post("/v1/clusters", json={"account": "acme-Holdings", "name": "x" * 70_000})
    assert "over 65536 bytes" in assert_problem(response, 413)["detail"]


@pytest.mark.parametrize("token", [None, "mp_" + "x" * 43])
def test_an_oversized_body_without_a_valid_token_is_401_not_413(plane: ControlPlane, token: str | None) -> None:
    """Who asks comes first: a stranger learns nothing of the limits, and every such request is 401."""
    with plane.client(token) as stranger:
        response = stranger.post("/v1/ingest", content=b"x" * (9 * 2**20))
    assert_problem(response, 401)


def test_bad_query_values_and_unknown_routes_are_problems(plane: ControlPlane) -> None:
    with plane.admin() as admin:
        assert_problem(admin.get("/v1/records", params={"kind": "nope"}), 400)
        assert_problem(admin.get("/v1/records", params={"since": "yesterday"}), 400)
        assert_problem(admin.get("/v1/records", params={"since": "2026-01-01T00:00:00"}), 400)  # no zone
        for number in ("1765065600", "1765065600.5", ".5", "-.5", ".5e3", "+.5"):  # pydantic: seconds since 1970
            assert "ISO 8601" in assert_problem(admin.get("/v1/records", params={"until": number}), 400)["detail"]
        reversed_range = {"since": "2026-12-06T01:00:00Z", "until": "2026-12-05T00:00:00Z"}  # not "no records"
        assert "after until" in assert_problem(admin.get("/v1/records", params=reversed_range), 400)["detail"]
        assert_problem(admin.get("/v1/nothing-here"), 404)
        for path in ("/v1/erasure-requests/abc%00", "/v1/clusters/abc%00/close"):  # PostgreSQL: a 500 from NUL
            assert_problem(admin.request("POST" if path.endswith("close") else "GET", path), 404)
        injected = admin.post("/v1/clusters", json={"account": "acme", "x\nInjected: yes\r\n": 1})
        assert (
            assert_problem(injected, 400)["detail"] == "x\\x0aInjected: yes\\x0d\\x0a: Extra inputs are not permitted"
        )
        assert_problem(admin.delete("/v1/records"), 405)


def test_member_erases_own_user_only_and_sees_only_own_requests(plane: ControlPlane) -> None:
    with plane.member("acme-Holdings", "ann.smith") as ann, plane.admin() as admin:
        for attack in (
            {"account": "acme-Holdings", "user": "someone.else"},  # another user of the same account
            {"account": "acme-Holdings"},  # the whole account
            {"account": "globex-Corp", "user": "ann.smith"},  # another account
        ):
            assert_problem(ann.post("/v1/erasure-requests", json=attack), 403)
        mine = ann.post("/v1/erasure-requests", json={"account": "acme-Holdings", "user": "ann.smith", "reason": "r"})
        assert mine.status_code == 201, mine.text
        theirs = admin.post("/v1/erasure-requests", json={"account": "globex-Corp"}).json()
        listed = [r["request_id"] for r in ann.get("/v1/erasure-requests").json()]
        assert listed == [mine.json()["request_id"]]
        hidden = ann.get(f"/v1/erasure-requests/{theirs['request_id']}")
        unknown = ann.get("/v1/erasure-requests/00000000-0000-0000-0000-000000000000")
        assert_problem(hidden, 404)
        assert_problem(unknown, 404)
        assert ann.get(f"/v1/erasure-requests/{mine.json()['request_id']}").json()["state"] == "pending"
        assert {r["request_id"] for r in admin.get("/v1/erasure-requests").json()} == {
            mine.json()["request_id"],
            theirs["request_id"],
        }


def test_software_envs_are_public_until_an_owner_makes_them_private(plane: ControlPlane) -> None:
    env = {"env_id": "env-acme-1", "python_version": "3.11.9", "packages": {"numpy": "2.1"}}
    plane.pipeline.write_records([make_record("software_env", account="acme-Holdings", **env)])
    with plane.member("acme-Holdings", "ann.smith") as ann, plane.member("globex-Corp", "bob.jones") as bob:
        assert [e["env_id"] for e in bob.get("/v1/software-envs").json()] == ["env-acme-1"]
        assert_problem(bob.patch("/v1/software-envs/env-acme-1", json={"visibility": "private"}), 404)
        assert_problem(ann.patch("/v1/software-envs/env-acme-1", json={"visibility": "secret"}), 400)
        changed = ann.patch("/v1/software-envs/env-acme-1", json={"visibility": "private"})
        assert changed.json() == {"env_id": "env-acme-1", "visibility": "private"}
        assert bob.get("/v1/software-envs").json() == []
        (own,) = ann.get("/v1/software-envs").json()
        assert (own["visibility"], own["packages"]) == ("private", {"numpy": "2.1"})
    with plane.admin() as admin:
        assert [e["visibility"] for e in admin.get("/v1/software-envs").json()] == ["private"]


def test_listing_environments_decrypts_only_segments_not_read_before(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every listing decrypted every environment record ever reported (one a cluster start), for every
    account (r14). Now a listing reads what was written since the last, and sees an erasure at once."""
    from pipeline import runtime
    from pipeline.retention.requests import file_request, process_pending

    opened: list[str] = []
    open_segment = runtime.open_segment

    def counted(keyring: Any, segment: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(segment.data_type)
        return open_segment(keyring, segment, *args, **kwargs)

    monkeypatch.setattr(runtime, "open_segment", counted)
    earlier, later = utcnow() - timedelta(hours=2), utcnow() - timedelta(hours=1)
    plane.pipeline.write_records(
        [
            make_record("software_env", account=account, env_id=env_id, observed_at=earlier)
            for account, env_id in (("acme-Holdings", "e-acme"), ("globex-Corp", "e-globex"))
        ]
    )
    with plane.admin() as admin:

        def listing() -> dict[str, datetime]:
            return {
                e["env_id"]: datetime.fromisoformat(e["observed_at"]) for e in admin.get("/v1/software-envs").json()
            }

        assert listing() == {"e-acme": earlier, "e-globex": earlier}
        assert opened.count("software_env") == 2
        assert listing() == {"e-acme": earlier, "e-globex": earlier}
        assert opened.count("software_env") == 2  # nothing read again
        plane.pipeline.write_records(
            [make_record("software_env", account="acme-Holdings", env_id="e-acme", observed_at=later)]
        )
        assert listing() == {"e-acme": later, "e-globex": earlier}
        assert opened.count("software_env") == 3  # the new segment alone
        file_request(plane.pipeline, "globex-Corp")
        process_pending(plane.pipeline)
        assert listing() == {"e-acme": later}  # a segment gone: read again, without it


def test_health_for_anyone_metrics_for_admins_only(plane: ControlPlane) -> None:
    with plane.client() as anonymous, plane.member("acme-Holdings", "ann.smith") as ann, plane.admin() as admin:
        assert anonymous.get("/v1/health").json() == {"status": "ok"}
        assert_problem(anonymous.get("/metrics"), 401)
        assert_problem(ann.get("/metrics"), 403)
        ann.get("/v1/records")
        for n in range(3):  # made-up methods: each a metric series for good, a gigabyte of /metrics in the end
            anonymous.request(f"M{n}{'X' * 2000}", "/x")
        metrics = admin.get("/metrics")
    assert metrics.status_code == 200
    assert 'pipeline_request_seconds_count{method="GET",route="/v1/records",status="200"} 1.0' in metrics.text
    assert "XXXX" not in metrics.text and 'method="OTHER",route="unmatched"' in metrics.text
    assert "pipeline_ingested_records_total 0.0" in metrics.text


def test_no_name_or_token_reaches_the_database_in_clear(plane: ControlPlane, home: Path) -> None:
    issued = [
        plane.tokens.create("member", "acme-Holdings", "ann.smith"),
        plane.tokens.create("admin", user="bob.jones"),
        plane.tokens.create("cluster", "globex-Corp", cluster_id="c-globex", ttl=timedelta(days=1)),
    ]
    with plane.member("acme-Holdings", "ann.smith") as ann:
        ann.post("/v1/erasure-requests", json={"account": "acme-Holdings", "user": "ann.smith", "reason": "ticket"})
    secrets = [*SECRET_NAMES, *(t.token for t in issued)]
    engine = plane.pipeline.keyring.engine
    with engine.connect() as conn:
        dump = "\n".join(str(row) for table in metadata.sorted_tables for row in conn.execute(select(table)))
    assert "c-globex" in dump  # the dump does hold the tables' contents
    assert [s for s in secrets if s in dump] == []
    engine.dispose()
    for path in home.rglob("metadata.db*"):  # SQLite: free pages and the WAL too
        raw = path.read_bytes()
        assert [s for s in secrets if s.encode() in raw] == [], path


def test_revocation_on_one_replica_holds_on_another(plane: ControlPlane) -> None:
    replica = Pipeline.open(plane.pipeline.settings)
    issued = plane.tokens.create("member", "acme-Holdings", "ann.smith")
    with serving(replica) as other:
        with other.client(issued.token) as ann:
            assert ann.get("/v1/records").status_code == 200
        plane.tokens.revoke(issued.token_id)  # through the first replica's database handle
        with other.client(issued.token) as ann:
            assert_problem(ann.get("/v1/records"), 401)
    replica.close()


def test_a_database_outage_is_503_without_naming_the_database(postgres_url: str, home: Path) -> None:
    from sqlalchemy.engine import make_url
    from tcpproxy import TCPProxy

    url = make_url(postgres_url)
    proxy = TCPProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    pipeline = Pipeline.open(Settings.from_config(long_term_url=proxied), create=True)
    with serving(pipeline) as plane, plane.member("acme", "ann") as ann:
        assert ann.get("/v1/records").status_code == 200
        proxy.cut()
        down = ann.get("/v1/records")
        proxy.restore()
        assert ann.get("/v1/records").status_code == 200  # back on the next request
    body = assert_problem(down, 503)
    assert body["detail"] == "a store or the metadata database is unavailable; retry later"
    assert str(proxy.port) not in down.text and "5432" not in down.text
    pipeline.close()
    proxy.close()


def test_an_erasure_ends_the_tokens_and_shreds_the_names_of_whom_it_erased(plane: ControlPlane) -> None:
    from pipeline.retention.requests import file_request, process_pending
    from pipeline.server.clusters import ClusterRegistry

    ann = plane.tokens.create("member", "acme-Holdings", "ann.smith")
    carl = plane.tokens.create("member", "acme-Holdings", "carl.x")
    bob = plane.tokens.create("member", "globex-Corp", "bob.jones")
    registry = ClusterRegistry(plane.pipeline, plane.tokens)
    registry.register("acme-Holdings", plane.url, name="acme-prod")

    def status(token: str) -> int:
        with plane.client(token) as client:
            return client.get("/v1/records").status_code

    file_request(plane.pipeline, "acme-Holdings", "ann.smith")
    process_pending(plane.pipeline)
    assert (status(ann.token), status(carl.token), status(bob.token)) == (401, 200, 200)

    file_request(plane.pipeline, "acme-Holdings")
    process_pending(plane.pipeline)
    assert (status(carl.token), status(bob.token)) == (401, 200)
    listed = {t.token_id: (t.account, t.user) for t in plane.tokens.list()}
    assert listed[ann.token_id] == listed[carl.token_id] == (None, None)
    assert listed[bob.token_id] == ("globex-Corp", "bob.jones")
    (cluster,) = registry.list()
    assert (cluster["account"], cluster["name"]) == (None, None)


def test_the_audit_trail_names_the_token_that_filed_an_erasure(plane: ControlPlane) -> None:
    issued = plane.tokens.create("member", "acme-Holdings", "ann.smith")
    with plane.client(issued.token) as ann:
        filed = ann.post("/v1/erasure-requests", json={"account": "acme-Holdings", "user": "ann.smith"})
    entry = plane.pipeline.audit.last("erasure.pending")
    assert entry is not None and entry.details["request_id"] == filed.json()["request_id"]
    assert entry.actor == f"member-token:{issued.token_id}"


@pytest.mark.parametrize("body", [{"account": " "}, {"account": "acme", "user": "\t"}])
def test_an_erasure_of_a_blank_name_is_400_as_a_token_of_one_would_be(plane: ControlPlane, body: dict) -> None:
    with plane.admin() as admin:
        answer = admin.post("/v1/erasure-requests", json=body)
        assert "must not be blank" in assert_problem(answer, 400)["detail"]
        assert admin.get("/v1/erasure-requests").json() == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/v1/erasure-requests", {"account": "acme-Holdings\0ann.smith"}),
        ("post", "/v1/erasure-requests", {"account": "acme-Holdings", "user": "ann.smith\0x"}),
        ("post", "/v1/clusters", {"account": "acme-Holdings\0ann.smith"}),
        ("post", "/v1/clusters", {"account": "acme-Holdings", "user": "ann\nsmith"}),
        ("post", "/v1/clusters", {"account": "acme-Holdings", "name": "etl\u0000nightly"}),  # printed back
        ("post", "/v1/clusters", {"account": "acme-Holdings", "image": "img\u001b[31m"}),
        ("get", "/v1/records?account=acme-Holdings%00ann.smith", None),
    ],
)
def test_a_name_with_a_control_character_is_400_and_cannot_alias_another_subject(
    plane: ControlPlane, method: str, path: str, body: dict | None
) -> None:
    """Account ``a\\0b`` would hash as user ``b`` of account ``a``: erasing it would shred ann's key."""
    with plane.admin() as admin:
        answer = admin.request(method, path, json=body)
        assert "control character" in assert_problem(answer, 400)["detail"]
        assert admin.get("/v1/erasure-requests").json() == []
    with plane.member("acme-Holdings", "ann.smith") as ann:
        assert ann.get("/v1/whoami").status_code == 200
        assert len(ndjson(ann.get("/v1/records"))) == 2


def test_a_members_own_names_typed_in_another_unicode_form_are_their_own(home: Path) -> None:
    """``café`` typed with a combining accent is the same account, for reading, registering and erasing."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    pipeline.write_records([make_record(account=composed, user="zo\u00eb")])
    with serving(pipeline) as plane, plane.member(composed, "zo\u00eb") as zoe:
        assert len(ndjson(zoe.get("/v1/records", params={"account": decomposed}))) == 1
        registered = zoe.post("/v1/clusters", json={"account": decomposed, "user": "zoe\u0308"})
        assert registered.status_code == 201, registered.text
        # kept as its refs are made: the cluster's token said the account as typed, and its plugin's records
        # naming it as the member's own token does were refused as another account's (r43)
        cluster = registered.json()
        assert (cluster["account"], cluster["user"]) == (composed, "zo\u00eb")
        with plane.client(cluster["token"]) as http:
            assert http.get("/v1/whoami").json()["account"] == composed
            record = make_record(account=composed, user="zo\u00eb", cluster_id=cluster["cluster_id"])
            sealed = seal_batch(load_public_key(cluster["intake_public_key"]), "b-1", [record])
            assert http.post("/v1/ingest", content=sealed).status_code == 202
        with plane.member(decomposed, "zoe\u0308") as typed_apart:
            assert typed_apart.get("/v1/whoami").json()["account"] == composed
        filed = zoe.post("/v1/erasure-requests", json={"account": decomposed, "user": "zoe\u0308"})
        assert filed.status_code == 201, filed.text
    pipeline.close()


def test_head_answers_as_get_without_a_body_and_a_trailing_slash_is_not_redirected(plane: ControlPlane) -> None:
    """HEAD was 405 (RFC 9110 requires it where GET is served: health checkers took the service for down), and
    ``/v1/health/`` was redirected to whatever host the Host header named."""
    with plane.admin() as admin:
        got, head = admin.get("/v1/health"), admin.head("/v1/health")
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == got.headers["content-type"]
        assert admin.head("/v1/records").status_code == 200
        assert admin.head("/v1/nothing-here").status_code == 404
        slashed = admin.get("/v1/health/", headers={"Host": "evil.example"})
    assert "location" not in slashed.headers
    assert_problem(slashed, 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/clusters", "GET, HEAD, POST"),
        ("DELETE", "/v1/erasure-requests", "GET, HEAD, POST"),
        ("DELETE", "/v1/records", "GET, HEAD"),
        ("PUT", "/v1/software-envs/e-1", "PATCH"),
    ],
)
def test_a_405_lists_every_method_of_its_path(plane: ControlPlane, method: str, path: str, allowed: str) -> None:
    """RFC 9110: ``Allow`` lists the methods the path is served with; it named the first route's only."""
    with plane.admin() as admin:
        refused = admin.request(method, path)
    assert_problem(refused, 405)
    assert refused.headers["allow"] == allowed


@pytest.mark.parametrize(
    ("method", "path", "body"), [("GET", "/v1/whoami", None), ("POST", "/v1/clusters", {"account": "globex"})]
)
def test_two_authorization_headers_are_refused_whichever_the_route(
    plane: ControlPlane, method: str, path: str, body: dict | None
) -> None:
    """A member's token then an admin's: a request without a body acted as the first, one with a body as the
    second (registering a cluster in another account), while a proxy reading the first named the member."""
    member = plane.tokens.create("member", "acme", "ann").token
    admin = plane.tokens.create("admin", user="compliance").token
    headers = [("Authorization", f"Bearer {member}"), ("Authorization", f"Bearer {admin}")]
    with plane.client() as anyone:
        answer = anyone.request(method, path, headers=headers, json=body)
    assert "more than one Authorization header" in assert_problem(answer, 400)["detail"]
    with plane.admin() as admin_alone:
        assert admin_alone.get("/v1/clusters").json() == []
