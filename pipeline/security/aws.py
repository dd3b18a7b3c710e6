"""AWS credentials for workers: short-lived STS session tokens, never the user's long-term keys.

The long-term credentials stay where the client runs. :class:`SessionTokenForwarder`
asks STS for a session token there (``GetSessionToken``, or ``AssumeRole`` when
``pipeline.aws.role-arn`` is set), seals it with HPKE to the cluster's **worker
certificate** and registers :class:`AWSCredentialsPlugin`. The scheduler stores and
relays only that ciphertext (distributed logs every message at DEBUG level, and user
code can read the scheduler's plugins): only a process holding the cluster's worker TLS
key opens it. Each worker, present and future, installs the token as the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` variables, with
its expiry in ``AWS_CREDENTIAL_EXPIRATION``, so boto3, botocore and everything built on
them (s3fs, pyarrow) use it, and a client made before a refresh reads the new one as its
token nears expiry. Refreshing needs the
long-term keys, so it happens on the client side too: once three quarters of the token's
life have passed, the forwarder fetches a new one and re-registers the plugin, which
replaces the old token on every worker before it expires.

Without local AWS credentials nothing is forwarded: workers have none and reach only
public data. Credentials never go into a record, a log line, the spool or a report:
the dataclass hides them from ``repr`` and only the expiry time is ever logged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import dask.config
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from distributed import WorkerPlugin

from pipeline.config import Settings
from pipeline.errors import ConfigError, CredentialsError
from pipeline.records import utcnow

if TYPE_CHECKING:
    import boto3
    from distributed import Client, Worker

__all__ = [
    "AWSCredentialsPlugin",
    "SessionCredentials",
    "SessionTokenForwarder",
    "forward_aws_credentials",
    "issue_session_credentials",
    "seal_for_workers",
    "withheld_from_new_processes",
]

logger = logging.getLogger(__name__)

#: with the expiry set, botocore reads the other three again as it nears (a client made before a refresh
#: takes the new token); without it, they are static for every client that read them
ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION")
#: what processes started from the client must not inherit (``AWS_SECURITY_TOKEN``: botocore's older name)
WITHHELD_ENV_NAMES = (*ENV_NAMES, "AWS_SECURITY_TOKEN")
PLUGIN_NAME = "metadata-pipeline-aws-credentials"
#: a token is replaced once this share of its lifetime is left
REFRESH_AT_REMAINING = 0.25
#: RFC 9180 suite matching the worker certificate's ECDSA P-256 key
_SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO = b"metadata-pipeline aws session credentials v1"


@dataclass(frozen=True)
class SessionCredentials:
    """Temporary credentials from STS; the secret parts never show in ``repr``."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: datetime
    lifetime: timedelta

    @property
    def refresh_at(self) -> datetime:
        """When a forwarder replaces this token: well before it expires."""
        return self.expiration - self.lifetime * REFRESH_AT_REMAINING


def issue_session_credentials(
    session: boto3.Session | None = None,
    *,
    role_arn: str | None = None,
    duration: timedelta = timedelta(hours=1),
    session_name: str = "metadata-pipeline",
) -> SessionCredentials | None:
    """A session token made with the local long-term credentials; None when there are none.

    :raises CredentialsError: the local credentials cannot be resolved (an expired SSO login, a failing
        ``credential_process``, an assume-role profile whose source keys are refused), are temporary
        without a role, or STS refused (the reason names the call and the role)
    :raises ConfigError: a role is configured but boto3 is not installed
    """
    if session is None:
        try:
            import boto3
        except ModuleNotFoundError as exc:  # no boto3, no local AWS credentials to use
            if role_arn:
                raise ConfigError("pipeline.aws.role-arn needs boto3: install dask-metadata-pipeline[aws]") from exc
            return None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if session is None:
            session = boto3.Session()
        # botocore resolves lazily: a profile's credential_process, SSO login or AssumeRole runs here
        credentials = session.get_credentials()
        temporary = credentials is not None and bool(credentials.token)
    except (BotoCoreError, ClientError) as exc:
        profile = f" (profile {session.profile_name})" if session is not None else ""
        raise CredentialsError(f"the local AWS credentials{profile} cannot be resolved: {_one_line(exc)}") from exc
    if credentials is None:
        return None
    if temporary and not role_arn:  # STS documents that it refuses them (an instance role, SSO)
        raise CredentialsError(
            "AWS STS GetSessionToken needs long-term credentials, and the ones here are temporary "
            "(they hold a session token): set pipeline.aws.role-arn so workers get AssumeRole credentials"
        )

    seconds = int(duration.total_seconds())
    what = f"AssumeRole of {role_arn}" if role_arn else "GetSessionToken"
    try:
        sts = session.client("sts")
        if role_arn:
            response = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name, DurationSeconds=seconds)
        else:
            response = sts.get_session_token(DurationSeconds=seconds)
    except (BotoCoreError, ClientError) as exc:
        raise CredentialsError(f"AWS STS {what} failed: {_one_line(exc)}") from exc
    issued = response["Credentials"]
    return SessionCredentials(
        access_key_id=issued["AccessKeyId"],
        secret_access_key=issued["SecretAccessKey"],
        token=issued["SessionToken"],
        expiration=issued["Expiration"],
        lifetime=duration,
    )


