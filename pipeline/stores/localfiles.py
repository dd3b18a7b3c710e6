"""Logging store on local disk, partitioned by day (the embedded default).

Layout: ``ROOT/<data_type>/<YYYY-MM-DD>/<subject_ref>/<file>.seg`` where the day
is that of the segment's *newest* record, so every record in a day folder is
older than the next midnight: expiry drops whole folders (O(days), not
O(records)) and only reads names in the one folder the limit falls inside.
File names carry the id, kind, user ref, record count and oldest and newest
timestamps, so counting, expiring and finding segments that straddle a limit
never open a file. A file is one JSON header line and the
sealed payload; it is written to a temporary name, fsync'd and hard-linked into
place, so a reader never sees half a segment and a replay never doubles one.

:meth:`LocalFileStore.compact` merges a closed day's segments of one subject,
kind and user into one file, so expiry and scans touch few files. It first
writes a journal (``.compacting``: each merged id with its source names), then
links the merged files, then unlinks the sources, then the journal. Every
listing settles a journal: while a merged file is absent its sources count;
once it exists they are removed. So at every instant, and after a crash at any
point, each record is seen exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from pipeline.errors import ConfigError, StoreError, StoreUnavailable
from pipeline.segments import Segment
from pipeline.stores.base import Removed, Store

__all__ = ["LocalFileStore"]

_SUFFIX = ".seg"
_JOURNAL = ".compacting"
_MERGED = ".merged-ids"


class _Name(NamedTuple):
    segment_id: str
    kind: str
    user_ref: str | None
    n_records: int
    min_us: int
    max_us: int

    @classmethod
    def of(cls, segment: Segment) -> _Name:
        return cls(
            segment.segment_id,
            segment.kind,
            segment.user_ref,
            segment.n_records,
            _us(segment.min_observed_at),
            _us(segment.max_observed_at),
        )

    @classmethod
    def parse(cls, filename: str) -> _Name:
        try:
            segment_id, kind, user_ref, n, min_us, max_us = filename[: -len(_SUFFIX)].split("~")
            return cls(segment_id, kind, None if user_ref == "-" else user_ref, int(n), int(min_us), int(max_us))
        except ValueError:
            raise StoreError(f"{filename!r} is not a segment file name of this store") from None

    def filename(self) -> str:
        return (
            f"{self.segment_id}~{self.kind}~{self.user_ref or '-'}~{self.n_records}"
            f"~{self.min_us}~{self.max_us}{_SUFFIX}"
        )


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


class LocalFileStore(Store):
    """Encrypted segments as files in day folders under a root directory."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ConfigError(f"file store URL must be file:///absolute/path, got {url!r}")
        self.url = url
        self.root = Path(parsed.path)

    def _guard(self, action: str) -> _Guard:
        return _Guard(f"{self.root} unavailable during {action}")

    def _path(self, segment: Segment) -> Path:
        day = segment.max_observed_at.astimezone(UTC).strftime("%Y-%m-%d")
        return self.root / segment.data_type / day / segment.subject_ref / _Name.of(segment).filename()

    def write(self, segments: Sequence[Segment]) -> int:
        new = 0
        touched: set[Path] = set()
        merged: dict[Path, set[str]] = {}
        with self._guard("write"):
            for segment in segments:
                path = self._path(segment)
                if path.exists() or segment.segment_id in _merged_ids(path.parent.parent, merged):
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
                header = json.dumps(
                    {
                        "segment_id": segment.segment_id,
                        "subject_ref": segment.subject_ref,
                        "user_ref": segment.user_ref,
                        "data_type": segment.data_type,
                        "kind": segment.kind,
                        "key_version": segment.key_version,
                        "min_observed_at": segment.min_observed_at.isoformat(),
                        "max_observed_at": segment.max_observed_at.isoformat(),
                        "n_records": segment.n_records,
                    }
                ).encode()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, header + b"\n" + segment.payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, path)
                    new += 1
                except FileExistsError:
                    pass
                finally:
                    os.unlink(tmp)
                touched.add(path.parent)
            for directory in touched:
                _fsync_dir(directory)
        return new

    def _days(self, data_type: str | None) -> Iterator[Path]:
        types = [data_type] if data_type else sorted(p.name for p in _dirs(self.root))
        for name in types:
            yield from sorted(_dirs(self.root / name), key=lambda p: p.name)

    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        with self._guard("scan"):
            for day in self._days(data_type):
                subjects = [day / subject_ref] if subject_ref else sorted(_dirs(day))
                for folder in subjects:
                    for entry in sorted(_files(folder)):
                        name = _Name.parse(entry.name)
                        if (kind and name.kind != kind) or (user_ref and name.user_ref != user_ref):
                            continue
                        segment = _read(entry, with_payload)
                        if segment is not None:
                            yield segment

    def _remove_files(self, files: Sequence[Path]) -> Removed:
        records = 0
        for path in files:
            records += _Name.parse(path.name).n_records
            path.unlink(missing_ok=True)
        return Removed(len(files), records)

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        wanted = set(segment_ids)
        with self._guard("delete"):
            doomed = [
                f
                for day in self._days(None)
                for folder in _dirs(day)
                for f in _files(folder)
                if _Name.parse(f.name).segment_id in wanted
            ]
            return self._remove_files(doomed)

    def expire(self, data_type: str, before: datetime) -> Removed:
        removed = Removed()
        before_us = _us(before)
        with self._guard("expire"):
            for day in self._days(data_type):
                start = datetime.strptime(day.name, "%Y-%m-%d").replace(tzinfo=UTC)
                if start >= before:
                    break
                if start + timedelta(days=1) <= before:  # the whole day is past the limit
                    removed += _drop_folder(day)
                    continue
                removed += self._remove_files(
                    [f for folder in _dirs(day) for f in _files(folder) if _Name.parse(f.name).max_us < before_us]
                )
        return removed

    def straddling(self, data_type: str, at: datetime) -> Iterator[Segment]:
        at_us = _us(at)
        with self._guard("scan"):
            for day in self._days(data_type):
                if datetime.strptime(day.name, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1) <= at:
                    continue  # every segment in this folder is older than ``at``
                for entry in sorted(f for folder in _dirs(day) for f in _files(folder)):
                    name = _Name.parse(entry.name)
                    if name.min_us < at_us <= name.max_us:
                        segment = _read(entry, with_payload=True)
                        if segment is not None:
                            yield segment

    def compact(self, closed_before: datetime, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        merged = Removed()
        with self._guard("compact"):
            for data_type in sorted(p.name for p in _dirs(self.root)):
                for day in self._days(data_type):
                    if datetime.strptime(day.name, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1) > closed_before:
                        break
                    for folder in sorted(_dirs(day)):
                        merged += self._compact_folder(folder, merge)
        return merged

    def _compact_folder(self, folder: Path, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        groups: dict[tuple[str, str | None], list[Path]] = {}
        for path in sorted(_files(folder)):
            name = _Name.parse(path.name)
            groups.setdefault((name.kind, name.user_ref), []).append(path)
        plan: list[tuple[Segment, list[Path], list[Segment]]] = []
        for sources in groups.values():
            if len(sources) < 2:
                continue
            segments = [s for s in (_read(p, with_payload=True) for p in sources) if s is not None]
            target = merge(segments)
            if target is not None:
                plan.append((target, sources, segments))
        if not plan:
            return Removed()
        journal = folder / _JOURNAL  # one line per merge: merged id, then its sources
        _write_file(journal, "\n".join(" ".join([t.segment_id, *(p.name for p in ps)]) for t, ps, _ in plan).encode())
        with (folder.parent / _MERGED).open("a") as merged_ids:  # per day: a replayed source stays merged
            merged_ids.write("".join(f"{s.segment_id}\n" for _, _, segments in plan for s in segments))
            merged_ids.flush()
            os.fsync(merged_ids.fileno())
        _fsync_dir(folder)
        self.write([target for target, _, _ in plan])  # each merge visible from here on, its sources hidden
        _settle(folder, journal)
        return Removed(sum(len(ps) for _, ps, _ in plan), sum(s.n_records for _, _, ss in plan for s in ss))

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        removed = Removed()
        with self._guard("erase"):
            for day in self._days(None):
                folder = day / subject_ref
                if not folder.is_dir():
                    continue
                if user_ref is None:
                    removed += _drop_folder(folder)
                else:
                    removed += self._remove_files(
                        [f for f in _files(folder) if _Name.parse(f.name).user_ref == user_ref]
                    )
        return removed


class _Guard:
    """Map OS errors to StoreUnavailable with a message naming the folder."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if isinstance(exc, OSError):
            raise StoreUnavailable(f"{self.message}: {exc.strerror or exc}") from exc


def _dirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _files(folder: Path) -> list[Path]:
    """The segment files of a subject folder, after settling any compaction journal in it."""
    try:
        entries = list(folder.iterdir())
        journals = [p for p in entries if p.name == _JOURNAL]
        for journal in journals:
            _settle(folder, journal)
        if journals:
            entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in entries if p.name.endswith(_SUFFIX)]


def _settle(folder: Path, journal: Path) -> None:
    """Finish the merges of a compaction journal whose merged file exists: remove their sources.

    A merge whose file is absent has not landed: its sources are the data and the
    journal stays (the next compaction of the folder replaces it).
    """
    try:
        lines = [line.split(" ") for line in journal.read_text().splitlines() if line]
    except FileNotFoundError:  # settled by another reader
        return
    present = {p.name.split("~", 1)[0] for p in folder.iterdir()}
    landed = [sources for merged_id, *sources in lines if merged_id in present]
    for sources in landed:
        for name in sources:
            (folder / name).unlink(missing_ok=True)
    if landed:
        _fsync_dir(folder)
    if len(landed) == len(lines):
        journal.unlink(missing_ok=True)


def _merged_ids(day: Path, cache: dict[Path, set[str]]) -> set[str]:
    """Ids of segments compaction merged away in a day folder (read once per write call)."""
    if day not in cache:
        try:
            cache[day] = set((day / _MERGED).read_text().split())
        except FileNotFoundError:
            cache[day] = set()
    return cache[day]


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_folder(folder: Path) -> Removed:
    subjects = _dirs(folder) or [folder]
    files = [f for sub in subjects for f in _files(sub)]
    records = sum(_Name.parse(f.name).n_records for f in files)
    shutil.rmtree(folder, ignore_errors=False)
    return Removed(len(files), records)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, with_payload: bool) -> Segment | None:
    try:
        with path.open("rb") as fh:
            header = json.loads(fh.readline())
            payload = fh.read() if with_payload else b""
    except FileNotFoundError:  # removed by a concurrent expiry
        return None
    except (ValueError, KeyError) as exc:
        raise StoreError(f"segment file {path} is corrupt: {exc}") from exc
    return Segment(
        segment_id=header["segment_id"],
        subject_ref=header["subject_ref"],
        user_ref=header["user_ref"],
        data_type=header["data_type"],
        kind=header["kind"],
        key_version=header["key_version"],
        min_observed_at=datetime.fromisoformat(header["min_observed_at"]),
        max_observed_at=datetime.fromisoformat(header["max_observed_at"]),
        n_records=header["n_records"],
        payload=payload,
    )
