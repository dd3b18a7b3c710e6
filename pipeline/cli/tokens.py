"""``tokens`` (on the control plane) and ``login`` (anywhere)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from pipeline.cli.core import API_NAME, TEXT, command, main, open_pipeline
from pipeline.config import http_url_problem
from pipeline.output import Output
from pipeline.redact import mask_url, quoted


@main.group()
def tokens() -> None:
    """API tokens for people and clusters (run on the control plane)."""


@command(tokens, "create")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    type=API_NAME,
    help="The member's account (admins: none); a gateway's accounts, repeated ('*': any account).",
)
@click.option("--user", default=None, type=API_NAME, help="Who holds the token.")
@click.option("--role", type=click.Choice(["member", "admin", "gateway"]), default="member", show_default=True)
def tokens_create(out: Output, accounts: tuple[str, ...], user: str | None, role: str) -> None:
    """Issue a token; it is printed once and only its SHA-256 is kept.

    A gateway token (for a dask-gateway server) may register clusters of its accounts and nothing else.
    """
    from pipeline.server.auth import TokenStore

    if role != "gateway" and len(accounts) > 1:
        raise click.UsageError(f"a {role} token has one --account at most (a gateway token may have several)")
    store = TokenStore(open_pipeline(create=True))
    if role == "gateway":
        issued = store.create(role, user=user, accounts=accounts)
    else:
        issued = store.create(role, accounts[0] if accounts else None, user)
    if not out.as_json:
        click.echo(f"{role} token {issued.token_id}; shown only now, store it safely:", err=True)
    out.result(issued.as_dict(), issued.token)


@command(tokens, "list")
def tokens_list(out: Output) -> None:
    """Every token issued (never the token itself), oldest first."""
    from pipeline.server.auth import TokenStore

    now = datetime.now(UTC)
    out.rows(
        ({**t.as_dict(), "state": _token_state(t.as_dict(), now)} for t in TokenStore(open_pipeline()).list()),
        _render_token,
    )


def _token_state(t: dict[str, Any], now: datetime) -> str:
    """``active``, or why it no longer works: ``revoked``, ``expired``, ``erased`` (its account or user was)."""
    if t["revoked_at"]:
        return "revoked"
    if t["expires_at"] and t["expires_at"] <= now:
        return "expired"
    if t["kind"] not in ("admin", "gateway") and t["account"] is None:  # its names were shredded with the subject's key
        return "erased"
    return "active"


def _render_token(t: Any) -> str:
    state = t["state"]
    if state == "active" and t["expires_at"]:
        state = f"expires {t['expires_at']:%Y-%m-%d}"
    elif state != "active":
        state = f"ended: {state}"
    bound = " ".join([*(str(t[k]) for k in ("account", "user", "cluster_id") if t[k]), *t["accounts"]])
    return f"{t['token_id']}  {t['kind']:<7} {state:<18} {bound}"


@command(tokens, "revoke")
@click.argument("token_id", type=TEXT)
def tokens_revoke(out: Output, token_id: str) -> None:
    """Revoke a token: its next request is refused."""
    from pipeline.server.auth import TokenStore

    info = TokenStore(open_pipeline()).revoke(token_id).as_dict()
    out.result(info, f"token {token_id} revoked")


@command(main)
@click.option("--url", required=True, type=TEXT, help="The control plane, e.g. https://metadata.example.com")
@click.option(
    "--token-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file holding the member or admin token [default: read it from standard input].",
)
@click.option("--token", default=None, type=TEXT, help="The token itself (visible in ps and shell history).")
def login(out: Output, url: str, token_file: Path | None, token: str | None) -> None:
    """Check a token against the control plane and keep it in a 0600 credentials file."""
    from pipeline.apiclient import ApiClient, Credentials

    token = _read_token(token_file, token)
    if problem := http_url_problem(url):
        raise click.BadParameter(f"{quoted(mask_url(url))} {problem}", param_hint="--url")
    credentials = Credentials(url.rstrip("/"), token)
    with ApiClient(credentials) as client:
        who = client.json("GET", "/v1/whoami")
    if who["kind"] == "cluster":
        raise click.BadParameter(
            "a cluster token can only ingest; log in with a member or admin token", param_hint="--token"
        )
    path = credentials.save()
    info = {
        "url": mask_url(credentials.url),
        "kind": who["kind"],
        "account": who["account"],
        "user": who["user"],
        "credentials": path,
    }
    out.result(
        info,
        " ".join(["logged in to", info["url"], "as", *filter(None, (who["kind"], who["account"], who["user"]))]),
    )


def _read_token(token_file: Path | None, token: str | None) -> str:
    """The token from --token-file, --token or standard input (prompted for, hidden, on a terminal)."""
    if token_file is not None and token is not None:
        raise click.UsageError("give --token-file or --token, not both")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {token_file}: {exc}", param_hint="--token-file") from None
    elif token is None:
        token = click.prompt("token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    token = token.strip()
    if not token:
        raise click.UsageError("no token given (standard input, --token-file or --token)")
    return token