def _one_line(exc: Exception) -> str:
    """botocore's message on one line (a credential_process's stderr may hold several, and ends in one)."""
    return " ".join(str(exc).split())


def seal_for_workers(credentials: SessionCredentials, worker_cert: str) -> bytes:
    """Encrypt credentials to the public key of a cluster's worker certificate (PEM)."""
    public_key = x509.load_pem_x509_certificate(worker_cert.encode()).public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CredentialsError("the worker certificate has no P-256 key to seal AWS credentials to")
    plain = json.dumps(
        {
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key,
            "token": credentials.token,
            "expiration": credentials.expiration.isoformat(),
        }
    ).encode()
    return _SUITE.encrypt(plain, public_key, info=_INFO)


def _open_on_worker(sealed: bytes, worker: Worker) -> dict[str, str]:
    """Decrypt with the worker's TLS key (in memory, or the file distributed's config names)."""
    tls = worker.security.get_tls_config_for_role("worker")
    pem = tls["key"] or tls["cert"]  # a key may be appended to the certificate file
    if not pem:
        raise CredentialsError("this worker has no TLS key: AWS credentials are only forwarded to TLS clusters")
    if "\n" not in pem:
        with open(pem) as fh:
            pem = fh.read()
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an elliptic-curve key")
        opened: dict[str, str] = json.loads(_SUITE.decrypt(sealed, key, info=_INFO))
    except (ValueError, InvalidTag) as exc:
        raise CredentialsError("AWS credentials were sealed to another cluster's worker certificate") from exc
    return opened


class AWSCredentialsPlugin(WorkerPlugin):
    """Opens a sealed session token on a worker and installs it for boto3/botocore; removes it at teardown.

    Credentials the worker had in these variables before (a LocalCluster's workers inherit the client's
    environment) are replaced, and neither kept nor put back: teardown leaves none in the environment.
    """

    name = PLUGIN_NAME
    idempotent = False  # registering again replaces the token: that is how it is refreshed

    def __init__(self, sealed: bytes) -> None:
        self.sealed = sealed
        self._installed: str | None = None  # the access key id of the session it installed

    def setup(self, worker: Worker) -> None:
        opened = _open_on_worker(self.sealed, worker)
        os.environ.update(
            AWS_ACCESS_KEY_ID=opened["access_key_id"],
            AWS_SECRET_ACCESS_KEY=opened["secret_access_key"],
            AWS_SESSION_TOKEN=opened["token"],
            AWS_CREDENTIAL_EXPIRATION=opened["expiration"],
        )
        self._installed = opened["access_key_id"]
        _forget_cached_boto3_session()

    def teardown(self, worker: Worker) -> None:
        if self._installed is None or os.environ.get("AWS_ACCESS_KEY_ID") != self._installed:
            return  # none installed, or code on the worker has set credentials of its own since
        for name in ENV_NAMES:
            os.environ.pop(name, None)
        self._installed = None
        _forget_cached_boto3_session()


