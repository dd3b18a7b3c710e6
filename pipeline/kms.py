"""Master key in AWS KMS (``pipeline.keys.url = aws-kms://KEY-ID-OR-ALIAS``).

Data keys are wrapped with KMS ``Encrypt`` under an encryption context that
carries the wrap's AAD, so a wrapped key moved to another subject fails to
unwrap. The master key never leaves KMS. Credentials and region come from
boto3's usual chain (environment, profile, instance role); ``AWS_ENDPOINT_URL``
points it elsewhere (tests use moto's server on loopback).
"""

from __future__ import annotations

from urllib.parse import urlparse

from pipeline.errors import ConfigError, KeyringError
from pipeline.keys import KeyProvider
from pipeline.redact import mask_url

__all__ = ["AWSKMSKeyProvider"]


class AWSKMSKeyProvider(KeyProvider):
    """Wrap and unwrap data keys with one KMS key; rotation is KMS's own."""

    def __init__(self, url: str) -> None:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{mask_url(url)}: AWS KMS needs boto3; install dask-metadata-pipeline[aws]") from exc
        parsed = urlparse(url)
        self.key_id = (parsed.netloc + parsed.path).strip("/")
        if not self.key_id:
            raise ConfigError(
                f"pipeline.keys.url {mask_url(url)!r} names no KMS key (aws-kms://KEY-ID or aws-kms://alias/NAME)"
            )
        self.url = url
        self._errors = (BotoCoreError, ClientError)
        self._kms = boto3.client("kms")
        try:
            self._version = self._rotations() + 1
        except self._errors as exc:
            raise KeyringError(f"AWS KMS key {self.key_id!r} is not usable: {exc}") from exc

    def _rotations(self) -> int:
        pages = self._kms.get_paginator("list_key_rotations").paginate(KeyId=self.key_id)
        return sum(len(page.get("Rotations", [])) for page in pages)

    def current_version(self) -> int:
        return self._version

    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[int, bytes]:
        try:
            blob = self._kms.encrypt(KeyId=self.key_id, Plaintext=plaintext, EncryptionContext={"aad": aad.hex()})
        except self._errors as exc:
            raise KeyringError(f"AWS KMS key {self.key_id!r} cannot encrypt: {exc}") from exc
        return self._version, blob["CiphertextBlob"]

    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        try:
            reply = self._kms.decrypt(KeyId=self.key_id, CiphertextBlob=blob, EncryptionContext={"aad": aad.hex()})
        except self._errors as exc:
            raise KeyringError(
                f"AWS KMS key {self.key_id!r} does not open this keyring (wrong key or context): {exc}"
            ) from exc
        return bytes(reply["Plaintext"])

    def rotate(self) -> int:
        try:
            self._kms.rotate_key_on_demand(KeyId=self.key_id)
            self._version = self._rotations() + 1
        except self._errors as exc:
            raise KeyringError(f"AWS KMS key {self.key_id!r} cannot rotate: {exc}") from exc
        return self._version
