"""``erase request|status|list|retry|lift``: deletion requests, locally or through the API."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import click

from pipeline.cli.core import NAME, TEXT, CheckFailed, api_client, command, from_api, main, open_pipeline
from pipeline.output import Output


@main.group()
def erase() -> None:
    """Privacy deletion requests (erasure of an account or a user, everywhere)."""


@command(erase, "request")
@click.option("--account", required=True, type=NAME)
@click.option("--user", default=None, type=NAME, help="Erase only this user of the account.")
@click.option("--reason", default=None, type=TEXT, help="Why (encrypted under the subject's key, shredded with it).")
@click.option("--suppress", is_flag=True, help="Also drop records observed later, until `erase lift ID`.")
def erase_request(out: Output, account: str, user: str | None, reason: str | None, suppress: bool) -> None:
    """File a deletion request; prints its id (carried out by enforce or serve).

    A subject has at most one open request: filing again prints the open one's id.
    """
    from pipeline.retention.requests import file_request

    client = api_client()
    if client is None:
        asked = str(uuid.uuid4())
        filed = file_request(
            open_pipeline(), account, user, reason, suppress=suppress, unless_open=True, request_id=asked
        ).as_dict()
        if filed["request_id"] != asked and not out.as_json:  # as the API answers a refiling
            also = "; it now suppresses later records too" if suppress else ""
            click.echo(
                f"the subject has an open request, filed {filed['created_at']:%Y-%m-%d %H:%M:%S} UTC: "
                f"not filed again{also}",
                err=True,
            )
    else:
        from pipeline.apiclient import Receipt

        with client:
            body = {"account": account, "user": user, "reason": reason, "suppress": suppress}
            filed = _request_from_api(client.json("POST", "/v1/erasure-requests", json=body))
        receipt = Receipt(client.url, filed["request_id"], filed.pop("receipt_token"))
        kept = receipt.save()
        if not out.as_json:
            click.echo(
                f"receipt kept in {kept}: `erase status {filed['request_id']}` follows the request to its end, "
                "even after the erasure ends your token",
                err=True,
            )
    out.result(filed, filed["request_id"])


@command(erase, "retry")
@click.argument("request_id", type=TEXT)
def erase_retry(out: Output, request_id: str) -> None:
    """Carry out a failed (or open) request now, whatever its back-off says."""
    from pipeline.retention.requests import retry_request

    request = retry_request(open_pipeline(), request_id)
    out.result(request.as_dict(), lambda d: _render_request(d, receipt=True))
    if request.state != "completed":
        raise CheckFailed(f"deletion request {request_id} is {request.state}: {request.error}")


@command(erase, "lift")
@click.argument("request_id", type=TEXT)
def erase_lift(out: Output, request_id: str) -> None:
    """End the suppression of a request filed with --suppress: later records are accepted again."""
    from pipeline.records import utcnow
    from pipeline.tombstones import lift

    pipeline = open_pipeline()
    now = utcnow()
    lift(pipeline.keyring.engine, request_id, now)
    pipeline.audit.append("erasure.lifted", details={"request_id": request_id, "lifted_at": now.isoformat()})
    out.result({"request_id": request_id, "lifted_at": now}, f"suppression of {request_id} lifted")


@command(erase, "status")
@click.argument("request_id", type=TEXT)
def erase_status(out: Output, request_id: str) -> None:
    """State and receipt of one request (with the receipt `erase request` kept: no login needed)."""
    from pipeline.apiclient import Receipt
    from pipeline.retention.requests import get_request, receipt_disagreements

    receipt = Receipt.load(request_id)
    client = api_client() if receipt is None else None
    disagreements: list[str] = []
    if receipt is not None:  # works without a login, and after the erasure ended the requester's token
        request = _request_from_api(receipt.status())
    elif client is None:  # on the control plane: the receipt is checked against the audit trail
        pipeline = open_pipeline()
        found = get_request(pipeline, request_id)
        request, disagreements = found.as_dict(), receipt_disagreements(pipeline, found)
    else:
        with client:
            request = _request_from_api(client.json("GET", f"/v1/erasure-requests/{quote(request_id, safe='')}"))
    out.result(request, lambda d: _render_request(d, receipt=True))
    if disagreements:
        raise CheckFailed(f"the receipt of {request_id} disagrees with the audit trail: {'; '.join(disagreements)}")


@command(erase, "list")
def erase_list(out: Output) -> None:
    """Every request, oldest first (JSON lines with --json)."""
    from pipeline.retention.requests import list_requests

    client = api_client()
    if client is None:
        out.rows((r.as_dict() for r in list_requests(open_pipeline())), _render_request)
    else:
        with client:
            out.rows(map(_request_from_api, client.json("GET", "/v1/erasure-requests")), _render_request)


def _request_from_api(d: dict[str, Any]) -> dict[str, Any]:
    """A request as the API sends it, as the local path has it."""
    return from_api(d, ("created_at", "deadline", "updated_at", "completed_at", "final_at"))


def _render_request(d: Any, receipt: bool = False) -> str:
    flags = " OVERDUE" if d["overdue"] else (" (completed late)" if d["completed_late"] else "")
    line = f"{d['request_id']}  {d['state']:<11} {d['scope']:<7} deadline {d['deadline']:%Y-%m-%d}{flags}"
    if not receipt:
        return line
    lines = [line]
    if d["error"]:
        lines.append(f"  error: {d['error']}")
    if d["receipt"].get("note"):
        lines.append(f"  {d['receipt']['note']}")
    for store, got in d["receipt"].get("stores", {}).items():
        when = got.get("erased_at", "not finished")
        lines.append(f"  {store:<14} {got['records']} records in {got['segments']} segments removed ({when})")
        if "expires_at" in got:
            lines.append(f"  {'':<14} by {got['method']}: the last entry expires by {got['expires_at']}")
    key = d["receipt"].get("key")
    if key:
        lines.append(f"  data key: {key['state']}" + (f" at {key['destroyed_at']}" if "destroyed_at" in key else ""))
    if d["final_at"]:
        lines.append(
            f"  final on {d['final_at']:%Y-%m-%d %H:%M} UTC (a backup from before it opens the data until then)"
        )
    if d["receipt"].get("reason_sha256"):
        lines.append(f"  reason SHA-256: {d['receipt']['reason_sha256']}")
    return "\n".join(lines)
