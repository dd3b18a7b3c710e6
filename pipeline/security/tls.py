"""Per-cluster TLS credentials: a fresh CA, scheduler / worker / client certificates.

Every cluster gets its own CA, so a client or worker holding another cluster's
certificate is refused at the TLS handshake. The CA's private key signs the
three certificates and is then thrown away: nobody, not even the control
plane, can mint a fourth. The certificates and their private keys are sealed
(AES-256-GCM) under the **account's data key** and stored in the metadata
database, so erasing the account crypto-shreds its clusters' credentials with
its other data. The stored row holds only the cluster id, the account's
pseudonymous ref and the ciphertext: no name, no certificate in clear.

Private keys never reach a disk file in clear: :class:`MemoryKeySecurity`
hands them to OpenSSL through an anonymous in-memory file (``memfd``), where
distributed's own ``Security`` would write them to a temporary directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security
from sqlalchemy import select

from pipeline.db import cluster_credentials, insert_ignoring_duplicates, transaction
from pipeline.errors import CredentialsError, KeyringError, UnknownAccountError
from pipeline.keys import Keyring
from pipeline.records import utcnow

__all__ = [
    "DEFAULT_HOSTS",
    "ROLES",
    "ClusterCredentials",
    "MemoryKeySecurity",
    "cluster_security",
    "dask_tls_config",
    "issue_credentials",
    "load_credentials",
]

ROLES = ("scheduler", "worker", "client")
#: names every certificate is valid for, besides the hosts a caller adds
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_NONCE = 12


@dataclass(frozen=True)
class ClusterCredentials:
    """One cluster's CA certificate and its role certificates with their private keys (PEM)."""

    cluster_id: str
    ca_cert: str
    certs: dict[str, str]
    keys: dict[str, str] = field(repr=False)
    not_after: datetime

    def security(self, roles: Iterable[str] = ROLES) -> MemoryKeySecurity:
        """A ``distributed.Security`` requiring TLS, holding the certificates of ``roles`` only."""
        chosen = set(roles)
        if unknown := chosen - set(ROLES):
            raise ValueError(f"unknown TLS roles {sorted(unknown)}; known: {', '.join(ROLES)}")
        kwargs: dict[str, str | None] = {}
        for role in ROLES:
            kwargs[f"tls_{role}_cert"] = self.certs[role] if role in chosen else None
            kwargs[f"tls_{role}_key"] = self.keys[role] if role in chosen else None
        return MemoryKeySecurity(require_encryption=True, tls_ca_file=self.ca_cert, **kwargs)

    @classmethod
    def from_json(cls, cluster_id: str, data: Mapping[str, str]) -> ClusterCredentials:
        """The credentials as :meth:`to_json` gave them (e.g. in a ``POST /v1/clusters`` response)."""
        return cls(
            cluster_id,
            data["ca_cert"],
            {role: data[f"{role}_cert"] for role in ROLES},
            {role: data[f"{role}_key"] for role in ROLES},
            datetime.fromisoformat(data["not_after"]),
        )

    def to_json(self) -> dict[str, Any]:
        """The PEM documents by role, for the one party allowed to see them (API response)."""
        return {
            "ca_cert": self.ca_cert,
            **{f"{role}_cert": self.certs[role] for role in ROLES},
            **{f"{role}_key": self.keys[role] for role in ROLES},
            "not_after": self.not_after.isoformat(),
        }


def dask_tls_config(tls: Mapping[str, str]) -> dict[str, Any]:
    """The ``distributed.comm`` settings (PEM inline) for credentials in :meth:`ClusterCredentials.to_json`
    form: what ``dask scheduler``, ``dask worker`` and a client need to run over this cluster's TLS."""
    roles = {role: {"cert": tls[f"{role}_cert"], "key": tls[f"{role}_key"]} for role in ROLES}
    return {"distributed": {"comm": {"require-encryption": True, "tls": {"ca-file": tls["ca_cert"], **roles}}}}


class MemoryKeySecurity(Security):
    """distributed's ``Security``, except that PEM certificates and keys given in memory reach
    OpenSSL through anonymous memory files instead of a temporary directory on disk.

    (No ``__slots__`` of its own: distributed reads ``self.__slots__`` as its list of options.)
    """

    def _get_tls_context(self, tls: dict[str, Any], purpose: Any) -> Any:
        cert, key = tls.get("cert"), tls.get("key")
        if not (cert and key and "\n" in cert and "\n" in key):
            return super()._get_tls_context(tls, purpose)
        with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
            return super()._get_tls_context({**tls, "cert": cert_path, "key": key_path}, purpose)


