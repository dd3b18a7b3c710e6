"""HPKE sealing of a spool batch to the control plane's intake key, and opening it there.

A cluster runs user code, so it must be able to write metadata but never read
it back. It holds only the intake PUBLIC key and seals every batch to it with
HPKE (RFC 9180, X25519 / HKDF-SHA256 / AES-256-GCM) before the batch touches
its disk; only the holder of the intake private key (the keyring, on the
control plane or in an embedded pipeline) can open it. Replaying a dead
scheduler's spool therefore needs no secret, and reading one gives nothing.

Sealed batch: ``MAGIC | len(batch_id) (1 byte) | batch_id | HPKE ciphertext``.
The batch id travels in clear (it is the idempotency key) and is bound into
the HPKE ``info``, so a batch relabelled with another id does not open. The
plaintext is one uncompressed Arrow IPC stream per record kind, each framed by
its 4-byte big-endian length. A compressed record batch is refused before Arrow
decodes it, so the size limit on the sealed bytes also bounds memory; every
table is checked against its kind's schema on open (its values against
:mod:`pipeline.bounds` on ingest).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pipeline.errors import ConfigError, IntakeError
from pipeline.records import check_table, tables_from_records, with_later_fields

if TYPE_CHECKING:  # not imported: a scheduler's plugin seals without the keyring (and SQLAlchemy, 0.3 s)
    from pipeline.keys import Keyring

__all__ = [
    "MAX_SEALED_BYTES",
    "MEDIA_TYPE",
    "OpenedBatch",
    "intake_private_key",
    "load_public_key",
    "open_batch",
    "public_key_text",
    "seal_batch",
]

#: largest sealed batch accepted (the API answers 413 above it); the emitter splits batches to stay under
MAX_SEALED_BYTES = 8 * 1024 * 1024
#: the Content-Type of a sealed batch on the wire
MEDIA_TYPE = "application/vnd.metadata-pipeline.batch"
INTAKE_KEY_ID = "intake"
MAGIC = b"MPBATCH1"
_PUBLIC_PREFIX = "mp-intake-x25519:"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


_FRAME = 4


@dataclass(frozen=True)
class OpenedBatch:
    """A batch's id and its records: one schema-checked Arrow table per kind."""

    batch_id: str
    tables: list[pa.Table]

    @property
    def n_records(self) -> int:
        return sum(table.num_rows for table in self.tables)

    @functools.cached_property
    def by_kind(self) -> dict[str, pa.Table]:
        """Its tables by their kind's name, read once however many steps of admission ask."""
        return {table.column("kind")[0].as_py(): table for table in self.tables}


def intake_private_key(keyring: Keyring) -> X25519PrivateKey:
    """The intake private key, kept in the keyring wrapped by the master key (made on first use)."""
    return X25519PrivateKey.from_private_bytes(keyring.named_key(INTAKE_KEY_ID, "intake"))


def public_key_text(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The public key as the one-line text ``pipeline.ingest.public-key`` holds."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _PUBLIC_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def load_public_key(text: str, *, setting: str = "pipeline.ingest.public-key") -> X25519PublicKey:
    """Parse :func:`public_key_text`'s output.

    :raises ConfigError: naming ``setting`` when the text is not such a key
    """
    if not isinstance(text, str) or not text.startswith(_PUBLIC_PREFIX):
        raise ConfigError(f"{setting}: expected a key starting with {_PUBLIC_PREFIX!r}, got {str(text)[:40]!r}")
    encoded = text[len(_PUBLIC_PREFIX) :].strip()
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return X25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{setting}: not a valid X25519 public key ({exc})") from exc


def _info(batch_id: str) -> bytes:
    return MAGIC + b"|" + batch_id.encode()


def _frames(tables: Sequence[pa.Table]) -> bytes:
    parts = []
    for table in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        stream = sink.getvalue().to_pybytes()
        parts += [len(stream).to_bytes(_FRAME, "big"), stream]
    return b"".join(parts)


def _tables(plaintext: bytes) -> list[pa.Table]:
    """Parse the frames, one table per kind (as :func:`seal_batch` frames them).

    A second table of a kind is refused: admission reads a batch by kind, and the segments
    sealed from two such tables would share ids, one of them then dropped as a replay.

    :raises ValueError: naming what is malformed
    """
    tables: list[pa.Table] = []
    kinds: set[str] = set()
    at = 0
    while at < len(plaintext):
        size = int.from_bytes(plaintext[at : at + _FRAME], "big")
        stream = plaintext[at + _FRAME : at + _FRAME + size]
        if len(stream) != size or size == 0:
            raise ValueError("truncated record table")
        try:
            table = _read_uncompressed(pa.py_buffer(stream))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"unreadable record table: {str(exc).splitlines()[0]}") from None
        table = with_later_fields(table)  # a plugin of an earlier release
        kind = check_table(table)
        if kind in kinds:
            raise ValueError(f"a second {kind} table; a batch holds one table per kind")
        kinds.add(kind)
        tables.append(table)
        at += _FRAME + size
    if not tables:
        raise ValueError("no records")
    return tables


