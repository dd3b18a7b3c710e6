"""Which key the audit verifier trusts for each entry: anchored in configuration, never in the database.

The anchor is the configured signing key's public half (its file or its KMS
key) or ``pipeline.audit.verify-key``. A trail begun under an older key hands
over with an ``audit.signing_key_replaced`` entry: signed by the old key like
every entry before it, and *endorsed* by the new key, whose signature of the
hand-over statement (its seq, the hash it chains to and both keys) sits in the
entry's details. Walking back from the anchor, a hand-over counts only when it
names the key trusted after it and carries that key's endorsement; its
previous key is then trusted for the entries up to and including it. Whoever
can write the database but lacks the trusted private key cannot endorse, so a
chain re-signed with a key of their own fails at its first entry.

Hand-overs written before endorsements existed count when a checkpoint signed
by the anchor pins them (the release that wrote them checkpointed at once).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.signing import PublicKey, load_public_hex, public_hex, verifies

__all__ = ["HANDOVER", "KeySchedule", "handover_statement", "key_schedule", "signed_by"]

HANDOVER = "audit.signing_key_replaced"


def handover_statement(seq: int, prev_hash: str, previous_public_key: str, public_key: str) -> bytes:
    """The bytes the new key signs to endorse a hand-over (canonical JSON)."""
    doc = {
        "action": HANDOVER,
        "seq": seq,
        "prev_hash": prev_hash,
        "previous_public_key": previous_public_key,
        "public_key": public_key,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def signed_by(key: PublicKey, signature_hex: str, data: bytes) -> bool:
    """Whether the hex ``signature_hex`` is ``key``'s signature of ``data`` (malformed hex: no)."""
    try:
        return verifies(key, bytes.fromhex(signature_hex), data)
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class KeySchedule:
    """The trusted key of every sequence number: ``spans`` (last seq, key) ascending, then the anchor."""

    anchor: PublicKey
    spans: tuple[tuple[int, PublicKey], ...] = ()

    def key_for(self, seq: int) -> PublicKey:
        for last, key in self.spans:
            if seq <= last:
                return key
        return self.anchor


def key_schedule(handovers: Iterable[Mapping[str, Any]], anchor: PublicKey, *, pinned_through: int = 0) -> KeySchedule:
    """The keys trusted before each valid hand-over, walking back from ``anchor``.

    :param handovers: the trail's hand-over entries as dicts (as exported); a forged one is skipped
    :param pinned_through: the seq an anchor-signed checkpoint pins; older un-endorsed hand-overs count
    """
    trusted, spans = anchor, []
    for entry in sorted(handovers, key=lambda e: e["seq"], reverse=True):
        details = entry.get("details") or {}
        previous_hex, new_hex = details.get("previous_public_key"), details.get("public_key")
        if new_hex != public_hex(trusted) or not isinstance(previous_hex, str):
            continue
        statement = handover_statement(entry["seq"], entry["prev_hash"], previous_hex, new_hex)
        endorsed = signed_by(trusted, str(details.get("endorsement", "")), statement)
        if not endorsed and entry["seq"] > pinned_through:
            continue
        try:
            trusted = load_public_hex(previous_hex)
        except ValueError:
            continue
        spans.append((entry["seq"], trusted))
    return KeySchedule(anchor, tuple(reversed(spans)))
