"""The control plane under attack from its own tenants, over real HTTP against ``serve``.

Fair share (one account's flood delays only that account, 429 with Retry-After that the
plugin honours), erasure filing limits, bodies bounded and authenticated before they are
read, half-sent requests cut, and client-caused errors answered 4xx, never 500.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_record
from controlplane import Served, assert_problem, serve_process

from pipeline.config import Settings
from pipeline.delivery import HTTPDelivery
from pipeline.emitter import Emitter
from pipeline.intake import load_public_key, seal_batch
from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore
from pipeline.spool import Spool

pytestmark = pytest.mark.slow


@pytest.fixture
def tokens(home: Path) -> Iterator[TokenStore]:
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    yield TokenStore(pipeline)
    pipeline.close()


def client(served: Served, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=served.url, headers=headers, timeout=60)


def register(served: Served, tokens: TokenStore, account: str, user: str = "ann") -> dict[str, Any]:
    with client(served, tokens.create("member", account, user).token) as member:
        response = member.post("/v1/clusters", json={"account": account})
    assert response.status_code == 201, response.text
    return dict(response.json())


def batch(registration: dict[str, Any], records: int) -> tuple[str, bytes]:
    """A hand-sealed batch of ``records`` well-formed records of the registered cluster."""
    batch_id = uuid.uuid4().hex
    rows = [
        make_record(account=registration["account"], user="ann", cluster_id=registration["cluster_id"])
        for _ in range(records)
    ]
    return batch_id, seal_batch(load_public_key(registration["intake_public_key"]), batch_id, rows)


def health_within(served: Served, seconds: float) -> Any:
    """``GET /v1/health``'s answer as soon as the server gives one within ``seconds``; None if it never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"{served.url}/v1/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    return None


