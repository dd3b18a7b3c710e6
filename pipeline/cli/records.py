"""``records`` and ``spool replay``: reading what was stored, delivering what a scheduler left."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import click

from pipeline.cli.core import NAME, api_client, command, main, open_pipeline, report_skipped
from pipeline.config import Settings
from pipeline.output import Output
from pipeline.records import DATA_TYPES
from pipeline.redact import quoted
from pipeline.retention.policy import STORES


@command(main)
@click.option("--account", default=None, type=NAME)
@click.option("--data-type", type=click.Choice(DATA_TYPES), default=None)
@click.option("--store", type=click.Choice(STORES), default="long_term", show_default=True)
def records(out: Output, account: str | None, data_type: str | None, store: str) -> None:
    """Print decrypted records (JSON lines with --json); with a login, those the token may see.

    A segment that does not decrypt, or a record that cannot be read, is named on stderr,
    every other record is printed, and the exit status is 1.
    """
    from pipeline.runtime import Unreadable

    client = api_client()
    pipeline, unreadable = None, list[Unreadable]()
    if client is None:
        pipeline = open_pipeline()
        rows = pipeline.read_records(store, account=account, data_type=data_type, unreadable=unreadable)
        n = out.rows(rows, _render_record)
    else:
        with client:
            params = {"account": account, "data_type": data_type, "store": store}
            n = out.rows(_records_and_skipped(client.lines("/v1/records", params), unreadable), _render_record)
    if not out.as_json:
        click.echo(f"{n} records in {store}", err=True)
    report_skipped(pipeline, unreadable)


def _records_and_skipped(lines: Iterator[dict[str, Any]], unreadable: list[Any]) -> Iterator[dict[str, Any]]:
    """The records of a ``GET /v1/records`` stream; its ``skipped`` lines go to ``unreadable``."""
    from pipeline.runtime import Unreadable

    for line in lines:
        if "skipped" in line and "record_id" not in line:
            skipped = line["skipped"]  # the fields of Unreadable; a newer server may add some
            unreadable.append(
                Unreadable(skipped["store"], skipped["segment_id"], skipped["reason"], skipped.get("record_id"))
            )
        else:
            yield line


def _render_record(r: Any) -> str:
    when = str(r["observed_at"])[:19].replace("T", " ")
    return f"{when}  {r['data_type']}/{r['kind']:<16} {r['account']}  {r['user'] or '-'}  {r['cluster_id']}"


@main.group()
def spool() -> None:
    """The local delivery spool of a scheduler's plugin."""


class Seconds(click.FloatRange):
    """A number of seconds within a range; ``nan``, neither below nor above it, is refused too."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{quoted(value)} is not a number of seconds", param, ctx)
        return seconds


#: the longest replay: a day (a thread's join refuses timeouts of ~292 years and more)
MAX_REPLAY_SECONDS = 86_400


@command(spool, "replay")
@click.option(
    "--timeout",
    type=Seconds(0, MAX_REPLAY_SECONDS),
    default=60.0,
    show_default=True,
    help="Seconds to keep retrying delivery (at most a day).",
)
def spool_replay(out: Output, timeout: float) -> None:
    """Deliver the batches a stopped scheduler left in the spool (in-process, or to pipeline.ingest.url)."""
    from pipeline.delivery import Delivery, EmbeddedDelivery, remote_delivery
    from pipeline.emitter import Emitter
    from pipeline.errors import SpoolError, StoreUnavailable
    from pipeline.principals import Principal
    from pipeline.spool import Spool

    settings = Settings.from_config()
    delivery: Delivery | None = remote_delivery(settings)  # a cluster's spool: post it with the cluster's token
    if delivery is None:  # on the machine holding the master key: replay as the operator
        pipeline = open_pipeline()  # now, so a bad key or database fails fast
        delivery = EmbeddedDelivery(lambda: pipeline, Principal("operator"))
    queue = Spool(settings.spool_dir)
    corrupt_before, refused_before = set(queue.corrupt_files()), set(queue.refused_files())
    emitter = Emitter(delivery, queue, retry_max=settings.retry_max)
    emitter.start()
    delivered_all = emitter.close(timeout)
    corrupt = sorted(set(queue.corrupt_files()) - corrupt_before)
    refused = sorted(set(queue.refused_files()) - refused_before)
    summary = {
        "batches_replayed": emitter.stats.batches_replayed,
        "batches_delivered": emitter.stats.batches_delivered,
        "batches_left": len(queue.pending_files()),
        "corrupt_files": [str(p) for p in corrupt],
        "refused_files": [str(p) for p in refused],
    }
    out.result(summary, f"{summary['batches_delivered']} of {summary['batches_replayed']} spooled batches delivered")
    if corrupt or refused:
        raise SpoolError(
            f"{len(corrupt)} corrupt spool file(s) set aside in {queue.corrupt_dir}"
            f"{': ' + ', '.join(p.name for p in corrupt) if corrupt else ''}; "
            f"{len(refused)} refused batch(es) set aside in {queue.refused_dir}"
            f"{' (' + str(emitter.stats.last_error) + ')' if refused else ''}; "
            f"{summary['batches_delivered']} other batches delivered"
        )
    if not delivered_all:
        raise StoreUnavailable(f"{summary['batches_left']} batches left in the spool: {emitter.stats.last_error}")
