"""One way to get a boto3 client: a missing ``aws`` extra is one ConfigError naming it.

Credentials and region come from boto3's usual chain (environment, profile,
instance role); ``AWS_ENDPOINT_URL`` points it elsewhere (tests use moto's
server on loopback).

botocore's errors quote the endpoint URL (``Could not connect to the endpoint URL:
"http://user:SECRET@host/..."``): :func:`mask_errors` makes a client's errors
show it masked, whatever message a caller builds from them.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.redact import first_line, mask_url, mask_urls

__all__ = ["aws_client", "error_code", "mask_errors"]


def aws_client(service: str, url: str, what: str) -> tuple[Any, tuple[type[Exception], ...]]:
    """A boto3 client for ``service`` and the errors its calls raise.

    :param what: the thing that needs it, for the message (``"AWS KMS"``, ``"an S3 witness"``)
    :raises ConfigError: boto3 is not installed, or its configuration (``AWS_ENDPOINT_URL``) is invalid
    """
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{mask_url(url)}: {what} needs boto3; install dask-metadata-pipeline[aws]") from exc
    try:
        client = boto3.client(service)
    except (BotoCoreError, ValueError) as exc:  # ValueError: "Invalid endpoint: URL"
        raise ConfigError(f"{mask_url(url)}: {what}: {first_line(exc)}") from exc
    return mask_errors(client), (BotoCoreError, ClientError)


def mask_errors(client: Any) -> Any:
    """``client``, its calls' errors now showing every URL through :func:`~pipeline.redact.mask_urls`."""
    client.meta.events.register("after-call-error", _mask_error)
    return client


def _mask_error(exception: BaseException, **_: Any) -> None:
    """botocore's ``after-call-error`` hook: the message is rewritten before the error propagates."""
    exception.args = tuple(mask_urls(arg) if isinstance(arg, str) else arg for arg in exception.args)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``NotFoundException``, ``SlowDown``); "" for others."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


#: AWS error codes of a service that is there but busy or failing: worth another try
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"}
)


def transient(exc: BaseException) -> bool:
    """Whether an AWS call's error is the service's being away or busy (retry later), not a refusal: no answer
    at all (a connection error, a timeout), a 5xx, or a throttling code. A HEAD's error has no body: its code
    is the status ("503"), so a 5xx is judged by its status."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return True
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error_code(exc) in _TRANSIENT_CODES or status >= 500
