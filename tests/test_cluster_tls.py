"""Per-cluster TLS credentials: issued, sealed under the account's key, used by a real LocalCluster."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml
from click.testing import CliRunner
from controlplane import serving
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_pem_private_key
from distributed import Client, LocalCluster, Worker
from distributed.security import Security
from sqlalchemy import select, update

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.db import cluster_credentials
from pipeline.errors import CredentialsError
from pipeline.records import utcnow
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline
from pipeline.security.tls import (
    ClusterCredentials,
    cluster_security,
    dask_tls_config,
    issue_credentials,
    load_credentials,
)
from pipeline.server.clusters import cluster_config

ACCOUNT = "acme-secret-account"


def _secret_fragments(credentials: ClusterCredentials) -> list[bytes]:
    """What would betray a private key on disk: its PEM body lines and its raw DER and scalar bytes."""
    fragments = []
    for pem in credentials.keys.values():
        fragments += [line.encode() for line in pem.splitlines() if not line.startswith("-----")]
        key = load_pem_private_key(pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        fragments.append(key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))
        fragments.append(key.private_numbers().private_value.to_bytes(32, "big"))
    return fragments


def test_each_role_gets_a_short_lived_p256_certificate_of_the_cluster_ca(pipeline: Pipeline) -> None:
    credentials = issue_credentials(pipeline.keyring, ACCOUNT, "c-one", hosts=["sched.example", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(credentials.ca_cert.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("scheduler", "worker", "client"):
        cert = x509.load_pem_x509_certificate(credentials.certs[role].encode())
        cert.verify_directly_issued_by(ca)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
        assert cert.not_valid_after_utc - utcnow() <= timedelta(days=7)
        assert ACCOUNT not in cert.subject.rfc4514_string()  # certificates are not encrypted: no name in them
    san = x509.load_pem_x509_certificate(credentials.certs["scheduler"].encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert {"localhost", "sched.example"} <= set(san.value.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")} <= set(
        san.value.get_values_for_type(x509.IPAddress)
    )


def test_the_stored_row_holds_no_key_certificate_or_name_in_clear(pipeline: Pipeline) -> None:
    credentials = issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    assert load_credentials(pipeline.keyring, "c-one") == credentials
    with pipeline.keyring.engine.connect() as conn:
        row = conn.execute(select(cluster_credentials)).one()
    stored = b"|".join(str(value).encode() if not isinstance(value, bytes) else value for value in row)
    cert_body = credentials.certs["client"].splitlines()[1].encode()
    for secret in [*_secret_fragments(credentials), cert_body, ACCOUNT.encode()]:
        assert secret not in stored


def test_a_cluster_has_one_set_of_credentials(pipeline: Pipeline) -> None:
    issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    with pytest.raises(CredentialsError, match="cluster 'c-one' already has TLS credentials"):
        issue_credentials(pipeline.keyring, "mallory", "c-one")
    with pytest.raises(CredentialsError, match="no TLS credentials were issued for cluster 'c-two'"):
        load_credentials(pipeline.keyring, "c-two")


def test_credentials_moved_onto_another_cluster_do_not_open(pipeline: Pipeline) -> None:
    """An attacker with write access to the table swaps their cluster's sealed bundle onto a victim's row."""
    issue_credentials(pipeline.keyring, ACCOUNT, "victim")
    issue_credentials(pipeline.keyring, ACCOUNT, "attacker")
    with pipeline.keyring.engine.begin() as conn:
        sealed = conn.execute(
            select(cluster_credentials.c.sealed).where(cluster_credentials.c.cluster_id == "attacker")
        ).scalar_one()
        conn.execute(
            update(cluster_credentials).where(cluster_credentials.c.cluster_id == "victim").values(sealed=sealed)
        )
    with pytest.raises(CredentialsError, match="cluster 'victim' were altered or moved"):
        load_credentials(pipeline.keyring, "victim")


def test_erasing_the_account_destroys_its_clusters_credentials(pipeline: Pipeline) -> None:
    issue_credentials(pipeline.keyring, ACCOUNT, "c-erased")
    issue_credentials(pipeline.keyring, "globex", "c-kept")
    file_request(pipeline, ACCOUNT, reason="test")
    [done] = process_pending(pipeline)
    assert done.state == "completed"
    with pytest.raises(CredentialsError, match="'c-erased' were destroyed with their account's data key"):
        cluster_security(pipeline.keyring, "c-erased")
    assert load_credentials(pipeline.keyring, "c-kept").cluster_id == "c-kept"  # another account is untouched


def test_private_keys_reach_openssl_without_any_file_being_written(pipeline: Pipeline) -> None:
    """distributed's own Security writes in-memory keys to a temporary directory; ours writes no file."""
    credentials = issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    opened_for_writing: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if watching[0] and event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes:
                opened_for_writing.append(str(path))

    sys.addaudithook(hook)

    def written_while(security: Security) -> list[str]:
        opened_for_writing.clear()
        watching[0] = True
        try:
            security.get_listen_args("scheduler")
            security.get_listen_args("worker")
            security.get_connection_args("client")
        finally:
            watching[0] = False
        return list(opened_for_writing)

    ours = credentials.security()
    theirs = Security(**{name: getattr(ours, name) for name in Security.__slots__ if name != "extra_conn_args"})
    assert written_while(theirs)  # the check sees distributed's temporary key files ...
    assert written_while(ours) == []  # ... and ours writes none


