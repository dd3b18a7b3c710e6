"""``audit export``: the audit trail as files a third party verifies without this package.

The folder gets ``entries.jsonl`` (one entry a line, as :meth:`AuditEntry.as_dict`),
``public_key.pem`` (the configured key, never one from the database),
``checkpoint.json`` (the witness's newest checkpoint that key signed),
``manifest.json`` (count and head hash, signed) and ``README.md``,
which documents the procedure and carries a verification script that needs only
``cryptography``; the test suite runs that very script on an export.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipeline.audit import GENESIS, AuditLog
from pipeline.fsmodes import output_folder, written_together
from pipeline.records import utcnow

__all__ = ["README_NAME", "export_audit", "verification_readme"]

README_NAME = "audit_export_README.md"


def verification_readme() -> str:
    """The procedure (and script) shipped with every export."""
    return (resources.files("pipeline") / "reports" / "templates" / README_NAME).read_text(encoding="utf-8")


def export_audit(audit: AuditLog, out_dir: Path) -> dict[str, Any]:
    """Write the export into ``out_dir`` (created if needed), every file or none (an earlier export's
    files stay as they were when one cannot be written); returns the manifest."""
    checkpoint = audit.newest_checkpoint()  # before the entries: they reach at least its seq
    with output_folder(out_dir) as folder, written_together() as files:
        with files.stream(folder / "entries.jsonl") as fh:
            count, head = _write_entries(audit, fh)
        files.write(folder / "public_key.pem", audit.public_key_pem())
        if checkpoint is not None:
            files.write(folder / "checkpoint.json", checkpoint.to_json())
        else:  # an earlier export's, into this folder: its verification would fail this one
            files.remove(folder / "checkpoint.json")
        algorithm = "Ed25519" if isinstance(audit.trusted_key, Ed25519PublicKey) else "ECDSA P-256 SHA-256"
        manifest: dict[str, Any] = {
            "entries": count,
            "head": head,
            "exported_at": utcnow().isoformat(),
            "signature": algorithm,
        }
        # signed: without it, entries cut from the end (with checkpoint.json removed) verified as intact
        canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest["manifest_signature"] = audit.signer.sign(canonical).hex()
        files.write(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        files.write(folder / "README.md", verification_readme().encode())
    return {**manifest, "folder": str(out_dir)}


def _write_entries(audit: AuditLog, fh: BinaryIO) -> tuple[int, str]:
    """Write every entry, one a line; returns the last seq and its hash. An entry that does not read
    (:class:`AuditIntegrityError`) ends the export with nothing of it in place."""
    count, head = 0, GENESIS
    for entry in audit.entries():
        fh.write((json.dumps(entry.as_dict(), ensure_ascii=False, sort_keys=True) + "\n").encode())
        count, head = entry.seq, entry.entry_hash
    return count, head
