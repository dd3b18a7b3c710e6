"""Shared fixtures: an isolated home, and every store backend behind one factory table."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.config
import matplotlib.dates  # noqa: F401 - registers its datetime.date converter: frozen, it would register FakeDate
import pandas  # noqa: F401 - imported before any freezegun test: pyarrow imports it (and _acero) lazily,
import pyarrow.acero  # noqa: F401 - and C extensions refuse freezegun's datetime classes at import
import pytest
from click.testing import CliRunner, Result
from controlplane import ControlPlane, serving

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.runtime import Pipeline
from pipeline.stores import Store, open_store

POSTGRES_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("PIPELINE_REQUIRE_POSTGRES") == "1"


def postgres_base_url() -> str:
    """The server URL, or skip (fail in CI, where PostgreSQL must be tested)."""
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("PIPELINE_TEST_POSTGRES_URL is not set but PostgreSQL tests are required")
        pytest.skip("PIPELINE_TEST_POSTGRES_URL not set")
    return POSTGRES_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_base_url())
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    from pipeline import db

    with db._engines_lock:
        for url in [u for u in db._engines if schema in u]:
            db._engines.pop(url)[0].dispose()
    with psycopg.connect(conninfo, autocommit=True) as conn:  # and those named after it (a backup's copy)
        for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", [schema]):
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An empty pipeline home; dask config points every embedded file into it."""
    home = tmp_path / "home"
    with dask.config.set({"pipeline.home": str(home)}):
        yield home


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings.from_config()


@pytest.fixture(scope="session")
def gcp_fakes():  # noqa: ANN201
    """The Cloud Logging REST fake and the ConfigServiceV2 gRPC fake, on loopback."""
    from fake_gcp import FakeConfigGRPC, FakeLoggingREST

    config = FakeConfigGRPC().start()
    rest = FakeLoggingREST(config).start()
    yield rest, config
    rest.stop()
    config.stop()


@pytest.fixture
def gcp_logging_url(gcp_fakes) -> str:  # noqa: ANN001
    """A fresh project on the fakes; the store in its _Default bucket (at 30 days), where logs.delete acts."""
    rest, config = gcp_fakes
    project = f"p-{uuid.uuid4().hex[:12]}"
    config.add_bucket(f"projects/{project}/locations/global/buckets/_Default", 30)
    return f"gcp-logging://{project}?bucket=_Default&endpoint={rest.endpoint}&config-endpoint={config.endpoint}"


@pytest.fixture
def gcp_own_bucket_url(gcp_fakes) -> str:  # noqa: ANN001
    """A fresh project on the fakes; the store's default: a bucket of its own, which ``init`` creates."""
    rest, config = gcp_fakes
    project = f"p-{uuid.uuid4().hex[:12]}"
    config.add_bucket(f"projects/{project}/locations/global/buckets/_Default", 30)
    return f"gcp-logging://{project}?endpoint={rest.endpoint}&config-endpoint={config.endpoint}"


@pytest.fixture
def s3_archive_url(aws: str) -> str:
    """A fresh bucket on moto; the URL names moto's endpoint explicitly."""
    import boto3

    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return f"s3://{bucket}/metadata?endpoint={aws}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, home: Path) -> Iterator[str]:
    """The configured home's metadata database: SQLite, or PostgreSQL in a fresh schema."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    with dask.config.set({"pipeline.long-term.url": request.getfixturevalue("postgres_url")}):
        yield "postgresql"


@pytest.fixture
def plane(home: Path) -> Iterator[ControlPlane]:
    """An empty control plane serving the configured home on loopback (modules may override it)."""
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    with serving(pipeline) as plane:
        yield plane
    pipeline.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def pipeline(request: pytest.FixtureRequest, home: Path) -> Iterator[Pipeline]:
    """An initialised pipeline whose metadata database is SQLite or PostgreSQL."""
    overrides = {}
    if request.param == "postgresql":
        overrides["pipeline.long-term.url"] = request.getfixturevalue("postgres_url")
    with dask.config.set(overrides):
        opened = Pipeline.open(create=True)
        yield opened
        opened.close()


STORE_FACTORIES: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "archive": lambda request, tmp: request.getfixturevalue("s3_archive_url"),
    "cloud_logging": lambda request, tmp: request.getfixturevalue("gcp_logging_url"),
    "memory": lambda request, tmp: f"memory://{uuid.uuid4().hex}",
    "sqlite": lambda request, tmp: f"sqlite:///{tmp}/store.db",
    "postgresql": lambda request, tmp: request.getfixturevalue("postgres_url"),
    "localfiles": lambda request, tmp: f"file://{tmp}/logs",
}


def raw_at_rest(request: pytest.FixtureRequest, store: Store) -> bytes:
    """Everything ``store`` keeps, as the backend holds it: files, rows, log entries, objects."""
    import json
    from urllib.parse import urlparse

    from sqlalchemy import select

    from pipeline.stores.sql import SQLStore

    name = request.node.callspec.params["store"]
    if name == "memory":
        return b"\0".join(repr(s).encode() for s in store.scan())
    if isinstance(store, SQLStore):
        from pipeline.db import segments

        with store.engine.connect() as conn:
            rows = conn.execute(select(segments)).all()
        return b"\0".join(v if isinstance(v, bytes) else str(v).encode() for row in rows for v in row)
    if name == "localfiles":
        return b"\0".join(p.read_bytes() for p in Path(urlparse(store.url).path).rglob("*") if p.is_file())
    if name == "cloud_logging":
        rest, _ = request.getfixturevalue("gcp_fakes")
        return json.dumps(rest.entries).encode()
    if name == "archive":
        import boto3

        s3, bucket = boto3.client("s3"), urlparse(store.url).netloc
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        return b"\0".join(k.encode() + s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)
    raise AssertionError(f"no raw reader for the {name} backend: add one")


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every Store backend in turn: a new backend inherits every behaviour test."""
    url = STORE_FACTORIES[request.param](request, tmp_path)
    opened = open_store(url, keyring=request.getfixturevalue("keyring"))
    yield opened
    opened.close()


