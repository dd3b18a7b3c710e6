"""Master key in AWS KMS (``pipeline.keys.url = aws-kms://KEY-ID-OR-ALIAS``).

Each master key version is a KMS key of its own: the URL's key is version 1,
a rotation creates a new key, and retiring a version schedules its key's
deletion (KMS's shortest waiting period, 7 days), after which nothing wrapped
under it — in a database backup or anywhere — can be unwrapped. The keyring
records which key holds which version (``master_keys.key_ref``). So the URL's
key need not outlive version 1: the URL opens the keyring while it names any of
its keys, or the first one after KMS deleted it; an alias in the URL is moved
to each new version's key, as KMS deletes an alias with its key.

Data keys are wrapped with KMS ``Encrypt`` under an encryption context that
carries the wrap's AAD, so a wrapped key moved to another subject fails to
unwrap. The master key never leaves KMS. Credentials and region come from
boto3's usual chain (environment, profile, instance role); ``AWS_ENDPOINT_URL``
points it elsewhere (tests use moto's server on loopback).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from urllib.parse import urlparse

from pipeline.awsclient import aws_client, error_code
from pipeline.errors import ConfigError, KeyringError, KeyServiceError
from pipeline.keys import KeyProvider
from pipeline.redact import mask_url

__all__ = ["AWSKMSKeyProvider"]

#: days KMS waits before deleting a retired version's key (its minimum)
DELETION_WINDOW_DAYS = 7

logger = logging.getLogger(__name__)


class AWSKMSKeyProvider(KeyProvider):
    """Wrap and unwrap data keys with KMS keys, one per master key version."""

    destroyed_after = timedelta(days=DELETION_WINDOW_DAYS)  # CancelKeyDeletion restores a key until then

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.key_id = (parsed.netloc + parsed.path).strip("/")
        if not self.key_id:
            raise ConfigError(
                f"pipeline.keys.url {mask_url(url)!r} names no KMS key (aws-kms://KEY-ID or aws-kms://alias/NAME)"
            )
        self.url = url
        self._kms, self._errors = aws_client("kms", url, "AWS KMS")
        #: the URL's key, or None with why: KMS has no such key (version 1's, deleted after its retirement?)
        self._root: str | None = None
        self._unusable: str | None = None
        try:
            self._root = self._kms.describe_key(KeyId=self.key_id)["KeyMetadata"]["Arn"]
        except self._errors as exc:
            self._unusable = f"AWS KMS key {self.key_id!r} is not usable: {exc}"
            if error_code(exc) != "NotFoundException":
                raise KeyringError(self._unusable) from exc
        self._keys: dict[int, str] = {1: self._root} if self._root else {}
        self._current = 1

    def key_ref(self, version: int) -> str | None:
        return self._keys.get(version)

    def adopt(self, key_refs: dict[int, str | None], current: int, *, first: str | None) -> None:
        if first is None:
            raise KeyringError("the keyring records no KMS key for master key version 1")
        if self._root is None and self.key_id not in (first, first.rsplit("/", 1)[-1]):
            current_key = key_refs.get(current)
            raise KeyringError(f"{self._unusable} (this keyring's current master key is aws-kms://{current_key})")
        if self._root is not None and self._root != first and self._root not in key_refs.values():
            raise KeyringError(f"AWS KMS key {self.key_id!r} does not open this keyring (it was made with {first!r})")
        prefix = first.rsplit("/", 1)[0] + "/"  # arn:aws:kms:REGION:ACCOUNT:key/
        foreign = [ref for ref in key_refs.values() if ref and not ref.startswith(prefix)]
        if foreign:  # a database edit must not redirect wraps to someone else's key
            raise KeyringError(f"keyring names master keys outside {prefix}: {', '.join(foreign)}")
        self._keys = {v: ref for v, ref in key_refs.items() if ref}
        self._current = current

    def current_version(self) -> int:
        return self._current

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def _key(self, version: int) -> str:
        try:
            return self._keys[version]
        except KeyError:
            why = self._unusable or f"AWS KMS master key version {version} is retired or unknown"
            raise KeyringError(why) from None

    def wrap(self, plaintext: bytes, aad: bytes, version: int | None = None) -> tuple[int, bytes]:
        version = version or self._current
        key = self._key(version)
        try:
            blob = self._kms.encrypt(KeyId=key, Plaintext=plaintext, EncryptionContext={"aad": aad.hex()})
        except self._errors as exc:
            raise KeyServiceError(f"AWS KMS key {key!r} cannot encrypt: {exc}") from exc
        return version, blob["CiphertextBlob"]

    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        # the blob names its key; a version this keyring never recorded (KMS's own rotation
        # before versions were keys of their own) is opened by that key
        key = self._keys.get(version, self.key_id)
        try:
            reply = self._kms.decrypt(KeyId=key, CiphertextBlob=blob, EncryptionContext={"aad": aad.hex()})
        except self._errors as exc:
            if error_code(exc) in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise KeyringError(
                    f"AWS KMS key {key!r} does not open this keyring (wrong key or context): {exc}"
                ) from exc
            raise KeyServiceError(f"AWS KMS key {key!r} did not decrypt: {exc}") from exc
        return bytes(reply["Plaintext"])

    def stage(self) -> int:
        version = max(self._keys, default=0) + 1
        try:
            meta = self._kms.create_key(Description=f"metadata-pipeline master key version {version} ({self.key_id})")
        except self._errors as exc:
            raise KeyringError(f"AWS KMS cannot create master key version {version}: {exc}") from exc
        self._keys[version] = meta["KeyMetadata"]["Arn"]
        return version

    def activate(self, version: int) -> None:
        key = self._key(version)
        self._current = version
        if self.key_id.startswith("alias/"):  # KMS deletes an alias with its key: it follows the current one
            try:
                self._kms.update_alias(AliasName=self.key_id, TargetKeyId=key)
            except self._errors as exc:
                logger.warning(
                    "AWS KMS alias %r still names an older master key (%s); once that key is retired and "
                    "deleted, set pipeline.keys.url to aws-kms://%s",
                    self.key_id,
                    exc,
                    key,
                )

    def destroy(self, version: int) -> None:
        if version == self._current:
            raise KeyringError(f"master key version {version} is current and cannot be retired")
        key = self._keys.pop(version, None)
        if key is None:
            return
        key_id = key.rsplit("/", 1)[-1]  # the id: accepted everywhere (moto takes no ARN here)
        try:
            self._kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=DELETION_WINDOW_DAYS)
        except self._errors as exc:
            if not self._deleting(key_id):
                self._keys[version] = key
                raise KeyringError(f"AWS KMS key {key!r} cannot be scheduled for deletion: {exc}") from exc

    def _deleting(self, key_id: str) -> bool:
        """The key is deleted or waits for it: an earlier pass scheduled it, then stopped before recording so."""
        try:
            return self._kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
        except self._errors as exc:
            return error_code(exc) == "NotFoundException"
