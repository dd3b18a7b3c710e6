"""A password in a store's or endpoint's URL never reaches the terminal, not even in a library's error.

botocore quotes the endpoint URL in its errors (``Could not connect to the endpoint URL:
"http://user:SECRET@host/..."``), Google's clients the endpoint they could not resolve: each is
run through the real command line against a closed port on loopback.
"""

from __future__ import annotations

import socket
from pathlib import Path

import dask.config
import pytest
from click.testing import Result
from conftest import one_line, run

from pipeline.redact import first_line, mask_url, mask_urls

SECRET = "pw5ecret"


def add_account() -> Result:
    return run("accounts", "add", "--account", "acme", "--username", "ann", "--email", "ann@example.test")


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test credentials, no endpoint of boto3's own, and one attempt per call (the endpoint is closed)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_an_unreachable_archive_endpoint_is_named_without_its_password(
    home: Path, aws_credentials: None, closed_port: int
) -> None:
    assert run("init").exit_code == 0
    url = f"s3://bucket/prefix?endpoint=http://usr:{SECRET}@127.0.0.1:{closed_port}"
    with dask.config.set({"pipeline.archive.url": url}):
        line = one_line(add_account())
    assert "unreachable during write" in line and f"http://usr:***@127.0.0.1:{closed_port}/bucket/" in line
    assert SECRET not in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix?endpoint=usr:{secret}@127.0.0.1:1", "Invalid endpoint: usr:***@127.0.0.1:1"),
        ("s3:///prefix?endpoint=http://usr:{secret}@127.0.0.1:1", "got 's3:///prefix?endpoint=http://usr:***@127"),
    ],
    ids=["endpoint-without-scheme", "no-bucket"],
)
def test_a_bad_archive_url_is_one_line_without_the_endpoints_password(
    home: Path, aws_credentials: None, url: str, expected: str
) -> None:
    assert run("init").exit_code == 0
    with dask.config.set({"pipeline.archive.url": url.format(secret=SECRET)}):
        line = one_line(add_account())
    assert expected in line and SECRET not in line


def test_an_unreachable_kms_endpoint_is_named_without_its_password(
    home: Path, aws_credentials: None, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://usr:{SECRET}@127.0.0.1:{closed_port}")
    with dask.config.set({"pipeline.keys.url": "aws-kms://alias/metadata"}):
        line = one_line(run("init"))
    assert f'"http://usr:***@127.0.0.1:{closed_port}/"' in line and SECRET not in line


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("endpoint=usr:{secret}@127.0.0.1:{port}&bucket=_Default", "'usr:***@127.0.0.1:{port}/v2/entries:list"),
        ("config-endpoint=usr:{secret}@127.0.0.1:{port}", "usr:***@127.0.0.1:{port}"),
    ],
    ids=["rest-endpoint", "config-endpoint"],
)
def test_a_cloud_logging_endpoint_is_named_without_its_password(
    home: Path, closed_port: int, query: str, expected: str
) -> None:
    assert run("init").exit_code == 0
    url = f"gcp-logging://project?{query.format(secret=SECRET, port=closed_port)}"
    with dask.config.set({"pipeline.cloud-logging.url": url}):
        line = one_line(run("records", "--store", "cloud_logging"))
    assert expected.format(port=closed_port) in line and SECRET not in line


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            'Could not connect to the endpoint URL: "http://usr:pw@127.0.0.1:1/b/k%3Dv"',
            'Could not connect to the endpoint URL: "http://usr:***@127.0.0.1:1/b/k%3Dv"',
        ),
        ("lookup failed for usr:pw@127.0.0.1:1: Misformatted", "lookup failed for usr:***@127.0.0.1:1: Misformatted"),
        ("https://h/p?sig=1&token=pw and more", "https://h/p?sig=1&token=*** and more"),
        ("[field:hostname lookup error:address] mail ann@example.test", None),
        ("HTTPConnection(host='127.0.0.1', port=1): Failed to connect", None),
    ],
)
def test_mask_urls_masks_each_url_and_userinfo_in_a_text(text: str, masked: str | None) -> None:
    assert mask_urls(text) == (masked or text)
    assert first_line(OSError(f"{text}\nsecond line")) == (masked or text)


def test_mask_url_masks_a_url_in_its_query() -> None:
    assert mask_url("s3://b/p?endpoint=http://usr:pw@h:1&region=r") == "s3://b/p?endpoint=http://usr:***@h:1&region=r"
    assert mask_url("s3://b/p?endpoint=http://h:1&region=r") == "s3://b/p?endpoint=http://h:1&region=r"