@pytest.fixture
def keyring(tmp_path: Path):  # noqa: ANN201
    """A keyring in its own SQLite database with a fresh local master key."""
    from pipeline.db import create_schema, engine_for
    from pipeline.keys import Keyring, LocalKeyFile

    engine = engine_for(f"sqlite:///{tmp_path}/keyring.db")
    create_schema(engine)
    return Keyring.open(engine, LocalKeyFile(tmp_path / "master.key", create=True), create=True)


def make_record(kind: str = "cluster_snapshot", *, account: str = "acme", user: str | None = None, **fields):  # noqa: ANN003, ANN201
    """A valid record of ``kind`` with defaults for every field."""
    from pipeline.records import KINDS, utcnow

    record = {
        "record_id": uuid.uuid4().hex,
        "data_type": KINDS[kind].data_type,
        "kind": kind,
        "account": account,
        "user": user,
        "cluster_id": "cluster-test",
        "observed_at": utcnow(),
        **({"job_id": f"job-{uuid.uuid4().hex[:8]}"} if kind == "job" else {}),  # a report counts jobs by id
    }
    for field in KINDS[kind].schema:
        record.setdefault(field.name, None)
    record.update(fields)
    return record


def embedded_emitter(  # noqa: ANN201
    pipeline,  # noqa: ANN001
    *,
    account: str = "acme",
    retry_max: float = 0.2,
    linger: float = 0.0,
    spool_dir: Path | None = None,
):
    """A started emitter that delivers in-process to ``pipeline`` as a cluster of ``account``."""
    from pipeline.delivery import EmbeddedDelivery
    from pipeline.emitter import Emitter
    from pipeline.principals import Principal
    from pipeline.spool import Spool

    delivery = EmbeddedDelivery(lambda: pipeline, Principal.embedded_cluster(account, None))
    emitter = Emitter(delivery, Spool(spool_dir or pipeline.settings.spool_dir), retry_max=retry_max, linger=linger)
    emitter.start()
    return emitter


def sealed_batch(pipeline, records, batch_id: str | None = None) -> tuple[str, bytes]:  # noqa: ANN001
    """``records`` sealed to ``pipeline``'s intake public key, as a cluster would send them."""
    from pipeline.intake import seal_batch
    from pipeline.spool import new_batch_id

    batch_id = batch_id or new_batch_id()
    return batch_id, seal_batch(pipeline.intake_key.public_key(), batch_id, records)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server on a free loopback port: AWS APIs (KMS, S3) over real HTTP."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3's usual chain pointed at moto's server with test credentials."""
    for name, value in moto_environment(moto_endpoint).items():
        monkeypatch.setenv(name, value)
    return moto_endpoint


def moto_environment(endpoint: str) -> dict[str, str]:
    """The environment that points boto3's usual chain at moto's server, with test credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }


def run(*args: str) -> Result:
    """The command line, as a user runs it (stdout and stderr apart)."""
    return CliRunner().invoke(main, list(args))


def one_line(result: Result, status: int = 2) -> str:
    """The single stderr line of a refused command (asserting there is exactly one)."""
    assert result.exit_code == status, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]
