"""The retention policy file: load, validate, and answer routing questions.

Format (a contract, see DESIGN.md)::

    version: 1
    stores:
      long_term:     {account: until_deleted, cluster_jobs: until_deleted, ...}
      cloud_logging: {cluster_jobs: 30d, software_env: 30d}
    erasure:
      deadline: 30d
      stores: [long_term, cloud_logging]

A data type a store does not list is never written to it. Every error names the
file, the dotted field and the reason. The YAML is read strictly: aliases (the
"billion laughs" bomb), duplicate keys and unknown keys are errors, durations
are at most 100 years, and a bad value is quoted only in part.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PolicyError
from pipeline.records import DATA_TYPES
from pipeline.redact import quoted

__all__ = ["STORES", "Policy", "load_policy", "parse_duration"]

STORES = ("long_term", "cloud_logging")
UNTIL_DELETED = "until_deleted"
#: data types a store must never hold, whatever a policy says
FORBIDDEN = {"cloud_logging": {"account"}}
_DURATION = re.compile(r"([0-9]{1,9})([dh])")  # ASCII digits: \d takes ٣٠ as 30
#: the longest duration a policy may give: long enough for any law, short enough for date arithmetic
MAX_DURATION = timedelta(days=36500)


def parse_duration(value: Any) -> timedelta | None:
    """``'30d'`` / ``'12h'`` → timedelta, ``None`` for ``until_deleted``; ValueError otherwise."""
    if value == UNTIL_DELETED:
        return None
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None  # $ ends before a newline
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{quoted(value)} is not a duration like 30d or 12h")
    n = int(match.group(1))
    duration = timedelta(days=n) if match.group(2) == "d" else timedelta(hours=n)
    if duration > MAX_DURATION:
        raise ValueError(f"{quoted(value)} is longer than {MAX_DURATION.days}d (100 years)")
    return duration


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases (a 500-byte file must not expand to gigabytes), duplicate or compound keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.constructor.ConstructorError(None, None, "YAML aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):  # a list or a mapping cannot be a key
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a name", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {quoted(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _field(key: Any) -> str:
    """A user-supplied key as part of a dotted field name, cut and escaped like a quoted value."""
    return key if isinstance(key, str) and key.isidentifier() and len(key) <= 40 else quoted(key)


@dataclass(frozen=True)
class Policy:
    """A validated policy: retention per store and data type, erasure rules."""

    path: str
    sha256: str
    retention: dict[str, dict[str, timedelta | None]]  # store -> data type -> limit (None: until deleted)
    erasure_deadline: timedelta
    erasure_stores: tuple[str, ...]

    def with_copy(self, store: str, of: str) -> Policy:
        """This policy with ``store`` holding, keeping and erasing exactly what ``of`` does (an archive)."""
        erasure = self.erasure_stores + ((store,) if of in self.erasure_stores else ())
        return replace(self, retention={**self.retention, store: dict(self.retention[of])}, erasure_stores=erasure)

    def stores_for(self, data_type: str) -> tuple[str, ...]:
        """The stores a record of ``data_type`` is written to."""
        return tuple(store for store, types in self.retention.items() if data_type in types)

    def limits(self) -> list[tuple[str, str, timedelta]]:
        """(store, data type, limit) for every finite retention."""
        return [
            (store, data_type, limit)
            for store, types in self.retention.items()
            for data_type, limit in types.items()
            if limit is not None
        ]


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file.

    :raises PolicyError: naming the file, the dotted field and the reason
    """
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(where, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        doc = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader, stricter
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        raise PolicyError(where, "", f"not valid YAML{at}" + (f": {problem}" if problem else "")) from exc
    except RecursionError:  # a few hundred [ deep: the YAML parser's recursion, not a policy
        raise PolicyError(where, "", "nested too deeply to be a policy") from None
    if not isinstance(doc, dict):
        raise PolicyError(where, "", "must be a mapping with version, stores and erasure")

    def fail(field: str, reason: str) -> PolicyError:
        return PolicyError(where, field, reason)

    def no_unknown(mapping: dict[Any, Any], known: tuple[str, ...], prefix: str = "") -> None:
        unknown = [key for key in mapping if key not in known]
        if unknown:
            raise fail(prefix + _field(unknown[0]), f"unknown field (known: {', '.join(known)})")

    no_unknown(doc, ("version", "stores", "erasure"))
    if "version" not in doc:
        raise fail("version", "missing (expected version: 1)")
    if type(doc["version"]) is not int or doc["version"] != 1:
        raise fail("version", f"unsupported version {quoted(doc['version'])} (expected 1)")

    stores = doc.get("stores")
    if not isinstance(stores, dict) or not stores:
        raise fail("stores", "missing or not a mapping of store -> data type -> retention")
    retention: dict[str, dict[str, timedelta | None]] = {}
    for store, types in stores.items():
        if store not in STORES:
            raise fail(f"stores.{_field(store)}", f"unknown store (known: {', '.join(STORES)})")
        if not isinstance(types, dict):
            raise fail(f"stores.{store}", "must map data types to retentions")
        retention[store] = {}
        for data_type, value in types.items():
            field = f"stores.{store}.{_field(data_type)}"
            if data_type not in DATA_TYPES:
                raise fail(field, f"unknown data type (known: {', '.join(DATA_TYPES)})")
            if data_type in FORBIDDEN.get(store, ()):
                raise fail(field, f"{store} must never hold {data_type} data")
            try:
                retention[store][data_type] = parse_duration(value)
            except ValueError as exc:
                raise fail(field, str(exc)) from None

    erasure = doc.get("erasure", {})
    if not isinstance(erasure, dict):
        raise fail("erasure", "must be a mapping with deadline and stores")
    no_unknown(erasure, ("deadline", "stores"), "erasure.")
    try:
        deadline = parse_duration(erasure.get("deadline", "30d"))
    except ValueError as exc:
        raise fail("erasure.deadline", str(exc)) from None
    if deadline is None:
        raise fail("erasure.deadline", "must be a duration, not until_deleted")
    erasure_stores = erasure.get("stores", list(retention))
    if not isinstance(erasure_stores, list) or not erasure_stores:
        raise fail("erasure.stores", "must be a non-empty list of store names")
    for i, store in enumerate(erasure_stores):
        if not isinstance(store, str) or store not in STORES:
            raise fail(f"erasure.stores[{i}]", f"unknown store {quoted(store)} (known: {', '.join(STORES)})")
    uncovered = [store for store, types in retention.items() if types and store not in erasure_stores]
    if uncovered:  # an erasure would "complete" with that store's copy still readable
        raise fail("erasure.stores", f"misses {', '.join(uncovered)}, which holds data: an erasure must cover it")
    return Policy(
        path=where,
        sha256=hashlib.sha256(raw).hexdigest(),
        retention=retention,
        erasure_deadline=deadline,
        erasure_stores=tuple(erasure_stores),
    )
