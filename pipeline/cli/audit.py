"""``audit verify`` and ``audit export``."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.core import OUT_FOLDER, CheckFailed, command, main, open_pipeline
from pipeline.output import Output


@main.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@command(audit, "verify")
def audit_verify(out: Output) -> None:
    """Recompute the hash chain and check every signature (exit 1 at the first bad entry)."""
    import dataclasses

    result = open_pipeline().audit.check()
    if result.intact or out.as_json:
        out.result(dataclasses.asdict(result), str(result))
    if not result.intact:
        raise CheckFailed(f"audit entry {result.first_bad_seq}: {result.reason}")


@command(audit, "export")
@click.option("--out", "out_dir", required=True, type=OUT_FOLDER)
def audit_export(out: Output, out_dir: Path) -> None:
    """Entries (JSON lines), public key and the verification procedure, for a third party."""
    from pipeline.audit_export import export_audit

    manifest = export_audit(open_pipeline().audit, out_dir)
    out.result(manifest, lambda m: f"{m['entries']:,} entries exported to {m['folder']} (head {m['head'][:16]}…)")