def _read_uncompressed(stream: pa.Buffer) -> pa.Table:
    """An Arrow IPC stream read without copying: every record batch's buffers are slices of ``stream``.

    A compressed body would make Arrow allocate what its buffers claim to expand to
    (gigabytes from a few kilobytes), so a compressed or dictionary batch is refused
    from its metadata, before Arrow decodes its body.
    """
    messages = pa.ipc.MessageReader.open_stream(stream)
    try:
        schema = pa.ipc.read_schema(messages.read_next_message())
    except StopIteration:
        raise ValueError("an empty Arrow stream") from None
    batches = []
    for message in messages:
        if message.type != "record batch":
            raise ValueError(f"an Arrow {message.type} message; a record table holds record batches only")
        if _compressed(message.metadata.to_pybytes()):
            raise ValueError("a compressed Arrow record batch; batches are sent uncompressed")
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate()  # the rows it claims, against its buffers: a later step allocates per claimed row
        batches.append(batch)
    return pa.Table.from_batches(batches, schema)


def _compressed(metadata: bytes) -> bool:
    """Whether an Arrow IPC ``Message`` flatbuffer holds a ``RecordBatch`` with a ``compression`` field.

    Reads the two tables by hand (Arrow's ``Message.fbs``: ``Message.header`` is field 2,
    ``RecordBatch.compression`` field 3); metadata Arrow would not accept fails later, in Arrow.
    """

    def field(table: int, index: int) -> int:
        vtable = table - int.from_bytes(metadata[table : table + 4], "little", signed=True)
        entry = 4 + 2 * index
        if entry + 2 > int.from_bytes(metadata[vtable : vtable + 2], "little"):
            return 0
        offset = int.from_bytes(metadata[vtable + entry : vtable + entry + 2], "little")
        return table + offset if offset else 0

    message = int.from_bytes(metadata[0:4], "little")
    header = field(message, 2)
    if not header:
        return False
    record_batch = header + int.from_bytes(metadata[header : header + 4], "little")
    return field(record_batch, 3) != 0


def seal_batch(public_key: X25519PublicKey, batch_id: str, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Validate ``records`` and seal them to the intake key under ``batch_id``.

    :raises ValueError: a record is malformed (names it), or the batch id is not ``[A-Za-z0-9_-]{1,128}``
    """
    if not _BATCH_ID.fullmatch(batch_id):
        raise ValueError(f"batch id {batch_id!r} is not 1-128 letters, digits, '-' or '_'")
    plaintext = _frames(tables_from_records(records))
    label = batch_id.encode()
    return MAGIC + bytes([len(label)]) + label + _SUITE.encrypt(plaintext, public_key, info=_info(batch_id))


def sealed_batch_id(sealed: bytes) -> str | None:
    """The batch id a sealed batch's header gives (``None``: no such header, or a malformed one)."""
    head = len(MAGIC) + 1
    if len(sealed) < head or sealed[: len(MAGIC)] != MAGIC:
        return None
    end = head + sealed[len(MAGIC)]
    batch_id = sealed[head:end].decode("ascii", errors="replace")
    return batch_id if _BATCH_ID.fullmatch(batch_id) and len(sealed) > end else None


def open_batch(private_key: X25519PrivateKey, sealed: bytes) -> OpenedBatch:
    """Open a sealed batch and check its tables against the record schemas.

    :raises IntakeError: too large, not a sealed batch, altered or relabelled, sealed to
        another key, or holding records that do not match their schema
    """
    if len(sealed) > MAX_SEALED_BYTES:
        raise IntakeError(f"sealed batch of {len(sealed)} bytes exceeds the limit of {MAX_SEALED_BYTES} bytes")
    if sealed[: len(MAGIC)] != MAGIC:
        raise IntakeError("not a sealed metadata batch (bad magic)")
    batch_id = sealed_batch_id(sealed)
    if batch_id is None:
        raise IntakeError("not a sealed metadata batch (bad batch id header)")
    try:
        plaintext = _SUITE.decrypt(sealed[len(MAGIC) + 1 + len(batch_id) :], private_key, info=_info(batch_id))
    except (InvalidTag, ValueError):
        raise IntakeError(
            f"batch {batch_id} does not decrypt: altered, relabelled or sealed to another intake key",
            batch_id=batch_id,
        ) from None
    try:
        return OpenedBatch(batch_id, _tables(plaintext))
    except ValueError as exc:
        raise IntakeError(f"batch {batch_id}: {exc}", batch_id=batch_id) from None
