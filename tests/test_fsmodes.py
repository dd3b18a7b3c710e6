"""Files the pipeline writes appear whole, are the owner's only, and a witness checkpoint is never replaced."""

from __future__ import annotations

import contextlib
import stat
import threading
from pathlib import Path

import pytest

from pipeline.fsmodes import write_private


def test_write_private_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    write_private(target, b"first")
    write_private(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_without_replace_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-1.json"
    write_private(target, b"the first checkpoint", replace=False)
    with pytest.raises(FileExistsError):
        write_private(target, b"a forged one", replace=False)
    assert target.read_bytes() == b"the first checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1.json"]


def test_concurrent_writers_never_show_a_reader_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-2.json"
    payload = b"x" * 1_000_000
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            if target.exists():
                seen.append(len(target.read_bytes()))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=_write_once, args=(target, payload)) for _ in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    reader.join()
    assert target.read_bytes() == payload
    assert set(seen) <= {len(payload)}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2.json"]


def _write_once(target: Path, payload: bytes) -> None:
    with contextlib.suppress(FileExistsError):
        write_private(target, payload, replace=False)