def rss_kib(served: Served) -> int:
    status = Path(f"/proc/{served.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_one_accounts_flood_delays_only_that_account(tmp_path: Path, tokens: TokenStore) -> None:
    home = tmp_path / "home"
    with serve_process(home, "--no-retention") as served:
        flooders = [register(served, tokens, "acme") for _ in range(3)]
        quiet = register(served, tokens, "globex")

        def send(http: httpx.Client, sealed: tuple[str, bytes]) -> tuple[int, float, float, str]:
            started = time.perf_counter()
            answer = http.post("/v1/ingest", content=sealed[1], headers={"Idempotency-Key": sealed[0]})
            return answer.status_code, started, time.perf_counter(), answer.headers.get("Retry-After", "")

        def globex_batches(count: int) -> list[tuple[float, float]]:
            """When each of ``count`` batches of globex, sent one after the other, was sent and answered."""
            batches = [batch(quiet, 20) for _ in range(count)]
            with client(served, quiet["token"]) as http:
                answers = [send(http, sealed) for sealed in batches]
            assert {status for status, *_ in answers} == {202}, answers
            return [(started, answered) for _, started, answered, _ in answers]

        globex_batches(3)  # warm up: first connections, first keys of the account
        flooding, stop = threading.Event(), threading.Event()
        throttled: list[str] = []
        accepted: list[float] = []  # when each of acme's accepted batches was answered

        def flood(registration: dict[str, Any], sealed: tuple[str, bytes]) -> None:
            with client(served, registration["token"]) as http:
                while flooding.wait() and not stop.is_set():
                    status, _, answered, retry_after = send(http, sealed)
                    if status == 429:  # a greedy client: tries the same batch again well before Retry-After
                        throttled.append(retry_after)
                        time.sleep(0.05)
                    else:
                        accepted.append(answered)
                        sealed = batch(registration, 20)

        alone: list[tuple[float, float]] = []
        during: list[tuple[float, float]] = []
        with ThreadPoolExecutor(len(flooders) * 6) as pool:
            for registration in flooders * 6:
                pool.submit(flood, registration, batch(registration, 20))
            for _ in range(4):  # alone and during in turns: the machine's other load weighs on both alike
                flooding.clear()
                time.sleep(0.3)  # batches in flight finish
                alone += globex_batches(6)
                flooding.set()
                time.sleep(0.5)  # the flood is on
                during += globex_batches(6)
            stop.set()
    # How long a batch takes depends on the machine's load (2 to 20 times as long during the flood as
    # alone on a busy machine); how many of acme's batches are answered while one of globex's is in
    # flight does not. Batches are written in two slots handed to the waiting accounts in turn: one of
    # globex's waits for the batch of acme's it finds in a slot, and the other slot finishes one or two
    # while globex's is read, waits and is written: a median of 2 to 4 as measured, the machine busy or
    # not. Without the limits and the turns it waits behind acme's whole queue: a median of 17 or 18.
    overtaken = sorted(sum(started < at < answered for at in accepted) for started, answered in during)
    seconds = [statistics.median(answered - started for started, answered in times) for times in (alone, during)]
    print(
        f"globex: {seconds[0]:.4f} s alone, {seconds[1]:.4f} s in acme's flood, acme's batches answered while one "
        f"of globex's waited: {overtaken} ({len(accepted)} accepted, {len(throttled)} 429)"
    )
    assert statistics.median(overtaken) <= 6, f"globex's batches waited for {overtaken} of acme's"
    assert accepted, "the flooding account still gets its share"
    assert throttled and all(value.isdigit() and int(value) >= 1 for value in throttled)


def test_the_plugin_waits_out_retry_after_and_counts_no_failure(tmp_path: Path, tokens: TokenStore) -> None:
    with serve_process(tmp_path / "home", "--no-retention", server__ingest_rate_per_token="1") as served:
        registration = register(served, tokens, "acme")
        delivery = HTTPDelivery(
            served.url,
            registration["token"],
            load_public_key(registration["intake_public_key"]),
            cluster_id=registration["cluster_id"],
        )
        emitter = Emitter(delivery, Spool(tmp_path / "spool"), retry_max=0.1)
        emitter.start()
        started = time.monotonic()
        for _ in range(3):  # three batches: the second and third wait a second each
            emitter.submit([make_record(account="acme", user="ann", cluster_id=registration["cluster_id"])])
            assert emitter.flush(timeout=30)
        took = time.monotonic() - started
        emitter.close()
    assert emitter.stats.batches_delivered == 3 and emitter.stats.batches_refused == 0
    assert emitter.stats.delivery_failures == 0, emitter.stats.last_error
    assert took >= 1.5, "the second and third batch were sent before Retry-After had passed"


def test_one_member_filing_erasures_in_a_loop_gets_one_open_request_and_429s(
    tmp_path: Path, tokens: TokenStore
) -> None:
    with serve_process(tmp_path / "home", "--no-retention") as served:
        member = tokens.create("member", "acme", "ann").token
        statuses: list[int] = []
        ids: set[str] = set()
        with client(served, member) as ann:
            for _ in range(1500):
                answer = ann.post("/v1/erasure-requests", json={"account": "acme", "user": "ann"})
                statuses.append(answer.status_code)
                if answer.status_code in (200, 201):
                    ids.add(answer.json()["request_id"])
                else:
                    assert_problem(answer, 429)
                    assert int(answer.headers["Retry-After"]) >= 1
            listed = ann.get("/v1/erasure-requests").json()
    assert statuses.count(201) == 1 and statuses.count(429) > 1000
    assert len(ids) == 1 and [r["request_id"] for r in listed] == list(ids)


def test_an_unauthenticated_huge_chunked_body_is_refused_unread(tmp_path: Path, tokens: TokenStore) -> None:
    """Refused before its body is read, a request's connection is closed: a 429 over a cluster's rate and a
    person's token on ``/v1/ingest`` kept theirs, and the server read (and threw away) up to 8 MiB each (r43)."""
    with serve_process(tmp_path / "home", "--no-retention", server__ingest_rate_per_token="1") as served:
        member = tokens.create("member", "acme", "ann").token
        cluster = register(served, tokens, "acme")
        host, port = served.url.removeprefix("http://").split(":")
        with client(
            served, cluster["token"]
        ) as http:  # the ingest path's first use (imports, keys) before the baseline
            assert http.post("/v1/ingest", content=batch(cluster, 1)[1]).status_code == 202
        before = rss_kib(served)
        cases = [
            ("/v1/clusters", None, 401),
            ("/v1/clusters", member, 413),
            ("/v1/ingest", None, 401),
            ("/v1/ingest", member, 403),
            ("/v1/ingest", cluster["token"], 429),
        ]
        for path, token, expected in cases:
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            for _attempt in range(5):  # the 429: one batch spends the token's second, unless a second passed since
                if expected == 429:
                    with client(served, cluster["token"]) as http:
                        http.post("/v1/ingest", content=batch(cluster, 1)[1])
                started = time.monotonic()
                status, closed = _send_chunked(host, int(port), head + "Transfer-Encoding: chunked\r\n\r\n", 2**26)
                if status == expected:
                    break
            assert (status, closed) == (expected, True), path
            assert time.monotonic() - started < 10
        grown = rss_kib(served) - before
    assert grown < 8 * 1024, f"the server grew by {grown} KiB reading bodies it should have refused"


def _send_chunked(host: str, port: int, head: str, total: int) -> tuple[int, bool]:
    """Send a chunked body of ``total`` bytes (as far as the server lets us); the status it answers, and whether
    the answer closes the connection."""
    chunk = b"x" * 65536
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode())
        sent = 0
        try:
            while sent < total:
                sock.sendall(framed)
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed without reading: what it should do
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:  # the status line and the headers
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n"