@contextmanager
def _memory_file(text: str) -> Iterator[str]:
    """A path OpenSSL can open that holds ``text``: a memfd on Linux, else a 0600 temp file removed after."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dask-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="dask-tls-")  # mkstemp creates the file with mode 0600
    try:
        os.write(fd, text.encode())
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _generate(
    cluster_id: str, hosts: Iterable[str], validity: timedelta, now: datetime
) -> tuple[str, dict[str, str], dict[str, str], datetime]:
    """A CA (discarded after signing) and one ECDSA P-256 certificate per role."""
    not_before, not_after = now - timedelta(minutes=5), now + validity  # 5 min: clock skew between hosts
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"metadata-pipeline cluster CA {cluster_id}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    san = _san([*DEFAULT_HOSTS, *hosts])
    # scheduler and workers both listen and dial each other; a client only dials
    usages = {
        "scheduler": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "worker": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }
    certs: dict[str, str] = {}
    keys: dict[str, str] = {}
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"dask-{role} {cluster_id}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages[role]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if role != "client":
            builder = builder.add_extension(san, critical=False)
        certs[role] = _pem_cert(builder.sign(ca_key, hashes.SHA256()))
        keys[role] = _pem_key(key)
    return _pem_cert(ca_cert), certs, keys, not_after


def _aad(cluster_id: str, subject_ref: str, key_version: int) -> bytes:
    """Binds the ciphertext to its row: a sealed bundle moved to another cluster does not open."""
    return f"cluster-credentials|{cluster_id}|{subject_ref}|{key_version}".encode()


def issue_credentials(
    keyring: Keyring,
    account: str,
    cluster_id: str,
    *,
    hosts: Iterable[str] = (),
    validity: timedelta = timedelta(days=7),
    now: datetime | None = None,
) -> ClusterCredentials:
    """Make a cluster's CA and certificates and store them sealed under ``account``'s data key.

    :raises CredentialsError: the cluster already has credentials
    :raises StoreUnavailable: the metadata database cannot be reached
    """
    ca_cert, certs, keys, not_after = _generate(cluster_id, hosts, validity, now or utcnow())
    credentials = ClusterCredentials(cluster_id, ca_cert, certs, keys, not_after)
    subject_ref = keyring.subject_ref(account)
    key_version, cipher = keyring.cipher(subject_ref)
    nonce = os.urandom(_NONCE)
    bundle = json.dumps({"ca_cert": ca_cert, "certs": certs, "keys": keys}).encode()
    sealed = nonce + cipher.encrypt(nonce, bundle, _aad(cluster_id, subject_ref, key_version))
    with transaction(keyring.engine, f"storing TLS credentials of cluster {cluster_id!r}") as conn:
        stored = conn.execute(
            insert_ignoring_duplicates(keyring.engine, cluster_credentials)
            .returning(cluster_credentials.c.cluster_id)
            .values(
                cluster_id=cluster_id,
                subject_ref=subject_ref,
                key_version=key_version,
                not_after=not_after,
                sealed=sealed,
                created_at=utcnow(),
            )
        ).first()
    if stored is None:
        raise CredentialsError(f"cluster {cluster_id!r} already has TLS credentials")
    return credentials


def load_credentials(keyring: Keyring, cluster_id: str) -> ClusterCredentials:
    """Open a cluster's stored credentials.

    :raises CredentialsError: none were issued, or they were destroyed with the account's keys
    """
    with transaction(keyring.engine, f"reading TLS credentials of cluster {cluster_id!r}") as conn:
        row = conn.execute(select(cluster_credentials).where(cluster_credentials.c.cluster_id == cluster_id)).first()
    if row is None:
        raise CredentialsError(f"no TLS credentials were issued for cluster {cluster_id!r}")
    try:
        cipher = keyring.cipher_for(row.subject_ref, None, row.key_version)
        bundle = json.loads(
            cipher.decrypt(row.sealed[:_NONCE], row.sealed[_NONCE:], _aad(cluster_id, row.subject_ref, row.key_version))
        )
    except (KeyringError, UnknownAccountError) as exc:
        raise CredentialsError(
            f"TLS credentials of cluster {cluster_id!r} were destroyed with their account's data key"
        ) from exc
    except InvalidTag as exc:
        raise CredentialsError(f"TLS credentials of cluster {cluster_id!r} were altered or moved") from exc
    return ClusterCredentials(cluster_id, bundle["ca_cert"], bundle["certs"], bundle["keys"], row.not_after)


def cluster_security(
    keyring: Keyring, cluster_id: str, *, roles: Iterable[str] = ROLES, now: datetime | None = None
) -> MemoryKeySecurity:
    """The ``distributed.Security`` (TLS required) for a cluster from its stored credentials.

    :raises CredentialsError: none issued, destroyed, or expired (a handshake would fail obscurely)
    """
    credentials = load_credentials(keyring, cluster_id)
    if (now or utcnow()) >= credentials.not_after:
        raise CredentialsError(
            f"TLS credentials of cluster {cluster_id!r} expired at {credentials.not_after.isoformat()}; "
            "register the cluster again for new ones"
        )
    return credentials.security(roles)
