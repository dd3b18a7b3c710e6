"""Names the control plane must print back (accounts, users, cluster names), sealed at rest.

Tables index tokens and clusters by HMAC refs only; the names themselves are
kept as AES-256-GCM ciphertext under a keyring key of their own, bound to the
row they belong to (the AAD), so a sealed value copied to another row fails.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import KeyringError
from pipeline.keys import Keyring

__all__ = ["NameBox"]

NAMES_KEY_ID = "api-names"
_NONCE = 12


class NameBox:
    """Seal and open small JSON documents of names, each bound to one row id."""

    def __init__(self, keyring: Keyring) -> None:
        self._cipher = AESGCM(keyring.named_key(NAMES_KEY_ID, "names"))

    def seal(self, row_id: str, names: dict[str, Any]) -> str:
        nonce = os.urandom(_NONCE)
        blob = nonce + self._cipher.encrypt(nonce, json.dumps(names).encode(), row_id.encode())
        return base64.b64encode(blob).decode()

    def open(self, row_id: str, sealed: str) -> dict[str, Any]:
        """:raises KeyringError: the value was altered or moved to another row"""
        blob = base64.b64decode(sealed)
        try:
            return dict(json.loads(self._cipher.decrypt(blob[:_NONCE], blob[_NONCE:], row_id.encode())))
        except InvalidTag:
            raise KeyringError(f"sealed names of {row_id!r} do not open: altered or moved") from None