def test_without_memfd_keys_pass_through_a_private_temporary_file_removed_after(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the OS has no anonymous memory files (macOS), a 0600 file holds a key only while OpenSSL reads it."""
    credentials = issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    modes: list[int] = []
    original = ssl.SSLContext.load_cert_chain

    def load_cert_chain(self: ssl.SSLContext, certfile: str, keyfile: str | None = None, password: None = None) -> None:
        modes.append(stat.S_IMODE(os.stat(keyfile or certfile).st_mode))
        original(self, certfile, keyfile)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)
    credentials.security().get_listen_args("scheduler")
    assert modes == [0o600]
    assert list(scratch.iterdir()) == []


def test_expired_credentials_are_refused_with_the_date(pipeline: Pipeline) -> None:
    issued_at = utcnow() - timedelta(days=8)
    issue_credentials(pipeline.keyring, ACCOUNT, "c-old", now=issued_at, validity=timedelta(days=7))
    with pytest.raises(CredentialsError, match=r"cluster 'c-old' expired at .*; register the cluster again"):
        cluster_security(pipeline.keyring, "c-old")


#: a refused asynchronous Client leaves distributed's own un-awaited connect coroutine behind: its noise, not ours
REFUSALS = pytest.mark.filterwarnings(
    "ignore:coroutine 'wait_for' was never awaited:RuntimeWarning",
    "ignore::pytest.PytestUnraisableExceptionWarning",
)


def connect(address: str, security: Security | None = None) -> None:
    """Connect a client and leave: on a loop of its own in this thread, so a refusal starts no IO-loop thread.

    (Each refused synchronous ``Client`` starts and abandons a loop thread; under load the next one
    sometimes did not start within distributed's 10 s.)
    """

    async def attempt() -> None:
        async with Client(address, security=security, timeout="3s", asynchronous=True):
            pass

    try:
        asyncio.run(attempt())
    finally:
        gc.collect()  # the left-behind coroutine is reported now, inside the test that expects it


@pytest.mark.slow
@REFUSALS
def test_only_a_client_holding_this_clusters_credentials_computes(pipeline: Pipeline) -> None:
    issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    issue_credentials(pipeline.keyring, ACCOUNT, "c-other")
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address=":0",
        security=cluster_security(pipeline.keyring, "c-one"),
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        with Client(address, security=cluster_security(pipeline.keyring, "c-one", roles=["client"])) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6

        stranger = Security.temporary()
        refused = {
            "another cluster's credentials": cluster_security(pipeline.keyring, "c-other", roles=["client"]),
            "a self-signed certificate": stranger,
            # trusts the scheduler (the CA certificate is public) but has no certificate of this CA
            "a foreign certificate": Security(
                require_encryption=True,
                tls_ca_file=load_credentials(pipeline.keyring, "c-one").ca_cert,
                tls_client_cert=stranger.tls_client_cert,
                tls_client_key=stranger.tls_client_key,
            ),
        }
        for what, security in refused.items():
            with pytest.raises(OSError, match="TLS|SSL"):
                connect(address, security)
                pytest.fail(f"a client with {what} was let in")
        with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):  # no credentials at all
            connect(address)
        with pytest.raises(OSError, match="Connection reset|closed"):  # plain TCP to the TLS port
            connect(address.replace("tls://", "tcp://"))
        assert list(cluster.scheduler.clients) == ["fire-and-forget"]  # nobody else got in

        async def join(security: Security) -> None:
            async with Worker(address, security=security, death_timeout="3s"):
                pass

        with pytest.raises(TimeoutError):  # a worker of another cluster cannot join either
            asyncio.run(join(cluster_security(pipeline.keyring, "c-other")))
        assert len(cluster.scheduler.workers) == 1


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dask config (as a YAML file holds it) as the dotted keys ``dask.config.set`` merges."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.slow
@REFUSALS
def test_a_cluster_configured_by_dask_config_alone_runs_over_tls(pipeline: Pipeline) -> None:
    """What a remote cluster gets from `clusters create`: plain distributed, TLS from its config."""
    credentials = issue_credentials(pipeline.keyring, ACCOUNT, "c-one")
    with (
        dask.config.set(dotted(dask_tls_config(credentials.to_json()))),
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
    ):
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
    with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):  # the same address without the config
        connect(cluster.scheduler_address)


@pytest.mark.slow
def test_demo_runs_over_tls_and_leaves_no_private_key_in_clear_on_disk(tmp_path: Path) -> None:
    """The whole demo in its own process, its HOME and TMPDIR inside tmp_path; then grep every file."""
    root = tmp_path / "run"
    (root / "home").mkdir(parents=True)
    (root / "tmp").mkdir()
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "DASK_PIPELINE__HOME": str(root / "home" / "pipeline"),
        "DASK_TEMPORARY_DIRECTORY": str(root / "tmp"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"),
        "AWS_CONFIG_FILE": str(root / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(name, None)
    started = time.time()
    text = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--tasks", "60", "--account", ACCOUNT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "cluster ran over TLS (tls://127.0.0.1:" in text
    assert "no local AWS credentials: workers had none" in text
    cluster_id = text.split()[1].rstrip(":")

    with dask.config.set({"pipeline.home": str(root / "home" / "pipeline")}):
        pipeline = Pipeline.open(Settings.from_config())
    credentials = load_credentials(pipeline.keyring, cluster_id)
    pipeline.close()
    fragments = _secret_fragments(credentials)
    scanned = 0
    for base in (root, Path(os.environ.get("TMPDIR", "/tmp"))):
        for path, data in _files_written_since(base, started):
            scanned += 1
            for fragment in fragments:
                assert fragment not in data, f"a private key of cluster {cluster_id} is in clear in {path}"
            if base == root:
                assert ACCOUNT.encode() not in data, f"the account name is in clear in {path}"
    assert scanned >= 3  # the database, the master key, the log store at least


def _files_written_since(base: Path, started: float) -> Iterator[tuple[Path, bytes]]:
    """Every regular file under ``base`` changed since ``started``, with its content (vanished files skipped)."""
    for dirpath, _dirnames, filenames in os.walk(base):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                info = path.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_mtime >= started - 1 and info.st_size < 50_000_000:
                    yield path, path.read_bytes()
            except OSError:
                continue


@pytest.mark.slow
@REFUSALS
def test_a_registered_cluster_gets_its_credentials_once_and_runs_over_them(home: Path) -> None:
    """`POST /v1/clusters` returns the credentials; `clusters create` writes them as dask config for
    plain distributed; another registration's client certificate is refused."""
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    with serving(pipeline) as plane, plane.member(ACCOUNT, "ann") as ann:
        first, second = (ann.post("/v1/clusters", json={"account": ACCOUNT}).json() for _ in range(2))
        listed = ann.get("/v1/clusters").json()
    assert set(first["tls"]) == {
        "ca_cert",
        *(f"{role}_{part}" for role in ("scheduler", "worker", "client") for part in ("cert", "key")),
        "not_after",
    }
    assert all("tls" not in cluster for cluster in listed)  # shown once, at registration
    assert ClusterCredentials.from_json(first["cluster_id"], first["tls"]) == load_credentials(
        pipeline.keyring, first["cluster_id"]
    )

    out_dir = home.parent / "cluster"
    printed = CliRunner().invoke(main, ["clusters", "create", "--account", ACCOUNT, "--out", str(out_dir)])
    assert printed.exit_code == 0, printed.output
    created = yaml.safe_load((out_dir / "scheduler.yaml").read_text())
    stored = load_credentials(pipeline.keyring, created["pipeline"]["cluster-id"])
    assert created["distributed"]["comm"]["tls"]["ca-file"] == stored.ca_cert
    assert created["distributed"]["comm"]["require-encryption"] is True
    pipeline.close()

    distributed_config = {"distributed": cluster_config(first)["distributed"]}
    with (
        dask.config.set(dotted(distributed_config)),
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
    ):
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2]).result() == 3
        intruder = ClusterCredentials.from_json(second["cluster_id"], second["tls"]).security(["client"])
        with pytest.raises(OSError, match="TLS|SSL"):
            connect(cluster.scheduler_address, intruder)
