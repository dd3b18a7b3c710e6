"""Request heads are at most 16 KiB over real HTTP, however the client splits them into writes.

h11 alone bounds only a head still incomplete, so one that arrived whole in a single read
(up to 256 KiB) was parsed. These send raw bytes to the control plane on loopback.
"""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Iterable

import pytest
from controlplane import ControlPlane

from pipeline.server.runner import MAX_HEADER_BYTES


def head(size: int) -> bytes:
    """A ``GET /v1/health`` whose request line and headers are exactly ``size`` bytes, blank line included."""
    start, end = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def exchange(plane: ControlPlane, writes: Iterable[bytes], answers: int) -> tuple[list[int], bool]:
    """Send ``writes`` one at a time on one connection; the statuses of up to ``answers`` answers, and
    whether the server then closed the connection.

    Writing stops once the server has answered (it may close without reading the rest).
    """
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for data in writes:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(data)
                time.sleep(0.001)  # a read of its own on the server
        except OSError:  # the server answered and closed without reading the rest
            pass
        return read_answers(sock, answers)


def read_answers(sock: socket.socket, count: int) -> tuple[list[int], bool]:
    """The statuses of up to ``count`` answers on ``sock``; then whether the server closed it."""
    buffer, statuses = b"", []
    while len(statuses) < count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            answer = buffer[:end].decode("latin-1")
            statuses.append(int(answer.split()[1]))
            length = re.search(r"(?im)^content-length:\s*(\d+)", answer)
            if not length:  # the body runs until the server closes
                break
            buffer = buffer[end + 4 + int(length.group(1)) :]
            continue
        piece = receive(sock)
        if not piece:
            return statuses, True
        buffer += piece
    return statuses, closed(sock)


def closed(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (after what it still sends) rather than keep it open for 0.5 s."""
    sock.settimeout(0.5)
    try:
        while receive(sock):
            pass
    except TimeoutError:
        return False
    return True


def receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def test_a_100_kb_header_in_one_write_is_refused(plane: ControlPlane) -> None:
    assert exchange(plane, [head(100_000)], 1) == ([400], True)


def test_a_100_kb_header_in_many_small_writes_is_refused(plane: ControlPlane) -> None:
    data = head(100_000)
    assert exchange(plane, [data[i : i + 1000] for i in range(0, len(data), 1000)], 1) == ([400], True)


@pytest.mark.parametrize(("size", "status"), [(15 * 1024, 200), (MAX_HEADER_BYTES, 200), (MAX_HEADER_BYTES + 1, 400)])
def test_a_head_up_to_16_kib_is_answered_and_one_byte_more_refused(plane: ControlPlane, size: int, status: int) -> None:
    assert exchange(plane, [head(size)], 1) == ([status], status == 400)


def test_the_limit_counts_each_request_of_a_kept_alive_connection(plane: ControlPlane) -> None:
    assert exchange(plane, [head(10 * 1024), head(10 * 1024)], 2) == ([200, 200], False)


def test_pipelined_requests_in_one_write_are_counted_each(plane: ControlPlane) -> None:
    assert exchange(plane, [head(10 * 1024) * 2], 2) == ([200, 200], False)
    assert exchange(plane, [head(10 * 1024) + head(100_000)], 2) == ([200, 400], True)


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [(head(100_000), f"request line and headers over {MAX_HEADER_BYTES} bytes"), (b"\x00\r\n\r\n", "malformed")],
    ids=["too large", "malformed"],
)
def test_a_refused_head_is_answered_as_every_other_error_problem_json(
    plane: ControlPlane, request_bytes: bytes, detail: str
) -> None:
    """uvicorn answered it in text/plain ("Invalid HTTP request received."), unlike every other error."""
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while piece := receive(sock):
            answer += piece
    head_text, _, body = answer.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 400") and b"content-type: application/problem+json" in head_text.lower()
    problem = json.loads(body)
    assert problem["status"] == 400 and problem["detail"].startswith(detail)
