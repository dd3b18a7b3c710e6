"""What every command shares: the ``main`` group, the ``--json``/exit-status decorator, parameter types,
and the pipeline or API client a command works with."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlparse

import click

from pipeline.config import Settings
from pipeline.errors import ConfigError, PipelineError
from pipeline.output import Output
from pipeline.redact import mask_url, printable, quoted
from pipeline.subject_names import MAX_NAME_CHARS

__all__ = [
    "OUT_FOLDER",
    "TEXT",
    "CheckFailed",
    "UTCTime",
    "api_client",
    "command",
    "main",
    "open_pipeline",
    "report_skipped",
]


F = TypeVar("F", bound=Callable[..., Any])
#: the status of a command whose reader closed the pipe, as a shell reports one ended by SIGPIPE (128 + 13)
SIGPIPE_STATUS = 141


class CheckFailed(Exception):
    """A check ran and found a problem: exit status 1."""


def command(group: click.Group, name: str | None = None, **attrs: Any) -> Callable[[F], F]:
    """A subcommand with ``--json`` and the error → exit status mapping."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, json_output: bool, **kwargs: Any) -> Any:
            out = Output(json_output)
            try:
                return fn(out, *args, **kwargs)
            except CheckFailed as exc:
                click.echo(f"check failed: {printable(str(exc))}", err=True)
                sys.exit(1)
            except PipelineError as exc:
                click.echo(f"error: {printable(str(exc))}", err=True)
                sys.exit(2)
            except BrokenPipeError:
                _reader_left()
            except OSError as exc:  # the file system refused what a setting names (a home that is a file)
                click.echo(f"error: {printable(_refused_path(exc))}", err=True)
                sys.exit(2)

        wrapper = click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")(wrapper)
        return group.command(name, **attrs)(wrapper)  # type: ignore[return-value]

    return decorate


def _refused_path(exc: OSError) -> str:
    """``path: reason`` of a file or folder the system would not make or read."""
    if exc.filename is None:
        return str(exc)
    return f"cannot use {exc.filename}: {(exc.strerror or str(exc)).lower()}"


