"""AWS session tokens forwarded to workers, against moto's S3 and STS over real HTTP.

The test process plays the user's laptop: it holds long-term IAM user keys in a boto3
Session, never in the environment the worker processes inherit. Workers are separate
processes, so whatever credentials they have came through the plugin.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import dask.config
import httpx
import pytest
from click.testing import CliRunner
from conftest import one_line, run
from distributed import Client, LocalCluster
from moto.core.authorization import enable_iam_authentication

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.errors import ConfigError, CredentialsError
from pipeline.keys import Keyring
from pipeline.records import utcnow
from pipeline.runtime import Pipeline
from pipeline.security.aws import (
    PLUGIN_NAME,
    SessionTokenForwarder,
    forward_aws_credentials,
    issue_session_credentials,
)
from pipeline.security.tls import ClusterCredentials, issue_credentials
from pipeline.server.clusters import role_configs

BUCKET = "acme-private"
ROLE_ARN = "arn:aws:iam::123456789012:role/cluster-reader"


@pytest.fixture
def aws_world(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh moto world: a bucket with a private and a public object, a user with long-term keys
    allowed to assume a role that may read the bucket. The environment holds no credentials."""
    httpx.post(f"{moto_endpoint}/moto-api/reset").raise_for_status()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    admin = boto3.Session(aws_access_key_id="admin", aws_secret_access_key="admin", region_name="eu-west-1")
    s3 = admin.client("s3")
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket=BUCKET, Key="private.txt", Body=b"private data")
    s3.put_object(Bucket=BUCKET, Key="public.txt", Body=b"public data", ACL="public-read")
    iam = admin.client("iam")
    iam.create_user(UserName="alice")
    iam.put_user_policy(
        UserName="alice",
        PolicyName="assume",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": ROLE_ARN},
                    {"Effect": "Allow", "Action": "sts:GetSessionToken", "Resource": "*"},
                ],
            }
        ),
    )
    iam.create_role(
        RoleName="cluster-reader",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": "arn:aws:iam::123456789012:user/alice"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )
    iam.put_role_policy(
        RoleName="cluster-reader",
        PolicyName="read",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="alice")["AccessKey"]
    laptop = boto3.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], region_name="eu-west-1"
    )
    yield {"session": laptop, "access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}


@pytest.fixture
def tls(keyring: Keyring) -> ClusterCredentials:
    return issue_credentials(keyring, "acme", "c-aws")


@pytest.fixture
def cluster(tls: ClusterCredentials) -> Iterator[Client]:
    """A TLS cluster, one worker in its own process (it inherits the environment: no credentials)."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", security=tls.security()) as local,
        Client(local) as client,
    ):
        yield client


def read_object(key: str, unsigned: bool = False) -> str:
    """Runs on a worker: read one object the way user code would."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    try:
        s3 = boto3.client("s3", config=Config(signature_version=UNSIGNED)) if unsigned else boto3.client("s3")
        return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    except Exception as exc:
        return f"refused: {exc.__class__.__name__}"


def worker_credentials() -> tuple[str, str, str | None] | None:
    """Runs on a worker: the credentials boto3 resolves there."""
    import boto3

    found = boto3.Session().get_credentials()
    return None if found is None else (found.access_key, found.secret_key, found.token)


def on_worker(client: Client, function: Any, *args: Any) -> Any:
    return client.submit(function, *args, pure=False).result()


def test_workers_read_a_private_object_only_through_the_forwarded_role_session(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    with enable_iam_authentication():
        assert on_worker(cluster, read_object, "private.txt") == "refused: NoCredentialsError"
        with SessionTokenForwarder(
            cluster, worker_cert=tls.certs["worker"], session=aws_world["session"], role_arn=ROLE_ARN
        ) as forwarder:
            assert forwarder.forward()
            assert on_worker(cluster, read_object, "private.txt") == "private data"
            access_key, secret, token = on_worker(cluster, worker_credentials)
    assert token and access_key == forwarder.credentials.access_key_id
    # never the long-term keys
    assert access_key != aws_world["access_key_id"] and secret != aws_world["secret_access_key"]


def test_a_client_forwards_with_the_clusters_client_yaml_alone(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    """client.yaml held no worker certificate: forwarding needed worker.yaml, the workers' private key with it."""
    registration = {"tls": tls.to_json(), "account": "acme", "user": None, "cluster_id": "c-aws", "image": None}
    client_yaml = role_configs(
        {**registration, "ingest_url": "https://cp.example", "token": "t", "intake_public_key": "k"}
    )["client"]
    keys = client_yaml["distributed"]["comm"]["tls"]
    assert set(keys) == {"ca-file", "client"} and "PRIVATE KEY" not in client_yaml["pipeline"]["aws"]["worker-cert"]
    pipeline_section = {"pipeline": client_yaml["pipeline"]}  # the TLS section: the cluster fixture has its own
    with dask.config.set(pipeline_section), SessionTokenForwarder(cluster, session=aws_world["session"]) as forwarder:
        assert forwarder.forward()
        access_key, _secret, token = on_worker(cluster, worker_credentials)
    assert token and access_key == forwarder.credentials.access_key_id


def caller_arn() -> str:
    """Runs on a worker: who AWS takes its credentials for."""
    import boto3

    return boto3.client("sts").get_caller_identity()["Arn"]


def test_a_forwarder_asks_for_the_role_and_lifetime_the_configuration_names(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    """Only the demo passed them on: a forwarder made as the README says sent GetSessionToken credentials
    (the user's own permissions, not the role's) for an hour, whatever pipeline.aws.role-arn and
    pipeline.aws.session-duration said."""
    configured = {
        "pipeline.aws.worker-cert": tls.certs["worker"],
        "pipeline.aws.role-arn": ROLE_ARN,
        "pipeline.aws.session-duration": "15m",
    }
    with dask.config.set(configured), SessionTokenForwarder(cluster, session=aws_world["session"]) as forwarder:
        assert forwarder.forward()
        lifetime = forwarder.credentials.expiration - utcnow()
        worker_is = on_worker(cluster, caller_arn)
    assert timedelta(minutes=14) < lifetime <= timedelta(minutes=15)
    assert ":assumed-role/cluster-reader/" in worker_is


def test_without_a_worker_certificate_the_forwarder_says_where_to_find_it(cluster: Client) -> None:
    with pytest.raises(ConfigError, match="run with the cluster's client.yaml"):
        SessionTokenForwarder(cluster)


def test_without_a_role_workers_get_a_get_session_token_token(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    with SessionTokenForwarder(cluster, worker_cert=tls.certs["worker"], session=aws_world["session"]) as forwarder:
        assert forwarder.forward()
        access_key, secret, token = on_worker(cluster, worker_credentials)
    assert (access_key, secret, token) == (
        forwarder.credentials.access_key_id,
        forwarder.credentials.secret_access_key,
        forwarder.credentials.token,
    )
    assert access_key != aws_world["access_key_id"] and token


def test_without_local_credentials_the_cluster_starts_with_none_and_reads_public_data(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    empty = boto3.Session(region_name="eu-west-1")  # the environment holds no credentials
    forwarder = forward_aws_credentials(
        cluster, worker_cert=tls.certs["worker"], role_arn=None, duration=timedelta(hours=1), session=empty
    )
    forwarder.close()
    assert forwarder.credentials is None
    assert on_worker(cluster, worker_credentials) is None
    assert on_worker(cluster, read_object, "public.txt", True) == "public data"
    assert on_worker(cluster, read_object, "private.txt", True) == "refused: ClientError"


def _role_forwarder(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client, now: list[datetime], **kwargs: Any
) -> SessionTokenForwarder:
    """A forwarder of role sessions to ``cluster``'s workers, on a clock the test moves (``now[0]``)."""
    return SessionTokenForwarder(
        cluster,
        worker_cert=tls.certs["worker"],
        session=aws_world["session"],
        role_arn=ROLE_ARN,
        clock=lambda: now[0],
        **kwargs,
    )


def test_the_token_is_refreshed_on_the_workers_before_it_expires(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    now = [utcnow()]
    with enable_iam_authentication():
        forwarder = _role_forwarder(aws_world, tls, cluster, now)
        assert forwarder.forward()
        first = forwarder.credentials
        assert first is not None

        now[0] = first.refresh_at - timedelta(seconds=1)
        assert not forwarder.refresh_if_due()
        assert on_worker(cluster, worker_credentials)[2] == first.token

        now[0] = first.refresh_at  # three quarters of its life gone: still valid for another 15 minutes
        assert now[0] < first.expiration - timedelta(minutes=14)
        assert forwarder.refresh_if_due()
        second = forwarder.credentials
        assert second is not None and second.token != first.token
        assert on_worker(cluster, worker_credentials)[2] == second.token
        assert on_worker(cluster, read_object, "private.txt") == "private data"


def held_client_token() -> str | None:
    """Runs on a worker: the token of an S3 client user code made once and keeps (as s3fs caches one)."""
    import boto3
    from distributed import get_worker

    worker = get_worker()
    if not hasattr(worker, "held_s3_client"):
        worker.held_s3_client = boto3.client("s3")  # type: ignore[attr-defined]
    return worker.held_s3_client._request_signer._credentials.get_frozen_credentials().token  # type: ignore[attr-defined]


def test_a_client_made_before_a_refresh_takes_the_new_token(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    """The variables alone made static credentials: a client made before a refresh kept the old token,
    and failed with ExpiredToken once it expired. STS's shortest token (15 minutes) is in the window
    in which botocore reads refreshable credentials again."""
    now = [utcnow()]
    with enable_iam_authentication():
        forwarder = _role_forwarder(aws_world, tls, cluster, now, duration=timedelta(minutes=15))
        assert forwarder.forward()
        first = forwarder.credentials
        assert first is not None
        assert on_worker(cluster, held_client_token) == first.token
        now[0] = first.refresh_at
        assert forwarder.refresh_if_due()
        second = forwarder.credentials
        assert second is not None and second.token != first.token
        assert on_worker(cluster, held_client_token) == second.token


def test_the_background_refresh_replaces_the_token(
    aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client
) -> None:
    """start() keeps checking on its own thread; a clock past the refresh time gets a new token."""
    late = [datetime.min.replace(tzinfo=utcnow().tzinfo)]
    forwarder = SessionTokenForwarder(
        cluster, worker_cert=tls.certs["worker"], session=aws_world["session"], clock=lambda: late[0], check_every=0.05
    )
    with forwarder:
        assert forwarder.start()
        first = forwarder.credentials
        assert first is not None
        late[0] = first.expiration  # from now on every check is due
        for _ in range(600):
            if forwarder.credentials is not first:
                break
            forwarder._stop.wait(0.05)
    assert forwarder.credentials is not first


def test_sts_refusal_is_one_clear_error(aws_world: dict[str, Any], tls: ClusterCredentials, cluster: Client) -> None:
    with enable_iam_authentication():
        forwarder = SessionTokenForwarder(
            cluster,
            worker_cert=tls.certs["worker"],
            session=aws_world["session"],
            role_arn="arn:aws:iam::123456789012:role/admin",
        )
        with pytest.raises(CredentialsError, match="AWS STS AssumeRole of arn:aws:iam::123456789012:role/admin failed"):
            forwarder.forward()


def test_a_token_sealed_to_another_clusters_workers_is_refused(
    aws_world: dict[str, Any], keyring: Keyring, cluster: Client
) -> None:
    other = issue_credentials(keyring, "acme", "c-other")
    with (
        SessionTokenForwarder(cluster, worker_cert=other.certs["worker"], session=aws_world["session"]) as forwarder,
        pytest.raises(CredentialsError, match="sealed to another cluster's worker certificate"),
    ):
        forwarder.forward()
    assert on_worker(cluster, worker_credentials) is None


@pytest.mark.slow
def test_no_credential_reaches_a_record_the_spool_a_log_line_or_a_report(
    aws_world: dict[str, Any], home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for name in ("pipeline", "distributed"):
        caplog.set_level(logging.DEBUG, logger=name)
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    tls = issue_credentials(pipeline.keyring, "acme", "c-aws")
    pipeline.close()
    settings = {"pipeline.account": "acme", "pipeline.cluster-id": "c-aws"}
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            dashboard_address=":0",
            security=tls.security(),
            scheduler_kwargs={"preload": ["pipeline.preload"]},
            # LocalCluster otherwise sets the stream handlers on distributed's logger to WARNING while it
            # runs, and pytest's capturing handlers are among them once distributed's logging is set up
            # before pytest's (whenever distributed is imported first): every line below WARNING, the
            # forwarder's included, would go unchecked
            silence_logs=False,
        ) as local,
        Client(local) as client,
        SessionTokenForwarder(
            client, worker_cert=tls.certs["worker"], session=aws_world["session"], role_arn=ROLE_ARN
        ) as forwarder,
    ):
        with enable_iam_authentication():
            assert forwarder.forward()
            assert on_worker(client, read_object, "private.txt") == "private data"
        relayed = local.scheduler.worker_plugins[PLUGIN_NAME]  # what the scheduler keeps for new workers
        logs = [line for _level, line in client.get_scheduler_logs(n=10_000)]
        logs += [line for lines in client.get_worker_logs(n=10_000).values() for _level, line in lines]
    assert forwarder.credentials is not None
    secrets = [
        aws_world["secret_access_key"],
        forwarder.credentials.secret_access_key,
        forwarder.credentials.token,
    ]

    pipeline = Pipeline.open(Settings.from_config())
    records = [r for store in pipeline.stores for r in pipeline.read_records(store, account="acme")]
    pipeline.close()
    assert {r["cluster_id"] for r in records} == {"c-aws"}  # the plugin did record the run
    report = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "report"), "--show-names"])
    assert report.exit_code == 0, report.output

    places = {
        "records": json.dumps(records, default=str),
        "log lines": "\n".join([*logs, *(r.getMessage() for r in caplog.records)]),
        "scheduler's copy of the plugin": repr(relayed),
        "report": "\n".join(p.read_text(errors="replace") for p in (tmp_path / "report").rglob("*") if p.is_file()),
    }
    files = [p for p in home.rglob("*") if p.is_file()]  # database, spool, log store, keys
    assert any("spool" in p.parts for p in home.rglob("*"))
    for secret in secrets:
        for place, text in places.items():
            assert secret not in text, (
                f"a credential leaked into the {place}: "
                + "".join(line for line in text.splitlines(True) if secret in line)[:3000]
            )
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"a credential leaked into {path}"
    assert "AWS session token forwarded to workers" in places["log lines"]  # the log was captured


def test_without_boto3_nothing_is_forwarded_unless_a_role_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now fails as if not installed
    assert issue_session_credentials() is None
    with pytest.raises(ConfigError, match="pipeline.aws.role-arn needs boto3: install dask-metadata-pipeline"):
        issue_session_credentials(role_arn=ROLE_ARN)


def test_temporary_local_credentials_without_a_role_are_one_clear_error() -> None:
    """STS refuses GetSessionToken with session credentials (an instance role, SSO): the error names the fix."""
    import boto3

    temporary = boto3.Session(
        aws_access_key_id="ASIAEXAMPLE",
        aws_secret_access_key="secret",
        aws_session_token="token",
        region_name="eu-west-1",
    )
    with pytest.raises(CredentialsError, match="temporary .* set pipeline.aws.role-arn"):
        issue_session_credentials(temporary)


@pytest.mark.slow
def test_local_credentials_that_cannot_be_resolved_stop_the_demo_with_one_line(
    aws_world: dict[str, Any], home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expired SSO login or a failing credential_process: botocore's CredentialRetrievalError escaped
    issue_session_credentials, and the demo printed its traceback, exit 1 (r29)."""
    config = tmp_path / "aws-config"
    failing = "echo 'Error loading SSO Token: Token for my-sso has expired' >&2; exit 1"
    config.write_text(f'[profile expired-sso]\ncredential_process = /bin/sh -c "{failing}"\nregion = eu-west-1\n')
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "expired-sso")
    shown = one_line(run("demo", "--tasks", "20", "--account", "acme"))
    assert shown == (
        "error: the local AWS credentials (profile expired-sso) cannot be resolved: Error when retrieving "
        "credentials from custom-process: Error loading SSO Token: Token for my-sso has expired"
    )


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        ({"AWS_PROFILE": "nowhere"}, "The config profile (nowhere) could not be found"),
        ({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY"),
    ],
    ids=["missing profile", "partial keys"],
)
def test_local_credentials_botocore_cannot_resolve_are_a_credentials_error(
    aws_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], reason: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    expected = rf"^the local AWS credentials.* cannot be resolved: {re.escape(reason)}$"
    with pytest.raises(CredentialsError, match=expected):
        issue_session_credentials()


def kept_by_the_plugin() -> str:
    """Runs on a worker: everything the credentials plugin holds, as text."""
    from distributed import get_worker

    return repr(vars(get_worker().plugins[PLUGIN_NAME]))


def test_the_plugin_neither_keeps_nor_puts_back_the_keys_a_worker_inherited(
    aws_world: dict[str, Any], tls: ClusterCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LocalCluster started where the user's long-term keys are in the environment: its workers inherit
    them. The plugin kept them beside the session token and put them back at teardown (r29)."""
    long_term = (aws_world["access_key_id"], aws_world["secret_access_key"], None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", long_term[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", long_term[1])
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", security=tls.security()) as local,
        Client(local) as client,
    ):
        assert on_worker(client, worker_credentials) == long_term
        with SessionTokenForwarder(client, worker_cert=tls.certs["worker"], session=aws_world["session"]) as f:
            assert f.forward()
        assert on_worker(client, worker_credentials)[2] == f.credentials.token
        kept = on_worker(client, kept_by_the_plugin)
        client.unregister_worker_plugin(PLUGIN_NAME)  # teardown
        after_teardown = on_worker(client, worker_credentials)
    assert long_term[1] not in kept
    assert after_teardown is None


WORKER_START = """
import os
from pathlib import Path

import dask.config


def dask_setup(worker):
    seen = Path(dask.config.get("tests.worker-environ"))
    (seen / str(os.getpid())).write_bytes(Path("/proc/self/environ").read_bytes())
"""


@pytest.mark.slow
def test_the_demos_workers_start_without_the_users_long_term_keys(
    aws_world: dict[str, Any], home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's worker processes inherited the client's environment, the user's long-term keys in it,
    before any session token was forwarded (r29). Each worker writes the environment it started with."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_world["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_world["secret_access_key"])
    preload = tmp_path / "worker_start.py"
    preload.write_text(WORKER_START)
    seen = tmp_path / "worker-environ"
    seen.mkdir()
    with dask.config.set({"distributed.worker.preload": [str(preload)], "tests.worker-environ": str(seen)}):
        result = run("demo", "--tasks", "20", "--account", "acme", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["aws_session_token"]
    started = [path.read_bytes() for path in seen.iterdir()]
    assert len(started) == 2
    for environ in started:
        assert b"AWS_EC2_METADATA_DISABLED=true" in environ  # the rest of the environment is inherited
        assert aws_world["access_key_id"].encode() not in environ
        assert aws_world["secret_access_key"].encode() not in environ
    # the client's own environment is as it was: the forwarder used the keys
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (
        aws_world["access_key_id"],
        aws_world["secret_access_key"],
    )