def _forget_cached_boto3_session() -> None:
    """boto3's default session caches the credentials it resolved first: make it resolve again."""
    try:
        import boto3
    except ModuleNotFoundError:
        return
    boto3.DEFAULT_SESSION = None


@contextmanager
def withheld_from_new_processes() -> Iterator[None]:
    """This process's AWS credential variables removed while processes it starts inherit its environment
    (a LocalCluster spawning its workers), then put back: the workers start with none and get only the
    session token forwarded to them. Another thread of this process resolving credentials meanwhile finds
    none there: start the processes while nothing else does (a boto3 client made before keeps its own)."""
    held = {name: os.environ.pop(name) for name in WITHHELD_ENV_NAMES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(held)


class SessionTokenForwarder:
    """Keeps a client's workers supplied with a valid session token, refreshed before it expires."""

    def __init__(
        self,
        client: Client,
        *,
        worker_cert: str | None = None,
        session: boto3.Session | None = None,
        role_arn: str | None = None,
        duration: timedelta | None = None,
        clock: Callable[[], datetime] = utcnow,
        check_every: float = 60.0,
    ) -> None:
        """:param worker_cert: the cluster's worker certificate (PEM); default ``pipeline.aws.worker-cert``,
            which a cluster's ``client.yaml`` holds
        :param role_arn: the role whose ``AssumeRole`` credentials workers get; default
            ``pipeline.aws.role-arn`` (none: ``GetSessionToken`` credentials)
        :param duration: a token's lifetime; default ``pipeline.aws.session-duration``
        :raises ConfigError: no worker certificate, or a configuration key that does not parse
        """
        worker_cert = worker_cert or dask.config.get("pipeline.aws.worker-cert", None)
        if not worker_cert:
            raise ConfigError(
                "no worker certificate to seal AWS session tokens to: run with the cluster's client.yaml "
                "(pipeline.aws.worker-cert; one written before this release has none) or give worker_cert, "
                "the certificate (not the key) in the cluster's worker.yaml"
            )
        if role_arn is None or duration is None:
            settings = Settings.from_config()
            role_arn = role_arn or settings.aws_role_arn
            duration = duration or timedelta(seconds=settings.aws_session_duration)
        self.client = client
        self.worker_cert = worker_cert
        self.session = session
        self.role_arn = role_arn
        self.duration = duration
        self.clock = clock
        self.check_every = check_every
        self.credentials: SessionCredentials | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def forward(self) -> bool:
        """Fetch a token and install it on the workers; False when there are no local credentials."""
        credentials = issue_session_credentials(self.session, role_arn=self.role_arn, duration=self.duration)
        if credentials is None:
            logger.info("no local AWS credentials: workers get none and reach only public data")
            return False
        plugin = AWSCredentialsPlugin(seal_for_workers(credentials, self.worker_cert))
        self.client.register_plugin(plugin, name=PLUGIN_NAME)
        self.credentials = credentials
        logger.info("AWS session token forwarded to workers; it expires at %s", credentials.expiration.isoformat())
        return True

    def refresh_if_due(self) -> bool:
        """Replace the token once it reached its refresh time; True when it did."""
        if self.credentials is None or self.clock() < self.credentials.refresh_at:
            return False
        return self.forward()

    def start(self) -> bool:
        """Forward a token now and keep refreshing it on a background thread until :meth:`close`."""
        if not self.forward():
            return False
        self._thread = threading.Thread(target=self._run, name="aws-session-token-refresh", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.check_every):
            try:
                self.refresh_if_due()
            except Exception as exc:  # keep trying: the old token is still valid for a while
                logger.warning("refreshing the workers' AWS session token failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> SessionTokenForwarder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def forward_aws_credentials(
    client: Client,
    *,
    worker_cert: str,
    role_arn: str | None,
    duration: timedelta,
    session: boto3.Session | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> SessionTokenForwarder:
    """Start forwarding session tokens to the workers of ``client``'s TLS cluster (a no-op without
    local credentials); ``worker_cert`` is that cluster's worker certificate (PEM)."""
    forwarder = SessionTokenForwarder(
        client, worker_cert=worker_cert, session=session, role_arn=role_arn, duration=duration, clock=clock
    )
    forwarder.start()
    return forwarder
