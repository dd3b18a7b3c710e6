"""One way to get a boto3 client: a missing ``aws`` extra is one ConfigError naming it.

Credentials and region come from boto3's usual chain (environment, profile,
instance role); ``AWS_ENDPOINT_URL`` points it elsewhere (tests use moto's
server on loopback).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.redact import mask_url

__all__ = ["aws_client"]


def aws_client(service: str, url: str, what: str) -> tuple[Any, tuple[type[Exception], ...]]:
    """A boto3 client for ``service`` and the errors its calls raise.

    :param what: the thing that needs it, for the message (``"AWS KMS"``, ``"an S3 witness"``)
    :raises ConfigError: boto3 is not installed
    """
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{mask_url(url)}: {what} needs boto3; install dask-metadata-pipeline[aws]") from exc
    return boto3.client(service), (BotoCoreError, ClientError)