def test_half_sent_requests_are_cut_and_health_still_answers(tmp_path: Path, tokens: TokenStore) -> None:
    member = tokens.create("member", "acme", "ann").token
    settings = {"server__header_timeout": "1s", "server__body_timeout": "1s", "server__max_connections": "100"}
    with serve_process(tmp_path / "home", "--no-retention", open_files=256, **settings) as served:
        host, port = served.url.removeprefix("http://").split(":")
        half_sent = []
        for number in range(300):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if number % 2:  # headers that never end, or a body that never comes
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                head = f"POST /v1/clusters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {member}\r\n"
                sock.sendall(head.encode() + b"Content-Length: 100\r\n\r\n{")
            half_sent.append(sock)
        try:
            assert health_within(served, 10) == {"status": "ok"}
            for sock in half_sent:
                try:
                    while sock.recv(4096):  # until the server closes (a 408 may come first)
                        pass
                except ConnectionResetError:
                    pass
        finally:
            for sock in half_sent:
                sock.close()
        _, stderr = served.stop()
    assert "Too many open files" not in stderr and "Traceback" not in stderr, stderr[:3000]


def test_the_next_request_on_a_kept_connection_gets_its_own_header_deadline(tmp_path: Path) -> None:
    """The deadline left from the first request was still pending when the second began, so none was set
    for it until that one fired: a slow head got up to twice header-timeout."""
    with serve_process(tmp_path / "home", "--no-retention", server__header_timeout="2s") as served:
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
            started = time.monotonic()
            sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
            try:
                while time.monotonic() - started < 6:  # one header line every 0.2 s, never the end
                    sock.sendall(b"X-Slow: 1\r\n")
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            closed = time.monotonic() - started
    assert closed < 3.0, f"the head was cut {closed:.1f} s after its first byte; header-timeout is 2 s"


def test_clients_that_never_read_their_answers_are_dropped_and_free_their_slots(tmp_path: Path) -> None:
    """Pipelined requests whose answers are never read held every connection slot for good, with no token."""
    settings = {"server__max_connections": "5", "server__body_timeout": "1s"}
    with serve_process(tmp_path / "home", "--no-retention", **settings) as served:
        host, port = served.url.removeprefix("http://").split(":")
        readers = []
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 300)  # answers never read
            readers.append(sock)
        try:
            assert health_within(served, 30) == {"status": "ok"}
        finally:
            for sock in readers:
                sock.close()


def test_an_admin_registering_a_cluster_of_a_blank_account_gets_400(tmp_path: Path, tokens: TokenStore) -> None:
    with (
        serve_process(tmp_path / "home", "--no-retention") as served,
        client(served, tokens.create("admin", user="ops").token) as admin,
    ):
        assert "account" in assert_problem(admin.post("/v1/clusters", json={"account": "   "}), 400)["detail"]
        assert admin.get("/v1/clusters").json() == []


def test_query_moments_out_of_range_in_utc_are_400(tmp_path: Path, tokens: TokenStore) -> None:
    with (
        serve_process(tmp_path / "home", "--no-retention") as served,
        client(served, tokens.create("admin", user="ops").token) as admin,
    ):
        for moment in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"):
            for name in ("since", "until"):
                assert name in assert_problem(admin.get("/v1/records", params={name: moment}), 400)["detail"]


def test_a_client_hanging_up_mid_body_is_no_server_error(tmp_path: Path, tokens: TokenStore) -> None:
    with serve_process(tmp_path / "home", "--no-retention") as served:
        admin_token = tokens.create("admin", user="ops").token
        registration = register(served, tokens, "acme")
        host, port = served.url.removeprefix("http://").split(":")
        for path, token in (("/v1/ingest", registration["token"]), ("/v1/clusters", admin_token)):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{".encode()
                )
        time.sleep(0.5)  # the server notices the hang-ups
        with client(served, admin_token) as admin:
            metrics = admin.get("/metrics").text
        _, stderr = served.stop()
    assert 'status="5' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]
    assert "request failed" not in stderr and "Traceback" not in stderr