def _reader_left() -> NoReturn:
    """The reader closed the pipe (`| head`): end quietly, as a shell command ends by SIGPIPE."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
    sys.exit(SIGPIPE_STATUS)


class _QuietPipe(click.Command):
    """``--help`` and ``--version`` print while the command line is parsed, before a command runs: a reader
    that left ends them as it ends a command (click's own answer is exit 1)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _reader_left()


class OneLineGroup(_QuietPipe, click.Group):
    """Bad usage (an unknown option, a value a parameter refuses) is one line on stderr, exit 2."""

    command_class = _QuietPipe
    group_class = type  # a subgroup is one of these too

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a group alone: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(f"error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


class Text(click.ParamType):
    """A name or free text from the command line: it must be valid UTF-8.

    Arguments that are not UTF-8 reach Python as lone surrogates (``$'\\xff'`` → ``'\\udcff'``),
    which no store, hash or terminal can encode.
    """

    name = "TEXT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{quoted(value)} is not valid UTF-8 text", param, ctx)
        return value


TEXT = Text()


class Name(Text):
    """An account, user, username or e-mail: valid UTF-8 and not blank (the API refuses those too).

    :param max_chars: for a name the API must take (a token's, an account's); none for one that may
        come from a cluster's records (an erasure, a read), whose bound is in bytes
    """

    name = "NAME"

    def __init__(self, max_chars: int | None = None) -> None:
        self.max_chars = max_chars

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        if not value.strip():
            self.fail("must not be empty", param, ctx)
        if self.max_chars is not None and len(value) > self.max_chars:
            self.fail(f"{len(value):,} characters; the API takes at most {self.max_chars}", param, ctx)
        return value


NAME = Name()
#: an account or user the API must take: one a token or an account is made for
API_NAME = Name(MAX_NAME_CHARS)


class OutFolder(click.Path):
    """A folder a command writes: an empty value (``--out "$UNSET"``) is refused, not taken as the current one,
    and so is one that is not UTF-8 (``--json`` printed it as another path)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must name a folder, not be empty", param, ctx)
        return super().convert(TEXT.convert(value, param, ctx) if isinstance(value, str) else value, param, ctx)


OUT_FOLDER = OutFolder()


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dask-metadata-pipeline")
def main() -> None:
    """Metadata and audit pipeline with retention enforcement for Dask clusters."""
    pipeline_logger = logging.getLogger("pipeline")
    if not pipeline_logger.handlers:  # commands report through their one line; `serve` configures logging
        pipeline_logger.addHandler(logging.NullHandler())


def open_pipeline(*, create: bool = False):  # noqa: ANN201 - imported lazily for a fast --help
    """The pipeline of the configured home: the control plane's keys, database and stores.

    :raises ConfigError: this machine holds no master key but is logged in to a control plane
    """
    from pipeline.runtime import Pipeline

    settings = Settings.from_config()
    check_control_plane_host(settings)
    return Pipeline.open(settings, create=create)


def check_control_plane_host(settings: Settings) -> None:
    """Refuse a command that needs the master key on a machine that has none but a login, or a cluster's
    configuration.

    Such a machine talks to a control plane elsewhere: ``init`` there would start a second,
    empty pipeline, so the message names where the command runs instead.
    """
    from pipeline.apiclient import Credentials

    keys = urlparse(settings.keys_url)
    if keys.scheme != "file" or Path(keys.path).exists():
        return
    credentials = Credentials.load(settings.api_url)
    if credentials is not None:
        elsewhere = f"You are logged in to {mask_url(credentials.url)}; through it use records, clusters and erase"
    elif settings.ingest_url:  # a cluster's scheduler.yaml: this host sends to a control plane
        elsewhere = (
            f"This host is configured as a cluster of {mask_url(settings.ingest_url)} (pipeline.ingest.url); "
            "log in to it (metadata-pipeline login) to use records, clusters and erase from here"
        )
    else:
        return
    command = " ".join(click.get_current_context().command_path.split()[1:])  # without the program's name
    raise ConfigError(
        f"`{command}` runs on the control-plane host: it needs the master key, which this machine does not hold. "
        + elsewhere
    )


def report_skipped(pipeline: Any, unreadable: list[Any]) -> None:
    """One stderr line per skipped segment, record and store with foreign files; exit 1 for a segment.

    A segment that does not decrypt is damage (or tampering) to look into. A record out of
    range was stored before ingest checked bounds; it is named on every read, and failing
    every read for it would change nothing.

    :param pipeline: None for a read through the control plane (its foreign files are not ours to list)
    """
    for store, found in pipeline.foreign_files().items() if pipeline is not None else ():
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        click.echo(printable(f"skipped {len(found)} foreign file(s) in {store}: {shown}"), err=True)
    for problem in unreadable:
        click.echo(printable(str(problem)), err=True)
    damaged = sum(problem.record_id is None for problem in unreadable)
    if damaged:
        raise CheckFailed(f"{damaged} segment(s) could not be read; every other record was shown")


def api_client():  # noqa: ANN201 - an ApiClient, imported lazily for a fast --help
    """A client of the control plane when ``login`` saved credentials; ``None`` works on the local home."""
    from pipeline.apiclient import ApiClient, Credentials

    credentials = Credentials.load(Settings.from_config().api_url)
    return None if credentials is None else ApiClient(credentials)


def from_api(row: dict[str, Any], times: Iterable[str]) -> dict[str, Any]:
    """A row as the API sends it, its ``times`` parsed back as the local path has them: the API writes UTC as
    ``Z``, the local path as ``+00:00``, and one command prints one format, logged in or not."""
    return {k: datetime.fromisoformat(v) if k in times and v is not None else v for k, v in row.items()}


class UTCTime(click.ParamType):
    """An ISO 8601 instant; without a zone it is taken as UTC."""

    name = "ISO8601"

    #: ages and deadlines of up to 100 years either side must stay within datetime's range
    EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
            parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except (ValueError, OverflowError):
            self.fail(f"{quoted(value)} is not an ISO 8601 time like 2026-01-31T12:00:00Z", param, ctx)
        if not self.EARLIEST <= parsed < self.LATEST:
            self.fail(
                f"{quoted(value)} is out of range ({self.EARLIEST:%Y-%m-%d} or later, before {self.LATEST:%Y-%m-%d})",
                param,
                ctx,
            )
        return parsed
