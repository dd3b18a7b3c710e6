"""Logging store on local disk, partitioned by day (the embedded default).

Layout: ``ROOT/<data_type>/<YYYY-MM-DD>/<subject_ref>/<file>.seg`` where the day
is that of the segment's *newest* record, so every record in a day folder is
older than the next midnight: expiry drops whole folders (O(days), not
O(records)) and only reads names in the one folder the limit falls inside.
File names carry the id, kind, user ref, record count and oldest and newest
timestamps, so counting, expiring and finding segments that straddle a limit
never open a file. Anything else in the tree (a ``notes.seg``, a backup folder)
is foreign: skipped, left in place and listed by :meth:`~LocalFileStore.foreign_files`,
never a reason to stop a scan, a retention pass or an erasure. A file with a segment's name
whose header is missing, altered or disagrees with that name is not foreign but a damaged
segment: it is scanned as a stand-in that never decrypts, so readers name it as they name an
altered payload, and expiry and erasure remove it by its name. A file is one JSON header line and the
sealed payload; it is written to a temporary name, made durable (one sync for all the
files of a write) and hard-linked into place, so a reader never sees half a segment and
a replay never doubles one.

:meth:`LocalFileStore.compact` merges a closed day's segments of one subject,
kind and user into one file, so expiry and scans touch few files. It first
writes a journal (``.compacting``: each merged id with its source names), then
links the merged files, then unlinks the sources, then the journal. Every
listing settles a journal: while a merged file is absent its sources count;
once it exists they are removed (one the system refuses to remove, a file made
immutable, is left out of listings, and its folder is not compacted again while it
stays). So at every instant, and after a crash at any point, each record is seen
exactly once. The journal and a day's ``.merged-ids``
are the store's own files, never foreign.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from pipeline.errors import ConfigError, StoreRefused, StoreUnavailable
from pipeline.fsmodes import open_private, private_folder, sync_folder, write_private
from pipeline.records import DATA_TYPES
from pipeline.redact import mask_url
from pipeline.segments import NEVER_OPENS, Segment
from pipeline.stores.base import Removed, Store

__all__ = ["LocalFileStore"]

_SUFFIX = ".seg"
_JOURNAL = ".compacting"
#: the name :meth:`LocalFileStore.write` gives a segment before it links it (an operator's ``.tmp-notes`` is not)
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}")
_MERGED = ".merged-ids"
#: a day folder ends one day after its name; compared as ``start <= t - _DAY``, since ``start + _DAY``
#: overflows for a folder named 9999-12-31 (a record stored before ingest checked its time)
_DAY = timedelta(days=1)
logger = logging.getLogger(__name__)


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
    def parse(cls, filename: str) -> _Name | None:
        """The fields of a segment file name; None for any other name."""
        if not filename.endswith(_SUFFIX):
            return None
        try:
            segment_id, kind, user_ref, n, min_us, max_us = filename[: -len(_SUFFIX)].split("~")
            return cls(segment_id, kind, None if user_ref == "-" else user_ref, int(n), int(min_us), int(max_us))
        except ValueError:
            return None

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
            raise ConfigError(f"file store URL must be file:///absolute/path, got {mask_url(url)!r}")
        self.url = url
        self.root = Path(parsed.path)
        self._foreign: set[Path] = set()
        self._damaged: set[Path] = set()
        self._stuck: set[Path] = set()

    def foreign_files(self) -> list[str]:
        return sorted(str(p) for p in self._foreign)

    def _note_foreign(self, path: Path) -> None:
        if path not in self._foreign:
            self._foreign.add(path)
            logger.warning("skipped %s: not a segment file or folder of this store", path)

    def _dirs(self, path: Path) -> list[Path]:
        """Sub-folders of ``path``; files beside them are foreign."""
        dirs, files = _listing(path)
        for entry in files:
            self._note_foreign(entry)
        return dirs

    def _note_stuck(self, path: Path) -> None:
        if path not in self._stuck:
            self._stuck.add(path)
            logger.warning("%s was merged by compaction and cannot be removed: left out (its records are merged)", path)

    def _note_damaged(self, path: Path, exc: _Damaged) -> None:
        if path not in self._damaged:
            self._damaged.add(path)
            logger.warning("unreadable segment file %s: %s", path, exc)

    def _load(self, path: Path, name: _Name, with_payload: bool) -> Segment | None:
        """The segment in ``path``, None when it vanished; a damaged one as its stand-in (see :func:`_stand_in`).

        The stand-in reaches readers like a segment whose payload was altered, so they name it
        instead of losing its records without a word.
        """
        try:
            return self._intact(path, name, with_payload)
        except _Damaged as exc:
            self._note_damaged(path, exc)
            return _stand_in(path, name, exc.key_version, with_payload)

    def _intact(self, path: Path, name: _Name, with_payload: bool) -> Segment | None:
        """The segment in ``path``, None when it vanished.

        :raises _Damaged: its header is not a segment's, or not the one its name and folders describe
        """
        segment = _read(path, with_payload)
        if segment is None:
            return None
        try:
            wrong = _differences(segment, path, name)
        except (ValueError, OverflowError, OSError) as exc:  # times the store could never have written
            raise _Damaged(f"header times out of range: {exc}", segment.key_version) from exc
        if wrong:
            reason = f"header disagrees with the file's name or folders on {', '.join(wrong)}"
            raise _Damaged(reason, segment.key_version)
        return segment

    def _files(self, folder: Path, *, to_remove: bool = False) -> list[tuple[Path, _Name]]:
        """The segment files of a subject folder with their parsed names, after settling any
        compaction journal in it; other files are foreign.

        A source compaction merged that the system would not remove is left out, its records
        read from the merge; ``to_remove`` includes it, first, so that removing the folder's
        files fails on it while its merge still hides it (an erasure stops there). An expiry
        goes on past it: the rest of the day goes, and it is an ordinary segment past the limit
        once the merge and journal are gone, named by every pass until it can be removed.
        """
        merged_away = _settle(folder, folder / _JOURNAL)
        found = []
        for entry in _listing(folder)[1]:
            if entry.name in merged_away and not to_remove:
                self._note_stuck(entry)
                continue
            name = _Name.parse(entry.name)
            if name is None:
                self._note_foreign(entry)
            else:
                found.append((entry, name))
        return sorted(found, key=lambda file: (file[0].name not in merged_away, file))

    def _guard(self, action: str) -> _Guard:
        return _Guard(f"{self.root} unavailable during {action}")

    def _path(self, segment: Segment) -> Path:
        return self.root / segment.data_type / _day(segment) / segment.subject_ref / _Name.of(segment).filename()

    def write(self, segments: Sequence[Segment]) -> int:
        """Write every new segment to a temporary file, make them all durable at once, then link them.

        One sync of the file system for the whole call rather than one fsync per file (on a
        journalling file system each costs a journal commit), so a group commit pays it once.
        """
        new = 0
        written: list[tuple[Path, Path]] = []  # (temporary, final name)
        merged: dict[Path, set[str]] = {}
        with self._guard("write"):
            try:
                for segment in segments:
                    path = self._path(segment)
                    if path.exists() or segment.segment_id in _merged_ids(path.parent.parent, merged):
                        continue
                    private_folder(path.parent)
                    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
                    fd = open_private(tmp)
                    written.append((tmp, path))
                    try:
                        os.write(fd, _header(segment) + b"\n" + segment.payload)
                    finally:
                        os.close(fd)
                _sync_files(self.root, [tmp for tmp, _path in written])  # the data, before a name points at it
                for tmp, path in written:
                    try:
                        os.link(tmp, path)
                        new += 1
                    except FileExistsError:
                        pass
            finally:
                for tmp, _path in written:
                    tmp.unlink(missing_ok=True)
            for directory in {path.parent for _tmp, path in written}:
                sync_folder(directory)  # the journal commit of the first covers the others: cheap
        return new

    def _days(self, data_type: str | None) -> Iterator[Path]:
        """Day folders, oldest first; a folder that is not a data type or a day is foreign."""
        types = [self.root / data_type] if data_type else sorted(self._dirs(self.root))
        for folder in types:
            if folder.name not in DATA_TYPES:
                self._note_foreign(folder)
                continue
            for day in sorted(self._dirs(folder), key=lambda p: p.name):
                if _is_day(day.name):
                    yield day
                else:
                    self._note_foreign(day)

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
                subjects = [day / subject_ref] if subject_ref else sorted(self._dirs(day))
                for folder in subjects:
                    for entry, name in self._files(folder):
                        if (kind and name.kind != kind) or (user_ref and name.user_ref != user_ref):
                            continue
                        segment = self._load(entry, name, with_payload)
                        if segment is not None:
                            yield segment

    @staticmethod
    def _remove_files(files: Sequence[tuple[Path, _Name]], refused: _Refused | None = None) -> Removed:
        gone = [(path, name) for path, name in files if _unlinked(path, refused)]
        return Removed(len(gone), sum(name.n_records for _path, name in gone))

    def _drop_folder(self, folder: Path, refused: _Refused | None = None) -> Removed:
        """Remove every segment and compaction file under ``folder``, then the folders left empty
        (foreign files stay)."""
        folders = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        files = [f for sub in [*folders, folder] for f in self._files(sub, to_remove=True)]
        removed = self._remove_files(files, refused)
        for sub in [*folders, folder]:
            for own in (_JOURNAL, _MERGED):
                _unlinked(sub / own, refused)
            _unlink((path for path, _header in _leftovers(sub)), refused)  # a killed write's, read or not
            _unlink((p for p in sub.glob(f".{_JOURNAL}.tmp-*") if p.is_file()), refused)  # a journal's killed write
            try:
                sub.rmdir()
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    continue
                if refused is None or exc.errno not in (*_REFUSALS, errno.EBUSY):
                    raise
                refused.append((sub, exc.strerror or str(exc)))  # a hold on the folder: immutable, or a mount
        return removed

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        wanted = set(segment_ids)
        with self._guard("delete"):
            doomed = [
                (path, name)
                for day in self._days(None)
                for folder in self._dirs(day)
                for path, name in self._files(folder)
                if name.segment_id in wanted
            ]
            return self._remove_files(doomed)

    def expire(self, data_type: str, before: datetime) -> Removed:
        """See :meth:`Store.expire`. A file or folder the system will not remove (made immutable: a legal hold
        on one account) is passed over, and named once every other file past the limit is gone.

        :raises StoreRefused: naming the first; its ``removed`` says what went
        """
        removed = Removed()
        refused: _Refused = []
        before_us = _us(before)
        with self._guard("expire"):
            for day in self._days(data_type):
                start = _day_start(day)
                if start >= before:
                    break
                if start <= before - _DAY:  # the whole day is past the limit (no overflow on 9999-12-31)
                    removed += self._drop_folder(day, refused)
                    continue
                folders = self._dirs(day)
                removed += self._remove_files(
                    [
                        (f, n)
                        for folder in folders
                        for f, n in self._files(folder, to_remove=True)
                        if n.max_us < before_us
                    ],
                    refused,
                )
                _unlink(
                    [
                        path
                        for folder in folders
                        for path, header in _leftovers(folder)
                        if header is not None and header.max_observed_at < before
                    ],
                    refused,
                )
        if refused:
            path, reason = refused[0]
            error = StoreRefused(f"{len(refused)} path(s) past the limit not removed; the first: {path}: {reason}")
            error.removed = removed
            raise error
        return removed

    def straddling(self, data_type: str, at: datetime) -> Iterator[Segment]:
        at_us = _us(at)
        with self._guard("scan"):
            for day in self._days(data_type):
                if _day_start(day) <= at - _DAY:
                    continue  # every segment in this folder is older than ``at``
                for entry, name in sorted(f for folder in self._dirs(day) for f in self._files(folder)):
                    if name.min_us < at_us <= name.max_us:
                        segment = self._load(entry, name, with_payload=True)
                        if segment is not None:
                            yield segment

    def compact(self, closed_before: datetime, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        merged = Removed()
        with self._guard("compact"):
            for data_type in sorted(DATA_TYPES):  # not the root's listing: a pass reads the type folders only
                for day in self._days(data_type):
                    if _day_start(day) > closed_before - _DAY:
                        break
                    for folder in sorted(self._dirs(day)):
                        merged += self._compact_folder(folder, merge)
        return merged

    def _compact_folder(self, folder: Path, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        if _settle(folder, folder / _JOURNAL):  # its journal must stay: a new one would replace it
            return Removed()
        groups: dict[tuple[str, str | None], list[tuple[Path, _Name]]] = {}
        for path, name in self._files(folder):
            groups.setdefault((name.kind, name.user_ref), []).append((path, name))
        merged = Removed()
        plan: list[tuple[Segment, list[Path], list[Segment]]] = []
        held = 0  # bytes of the sources and merges planned: landed once past the bound, which memory holds
        for files in groups.values():
            for run in _runs(files, MAX_MERGED_BYTES):
                # a file that vanished or is damaged is neither merged nor removed
                loaded = [(p, s) for p, n in run if (s := self._mergeable(p, n)) is not None]
                if len(loaded) < 2:
                    continue
                target = merge([s for _, s in loaded])
                if target is not None:
                    plan.append((target, [p for p, _ in loaded], [s for _, s in loaded]))
                    held += len(target.payload) + sum(len(s.payload) for _, s in loaded)
                if held >= MAX_MERGED_BYTES:
                    merged += self._land(folder, plan)
                    plan, held = [], 0
                    if (folder / _JOURNAL).exists():  # a source that stays: its journal must too
                        return merged
        return merged + self._land(folder, plan)

    def _land(self, folder: Path, plan: list[tuple[Segment, list[Path], list[Segment]]]) -> Removed:
        """Journal the merges of ``plan``, write them, then remove their sources (see the module's docstring)."""
        if not plan:
            return Removed()
        # one line per merge: merged id, then its sources
        write_private(
            folder / _JOURNAL, "\n".join(" ".join([t.segment_id, *(p.name for p in ps)]) for t, ps, _ in plan).encode()
        )
        fd = open_private(folder.parent / _MERGED, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with os.fdopen(fd, "a") as merged_ids:  # per day: a replayed source stays merged
            merged_ids.write("".join(f"{s.segment_id}\n" for _, _, segments in plan for s in segments))
            merged_ids.flush()
            os.fsync(merged_ids.fileno())
        sync_folder(folder)
        self.write([target for target, _, _ in plan])  # each merge visible from here on, its sources hidden
        _settle(folder, folder / _JOURNAL)
        return Removed(sum(len(ps) for _, ps, _ in plan), sum(s.n_records for _, _, ss in plan for s in ss))

    def _mergeable(self, path: Path, name: _Name) -> Segment | None:
        """The intact segment in ``path``; None when it vanished or is damaged (left for readers to name)."""
        try:
            return self._intact(path, name, with_payload=True)
        except _Damaged as exc:
            self._note_damaged(path, exc)
            return None

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        removed = Removed()
        with self._guard("erase"):
            for day in self._days(None):
                folder = day / subject_ref
                if not folder.is_dir():
                    continue
                if user_ref is None:
                    removed += self._drop_folder(folder)
                else:
                    doomed = [(f, n) for f, n in self._files(folder, to_remove=True) if n.user_ref == user_ref]
                    removed += self._remove_files(doomed)
                    _unlink(
                        [p for p, header in _leftovers(folder) if header is not None and header.user_ref == user_ref]
                    )
        return removed


#: what the system answers for a file it will not change whoever asks again: refused, not unavailable
_REFUSALS = (errno.EPERM, errno.EACCES, errno.EROFS)


class _Guard:
    """Map OS errors to StoreRefused (see :data:`_REFUSALS`) or StoreUnavailable, with a message naming
    the folder."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if isinstance(exc, OSError):
            error = StoreRefused if exc.errno in _REFUSALS else StoreUnavailable
            raise error(f"{self.message}: {exc.strerror or exc}") from exc


#: bytes of segment files merged into one: a day's segments of one subject, kind and user past it make
#: several merges (a cluster sending large batches all day would otherwise have compaction, and every read
#: of the merge, hold the day in memory at once)
MAX_MERGED_BYTES = 32 * 2**20


def _runs(files: list[tuple[Path, _Name]], bound: int) -> Iterator[list[tuple[Path, _Name]]]:
    """Consecutive runs of ``files`` of at most ``bound`` bytes each (a file larger than that alone)."""
    run: list[tuple[Path, _Name]] = []
    size = 0
    for path, name in files:
        try:
            length = path.stat().st_size
        except FileNotFoundError:  # removed meanwhile (an erasure): nothing to merge
            continue
        if run and size + length > bound:
            yield run
            run, size = [], 0
        run.append((path, name))
        size += length
    if run:
        yield run


def _settle(folder: Path, journal: Path) -> set[str]:
    """Finish the merges of a compaction journal whose merged file exists: remove their sources.

    A merge whose file is absent has not landed: its sources are the data and the
    journal stays (the next compaction of the folder replaces it). A source the system
    refuses to remove (a file made immutable) stays with the journal, merged: its name is
    returned, for listings to leave out (its records are in the merged file), where raising
    would end every read of the store.
    """
    try:
        lines = [line.split(" ") for line in journal.read_text().splitlines() if line]
    except FileNotFoundError:  # no compaction here, or settled by another reader
        return set()
    present = {p.name.split("~", 1)[0] for p in folder.iterdir()}
    landed = [sources for merged_id, *sources in lines if merged_id in present]
    stuck = set()
    for sources in landed:
        for name in sources:
            try:
                (folder / name).unlink(missing_ok=True)
            except OSError as exc:
                if exc.errno not in _REFUSALS:
                    raise
                stuck.add(name)
    if landed:
        sync_folder(folder)
    if len(landed) == len(lines) and not stuck:
        journal.unlink(missing_ok=True)
    return stuck


def _header(segment: Segment) -> bytes:
    return json.dumps(
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


def _sync_files(root: Path, files: Sequence[Path]) -> None:
    """Make the files' data durable: a lone file by its fsync, several by one ``syncfs`` of the file
    system holding ``root`` (Linux; elsewhere an fsync each). ``syncfs`` also writes what other
    processes left dirty there, so it costs more than one fsync, but it is one wait, not one a file."""
    if len(files) > 1 and _syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), str(root))
        finally:
            os.close(fd)
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _merged_ids(day: Path, cache: dict[Path, set[str]]) -> set[str]:
    """Ids of segments compaction merged away in a day folder (read once per write call)."""
    if day not in cache:
        try:
            cache[day] = set((day / _MERGED).read_text().split())
        except FileNotFoundError:
            cache[day] = set()
    return cache[day]


def _leftovers(folder: Path) -> list[tuple[Path, Segment | None]]:
    """Temporary files a write killed before it linked them (``.tmp-*``), each with its header (None: it does
    not read). Never listed as segments, they are removed with what they would have been: an erasure of
    their subject or user, the expiry of their day, as their segment would be (they hold its header, names
    of its subject and user, and its ciphertext); one whose header does not read, with its folder."""
    found: list[tuple[Path, Segment | None]] = []
    for path in folder.glob(".tmp-*"):
        if not _TEMPORARY.fullmatch(path.name) or not path.is_file():  # an operator's, or a folder: foreign
            continue
        try:
            header = _read(path, with_payload=False)
        except _Damaged:
            header = None
        if header is not None and header.max_observed_at.tzinfo is None:  # not a header this store writes
            header = None
        found.append((path, header))
    return found


#: files and folders the system refused to remove, each with its reason
_Refused = list[tuple[Path, str]]


def _unlink(paths: Iterable[Path], refused: _Refused | None = None) -> None:
    for path in paths:
        _unlinked(path, refused)


def _unlinked(path: Path, refused: _Refused | None) -> bool:
    """Remove ``path`` (gone already: removed); one the system refuses to remove is noted in ``refused``
    and passed over, where given (else raised), so one immutable file keeps no other from going."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        if refused is None or exc.errno not in _REFUSALS:
            raise
        if not os.path.lexists(path):  # a read-only file system refuses even what is not there
            return True
        refused.append((path, exc.strerror or str(exc)))
        return False
    return True


def _is_own(name: str) -> bool:
    """A file the store writes besides segments: a temporary file, a compaction journal (or its
    temporary), a day's merged ids."""
    return bool(_TEMPORARY.fullmatch(name)) or name.startswith((_JOURNAL, f".{_JOURNAL}.tmp-")) or name == _MERGED


def _listing(path: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) of ``path`` without the store's own non-segment files; nothing for a missing folder."""
    try:
        entries = list(path.iterdir())
    except FileNotFoundError:
        return [], []
    dirs: list[Path] = []
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            dirs.append(entry)
        elif not _is_own(entry.name):
            files.append(entry)
    return dirs, files


def _day_start(day: Path) -> datetime:
    """Midnight UTC starting a day folder."""
    return datetime.strptime(day.name, "%Y-%m-%d").replace(tzinfo=UTC)


def _is_day(name: str) -> bool:
    try:
        datetime.strptime(name, "%Y-%m-%d")
    except ValueError:
        return False
    return True


class _Damaged(ValueError):
    """A file with a segment's name whose header is not that segment's: missing, altered or moved."""

    def __init__(self, reason: str, key_version: int = 0) -> None:
        super().__init__(reason)
        #: the header's key version when it has one, so a reader checks keys as for the intact segment
        self.key_version = key_version


def _stand_in(path: Path, name: _Name, key_version: int, with_payload: bool) -> Segment:
    """What a damaged file's name and folders say it holds, with a payload no key opens.

    Filters, counts, expiry and erasure see the segment its name describes; a reader gets
    a decryption failure and names the segment, as for an altered payload.
    """
    return Segment(
        segment_id=name.segment_id,
        subject_ref=path.parent.name,
        user_ref=name.user_ref,
        data_type=path.parent.parent.parent.name,
        kind=name.kind,
        key_version=key_version,
        min_observed_at=_moment(name.min_us),
        max_observed_at=_moment(name.max_us),
        n_records=name.n_records,
        payload=NEVER_OPENS if with_payload else b"",
    )


def _moment(us: int) -> datetime:
    """The instant a file name's microseconds stand for (clamped to what datetime holds)."""
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if us > 0 else datetime.min.replace(tzinfo=UTC)


def _day(segment: Segment) -> str:
    """The day folder of a segment: that of its newest record."""
    return segment.max_observed_at.astimezone(UTC).strftime("%Y-%m-%d")


def _differences(segment: Segment, path: Path, name: _Name) -> list[str]:
    """The fields of a header that differ from what its file's folders and name say (the index readers trust).

    :raises ValueError, OverflowError, OSError: the header's times have no day or microsecond count
    """
    data_type, day, subject_ref = path.parts[-4:-1]
    placed = {"data_type": data_type, "day": day, "subject_ref": subject_ref, **name._asdict()}
    header = {
        "data_type": segment.data_type,
        "day": _day(segment),
        "subject_ref": segment.subject_ref,
        **_Name.of(segment)._asdict(),
    }
    return [field for field, value in placed.items() if header[field] != value]


def _read(path: Path, with_payload: bool) -> Segment | None:
    """The segment in ``path`` as its header describes it; None when it vanished (a concurrent expiry).

    :raises _Damaged: the file has a segment's name but not a segment's header
    """
    try:
        with path.open("rb") as fh:
            line = fh.readline()
            payload = fh.read() if with_payload else b""
    except FileNotFoundError:
        return None
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise _Damaged(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _Damaged(f"header is not a JSON object but {type(header).__name__}")
    version = header.get("key_version")
    key_version = version if isinstance(version, int) and not isinstance(version, bool) else 0
    try:
        return Segment(
            segment_id=header["segment_id"],
            subject_ref=header["subject_ref"],
            user_ref=header["user_ref"],
            data_type=header["data_type"],
            kind=header["kind"],
            key_version=int(header["key_version"]),
            min_observed_at=datetime.fromisoformat(header["min_observed_at"]),
            max_observed_at=datetime.fromisoformat(header["max_observed_at"]),
            n_records=int(header["n_records"]),
            payload=payload,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _Damaged(f"header field missing or malformed: {exc!r}", key_version) from exc
