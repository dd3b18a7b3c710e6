"""``GET /v1/records`` streams hold a database connection while they read: one is given back as soon as
its reader hangs up, and one tenant's readers cannot take the pool from the others."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from conftest import make_record
from controlplane import ControlPlane, assert_problem

from pipeline.server.records import STREAMS_PER_ACCOUNT


def _opened(client: httpx.Client) -> httpx.Response:
    """A records stream of the client's account, retried while its places are not yet given back."""
    deadline = time.monotonic() + 30
    while True:
        response = client.send(client.build_request("GET", "/v1/records"), stream=True)
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        response.close()
        time.sleep(0.1)


def test_an_account_has_a_few_record_streams_at_once_and_others_keep_theirs(plane: ControlPlane) -> None:
    plane.pipeline.write_records([make_record(account="acme", cluster_id=f"c-{n}") for n in range(20_000)])
    with plane.member("acme", "ann") as ann, plane.member("globex", "bob") as bob:
        streams = [_opened(ann) for _ in range(STREAMS_PER_ACCOUNT)]
        try:
            assert [s.status_code for s in streams] == [200] * STREAMS_PER_ACCOUNT
            refused = ann.get("/v1/records")
            assert_problem(refused, 429)
            assert refused.headers["Retry-After"] == "1"
            assert bob.get("/v1/records").status_code == 200  # another account's reader is not held up
        finally:
            for stream in streams:
                stream.close()
        again = _opened(ann)  # places given back as the streams end
        assert again.status_code == 200
        again.close()


def test_a_stream_whose_reader_hung_up_is_closed_whatever_else_holds_it(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette leaves a stream its reader left suspended: it let its connection go only once nothing
    referred to it any more, which in ``serve`` (its heap frozen for the garbage collector) took minutes."""
    from pipeline.server import records

    held: list[Any] = []  # a reference the garbage collector would have had to find

    def kept(*args: Any) -> Any:
        held.append(body(*args))
        return held[-1]

    body = records._ndjson
    monkeypatch.setattr(records, "_ndjson", kept)
    plane.pipeline.write_records([make_record(account="acme", cluster_id=f"c-{n}") for n in range(20_000)])
    with plane.member("acme", "ann") as ann:
        stream = _opened(ann)
        assert next(stream.iter_lines()).startswith("{")
        stream.close()
    deadline = time.monotonic() + 30
    while held[0].gi_frame is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held[0].gi_frame is None  # closed: its scan's connection is back in the pool


def test_a_stream_that_fails_part_way_gives_its_place_back(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette runs a response's background task only when its body ends well: three streams cut by a
    database gone part way locked the account out of its records until a restart."""
    from pipeline.errors import StoreUnavailable

    plane.pipeline.write_records([make_record(account="acme", cluster_id=f"c-{n}") for n in range(3)])
    read = plane.pipeline.read_records

    def failing(*args: Any, **kwargs: Any) -> Any:
        rows = read(*args, **kwargs)
        yield next(rows)
        raise StoreUnavailable("long_term unreachable during scan")

    monkeypatch.setattr(plane.pipeline, "read_records", failing)
    with plane.member("acme", "ann") as ann:
        for _ in range(STREAMS_PER_ACCOUNT + 1):
            with pytest.raises(httpx.RemoteProtocolError):  # the stream is cut, as the server logs
                ann.get("/v1/records")
        monkeypatch.undo()
        assert ann.get("/v1/records").status_code == 200
