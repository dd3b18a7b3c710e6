"""``metadata-pipeline serve`` as a process: API and retention together, TLS, a clean SIGTERM stop."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import httpx
import pytest
from controlplane import serve_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.config import Settings
from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore

pytestmark = pytest.mark.slow


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with serve_process(tmp_path / "home", "--json") as served:
        assert served.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{served.url}/v1/health").json() == {"status": "ok"}
        out, err = served.stop()
    assert served.proc.returncode == 0, err
    assert "API and retention service" in err
    assert json.loads(out)["stopped"] is True
    assert "Traceback" not in err


def test_serve_writes_the_ingest_summary_of_the_hour_in_progress_as_it_stops(tmp_path: Path) -> None:
    """It was written hourly only: what a serve stopped (or restarted) within the hour took since the last
    summary, and the refusals past each token's first 100, were in no entry."""
    from conftest import make_record

    from pipeline.intake import load_public_key, seal_batch

    home = tmp_path / "home"
    with serve_process(home, "--json") as served:
        with dask.config.set({"pipeline.home": str(home)}):
            pipeline = Pipeline.open(Settings.from_config())
            admin = TokenStore(pipeline).create("admin", user="ops").token
            pipeline.close()
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {admin}"}) as client:
            cluster = client.post("/v1/clusters", json={"account": "acme"}).json()
        records = [make_record(account="acme", cluster_id=cluster["cluster_id"]) for _ in range(3)]
        sealed = seal_batch(load_public_key(cluster["intake_public_key"]), "b1", records)
        answer = httpx.post(
            f"{served.url}/v1/ingest", content=sealed, headers={"Authorization": f"Bearer {cluster['token']}"}
        )
        assert answer.status_code == 202, answer.text
        served.stop()
    assert served.proc.returncode == 0
    with dask.config.set({"pipeline.home": str(home)}):
        pipeline = Pipeline.open(Settings.from_config())
        summaries = [e.details["records"] for e in pipeline.audit.entries() if e.action == "ingest.summary"]
    assert summaries == [{"long_term": {"cluster_jobs": 3}, "cloud_logging": {"cluster_jobs": 3}}]


def test_serve_carries_out_an_erasure_filed_through_its_api(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with serve_process(home, "--json", service__requests_interval="1s") as served:
        with dask.config.set({"pipeline.home": str(home)}):
            pipeline = Pipeline.open(Settings.from_config())
            admin = TokenStore(pipeline).create("admin", user="privacy").token
            pipeline.close()
        client = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {admin}"})
        filed = client.post("/v1/erasure-requests", json={"account": "acme", "reason": "ticket 1"}).json()
        deadline = time.monotonic() + 120  # a bound on waiting for the 1 s schedule, not a timing check
        while client.get(f"/v1/erasure-requests/{filed['request_id']}").json()["state"] != "completed":
            assert time.monotonic() < deadline, "the retention service in serve never processed the request"
            time.sleep(0.2)
        client.close()
        out, _err = served.stop()
    assert "requests" in {run["job"] for run in json.loads(out)["runs"]}


def test_serve_speaks_tls_when_cert_and_key_are_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    with serve_process(tmp_path / "home", server__tls_cert=str(cert), server__tls_key=str(key)) as served:
        url = served.url
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{url}/v1/health", verify=trusted).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/health")  # not trusted by default: it really is the certificate given
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url.replace("https://", "http://") + "/v1/health")
        _untrusted_names_a_missing_trust_folder(url, tmp_path, monkeypatch)


def _untrusted_names_a_missing_trust_folder(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL skips an ``SSL_CERT_DIR`` that names no folder without a word: the command line and a scheduler's
    delivery said only that the certificate was not trusted (r40). A folder that exists is not named."""
    import certifi
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from pipeline.apiclient import ApiClient, Credentials
    from pipeline.delivery import HTTPDelivery
    from pipeline.errors import ApiError, StoreUnavailable
    from pipeline.spool import SpooledBatch

    cases = [(tmp_path / "no-such-certs", None, True), (tmp_path, None, False)]
    cases.append((tmp_path / "no-such-certs", certifi.where(), False))  # the file wins: the folder is not read (r46)
    for folder, bundle, named in cases:
        monkeypatch.setenv("SSL_CERT_DIR", str(folder))
        if bundle is None:
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        else:
            monkeypatch.setenv("SSL_CERT_FILE", bundle)
        with ApiClient(Credentials(url, "")) as client, pytest.raises(ApiError) as refused:
            client.json("GET", "/v1/health")
        delivery = HTTPDelivery(url, "mp_token", X25519PrivateKey.generate().public_key())
        with pytest.raises(StoreUnavailable) as unavailable:
            delivery.deliver(SpooledBatch("b-1", b"sealed"))
        delivery.close()
        for error in (refused.value, unavailable.value):
            assert "CERTIFICATE_VERIFY_FAILED" in str(error)
            assert str(error).endswith(f" (SSL_CERT_DIR names no folder: {folder})") == named, error


@pytest.mark.parametrize(
    ("setting", "value", "line"),
    [
        (
            "SERVER__TLS_CERT",
            "cert",
            "error: pipeline.server.tls-cert and pipeline.server.tls-key must be set together",
        ),
        ("SERVICE__RETENTION_CRON", "'0 0 * * */0'", "error: pipeline.service.retention-cron: '0 0 * * */0': "),
        ("SERVER__HOST", "None", "error: pipeline.server.host: must name an address to listen on"),
        ("SERVER__HOST", "127.0.0.l", "error: pipeline.server.host: '127.0.0.l' is no address: "),
        (
            "SERVER__HOST",
            "192.0.2.1",
            "error: pipeline.server.host/port: cannot listen on 192.0.2.1:8800 (cannot assign",
        ),
    ],
)
def test_serve_refused_a_setting_exits_2_naming_it_and_makes_nothing(
    setting: str, value: str, line: str, tmp_path: Path
) -> None:
    """A refused TLS pair, schedule or address was found after a new home's master key, audit signing key and
    database were made (r44)."""
    cert, _key = self_signed(tmp_path)
    home = tmp_path / "home"
    env = {"DASK_PIPELINE__HOME": str(home), f"DASK_PIPELINE__{setting}": str(cert) if value == "cert" else value}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    [said] = result.stderr.strip().splitlines()
    assert said.startswith(line), said
    assert not home.exists()


def test_serve_on_a_taken_port_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {
            "DASK_PIPELINE__HOME": str(tmp_path / "home"),
            "DASK_PIPELINE__SERVER__HOST": "127.0.0.1",
            "DASK_PIPELINE__SERVER__PORT": str(port),
        }
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "serve", "--no-retention"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: pipeline.server.host/port: cannot listen on 127.0.0.1:{port} (address already in use)"
    ]
    assert not (tmp_path / "home").exists()  # found before a new home's keys and database are made (r49)


def test_serve_over_tls_stops_at_once_while_a_client_holds_an_idle_connection(tmp_path: Path) -> None:
    """asyncio waits up to 30 s for a TLS peer's close_notify when a connection closes: an idle keep-alive
    connection (a cluster's client between batches) held every stop of ``serve`` that long."""
    cert, key = self_signed(tmp_path)
    with serve_process(tmp_path / "home", server__tls_cert=str(cert), server__tls_key=str(key)) as served:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(f"{served.url}/v1/health").status_code == 200  # its connection is kept alive
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            served.proc.wait(120)
            took = time.monotonic() - started
        served.stop()
    assert served.proc.returncode == 0
    assert took < 20, f"serve took {took:.0f} s to stop"  # asyncio's TLS shutdown timeout is 30 s
