"""Names the control plane must print back (accounts, users, cluster names), sealed at rest.

Tables index tokens and clusters by HMAC refs only; the names themselves are
AES-256-GCM ciphertext bound to their row (the AAD) and sealed under the data
key of the person they name: the account's key, or the user's for a member
token. An erasure that destroys those keys therefore shreds the names too, in
every copy of the database: a token of an erased account or user no longer
opens and stops working, and a backup keeps nothing readable once the master
key version that wrapped the key retires. Staff (admin tokens) belong to no
account and are no data subject here: their names use a keyring key of their own.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import KeyringError, UnknownAccountError
from pipeline.keys import Keyring

__all__ = ["NameBox"]

STAFF_KEY_ID = "api-names"
_STAFF_VERSION = 0  # data key versions start at 1
_NONCE = 12


class NameBox:
    """Seal and open small JSON documents of names, each bound to one row id and one person's key."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    @functools.cached_property
    def _staff(self) -> AESGCM:
        return AESGCM(self.keyring.named_key(STAFF_KEY_ID, "names"))

    def seal(
        self,
        row_id: str,
        names: dict[str, Any],
        *,
        subject_ref: str | None,
        user_ref: str | None = None,
        create: bool = True,
    ) -> str:
        """``<key version>:<base64 nonce || ciphertext>`` under the key of ``subject_ref``/``user_ref``.

        :raises KeyringError, UnknownAccountError: without ``create``, that key is not live (erased)
        """
        if subject_ref is None:
            version, cipher = _STAFF_VERSION, self._staff
        else:
            version, cipher = self.keyring.cipher(subject_ref, user_ref, create=create)
        nonce = os.urandom(_NONCE)
        blob = nonce + cipher.encrypt(nonce, json.dumps(names).encode(), _aad(row_id, version))
        return f"{version}:{base64.b64encode(blob).decode()}"

    def open(
        self, row_id: str, sealed: str, *, subject_ref: str | None, user_ref: str | None = None
    ) -> dict[str, Any] | None:
        """The names, or ``None`` once the key that sealed them was destroyed (an erasure).

        :raises KeyringError: the value was altered or moved to another row
        """
        if subject_ref is None:
            return _opened(row_id, sealed, self._staff)
        try:  # checked against the database, so an erasure by another process counts at once
            live, _cipher = self.keyring.cipher(subject_ref, user_ref, create=False)
        except (KeyringError, UnknownAccountError):
            return None
        return self.open_at(row_id, sealed, subject_ref=subject_ref, user_ref=user_ref, live_version=live)

    def open_at(
        self, row_id: str, sealed: str, *, subject_ref: str | None, user_ref: str | None, live_version: int | None
    ) -> dict[str, Any] | None:
        """:meth:`open` with the key's live version as the caller read it beside the row, in the same
        query (``None``: destroyed or never made), so an erasure counts at once without a read of its own.

        :raises KeyringError: the value was altered or moved to another row
        """
        if subject_ref is None:
            return _opened(row_id, sealed, self._staff)
        if live_version is None or live_version != int(sealed.partition(":")[0]):
            return None  # erased (then perhaps back under a new key)
        try:
            return _opened(row_id, sealed, self.keyring.cipher_for(subject_ref, user_ref, live_version, checked=True))
        except (KeyringError, UnknownAccountError):  # destroyed since the caller's read
            return None


def _opened(row_id: str, sealed: str, cipher: AESGCM) -> dict[str, Any]:
    version_text, _, encoded = sealed.partition(":")
    blob = base64.b64decode(encoded)
    try:
        return dict(json.loads(cipher.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(row_id, int(version_text)))))
    except InvalidTag:
        raise KeyringError(f"sealed names of {row_id!r} do not open: altered or moved") from None


def _aad(row_id: str, version: int) -> bytes:
    return f"names|{row_id}|{version}".encode()
