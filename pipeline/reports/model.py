"""The report as data: what every renderer (HTML, JSON, CSV, notebook) shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["TABLE_COLUMNS", "Report"]

#: the columns of each table the CSV report writes, whether it has rows or not (downstream readers
#: rely on the header); ``account`` only when the report shows names
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "inventory": ("store", "data_type", "segments", "records", "unreadable_records", "accounts", "oldest", "newest"),
    "retention": ("store", "data_type", "retention", "limit_days", "oldest_age_days", "overdue", "status"),
    "deletion_requests_summary": (
        "deadline_days",
        "status",
        "total",
        "completed",
        "open",
        "failed",
        "overdue",
        "completed_late",
        "median_hours_to_complete",
        "max_hours_to_complete",
    ),
    "deletion_requests_by_state": (
        "state",
        "requests",
        "overdue",
        "median_hours_to_complete",
        "max_hours_to_complete",
    ),
    "deletion_requests": (
        "request_id",
        "state",
        "created_at",
        "deadline",
        "completed_at",
        "hours_to_complete",
        "overdue",
        "completed_late",
    ),
    "erasures_not_final": ("request_id", "completed_at", "final_at"),
    "audit": ("status", "intact", "entries", "verified_entries", "first_bad_seq", "reason", "last_retention_pass"),
    "audit_actions": ("action", "entries"),
    "usage_accounts": (
        "subject_ref",
        "account",
        "clusters",
        "cluster_hours",
        "jobs",
        "tasks_completed",
        "tasks_erred",
        "compute_hours",
        "peak_memory_bytes",
    ),
    "usage_daily": (
        "subject_ref",
        "account",
        "day",
        "cluster_hours",
        "jobs",
        "tasks_completed",
        "tasks_erred",
        "compute_hours",
    ),
    "unreadable_segments": ("store", "segment_id", "reason", "record_id"),
    "foreign_files": ("store", "path"),
    "out_of_range_records": ("store", "segment_id", "reason", "record_id"),
}


@dataclass
class Report:
    """Sections of the compliance report; plots are PNG bytes (HTML and notebook only)."""

    generated_at: datetime
    now: datetime
    policy: dict[str, Any]
    names_shown: bool
    inventory: list[dict[str, Any]]
    retention: list[dict[str, Any]]
    deletion_requests: dict[str, Any]
    audit: dict[str, Any]
    usage: list[dict[str, Any]]
    usage_daily: list[dict[str, Any]]
    records_by_day: list[dict[str, Any]]
    plots: dict[str, bytes] = field(default_factory=dict)
    #: segments that should decrypt and do not (altered), and files a store could not place: the
    #: report covers everything else and marks these
    unreadable_segments: list[dict[str, Any]] = field(default_factory=list)
    foreign_files: list[dict[str, Any]] = field(default_factory=list)
    #: records stored before ingest bounded them (a time outside the years 1 to 9999 or in the future,
    #: a negative count): named here, left out of every number and plot
    out_of_range_records: list[dict[str, Any]] = field(default_factory=list)

    def columns(self, table: str) -> list[str]:
        """The columns of one of :meth:`tables`, in order."""
        return [c for c in TABLE_COLUMNS[table] if c != "account" or self.names_shown]

    @property
    def overdue_records(self) -> int:
        """Records past their store's retention limit (0 after ``enforce``)."""
        return sum(row["overdue"] for row in self.retention)

    @property
    def retention_status(self) -> str:
        return "PASS" if all(row["status"] == "PASS" for row in self.retention) else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        """The numbers, machine-readable (the JSON report)."""
        return {
            "generated_at": self.generated_at,
            "now": self.now,
            "policy": self.policy,
            "names_shown": self.names_shown,
            "inventory": self.inventory,
            "retention": {"status": self.retention_status, "overdue": self.overdue_records, "rows": self.retention},
            "deletion_requests": self.deletion_requests,
            "audit": self.audit,
            "usage": {"accounts": self.usage, "daily": self.usage_daily},
            "records_by_day": self.records_by_day,
            "unreadable_segments": self.unreadable_segments,
            "foreign_files": self.foreign_files,
            "out_of_range_records": self.out_of_range_records,
        }

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Every table of the report by name (the CSV report writes one file each)."""
        requests = self.deletion_requests
        summary = {k: v for k, v in requests.items() if k not in ("by_state", "requests", "not_final")}
        audit = {k: v for k, v in self.audit.items() if k != "by_action"}
        return {
            "inventory": self.inventory,
            "retention": self.retention,
            "deletion_requests_summary": [summary],
            "deletion_requests_by_state": requests["by_state"],
            "deletion_requests": requests["requests"],
            "erasures_not_final": requests["not_final"],
            "audit": [audit],
            "audit_actions": self.audit["by_action"],
            "usage_accounts": self.usage,
            "usage_daily": self.usage_daily,
            "unreadable_segments": self.unreadable_segments,
            "foreign_files": self.foreign_files,
            "out_of_range_records": self.out_of_range_records,
        }
