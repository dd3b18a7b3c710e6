"""The command line's side of the control plane: ``login`` credentials and scoped API calls.

``login`` keeps the URL and token in ``~/.config/metadata-pipeline/credentials.yaml``
(mode 0600, like any hosted service's CLI). With it, ``records``, ``clusters``
and ``erase`` go through the API and see only what the token may see; the
setting ``pipeline.api.url`` wins over the file's URL. Problem responses
become one-line :class:`ApiError` messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from pipeline.errors import ApiError, ConfigError
from pipeline.fsmodes import private_folder, write_private
from pipeline.redact import first_line, mask_url

__all__ = ["ApiClient", "Credentials", "Receipt", "credentials_path"]


def credentials_path() -> Path:
    return Path.home() / ".config" / "metadata-pipeline" / "credentials.yaml"


@dataclass(frozen=True)
class Credentials:
    """Where the control plane is and the token that speaks for the user."""

    url: str
    token: str

    @classmethod
    def load(cls, api_url: str | None = None) -> Credentials | None:
        """The saved login (``None``: not logged in); ``api_url`` overrides its URL.

        :raises ConfigError: the file is unreadable, malformed or readable by others
        """
        path = credentials_path()
        if not path.exists():
            return None
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others; run chmod 600 {path} (or log in again)")
        try:
            doc = yaml.safe_load(path.read_text())
            return cls(url=str(api_url or doc["url"]).rstrip("/"), token=str(doc["token"]))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path} is not a credentials file written by login: {exc}") from exc

    def save(self) -> Path:
        """Write the file with mode 0600 (atomically: a reader never sees half of it)."""
        path = credentials_path()
        private_folder(path.parent)
        write_private(path, yaml.safe_dump({"url": self.url, "token": self.token}).encode())
        return path


@dataclass(frozen=True)
class Receipt:
    """A receipt token for one erasure request, kept beside the login: it follows the request to its end
    even after the erasure has ended the requester's own API token."""

    url: str
    request_id: str
    receipt_token: str

    @staticmethod
    def path(request_id: str) -> Path:
        return credentials_path().parent / "receipts" / f"{quote(request_id, safe='')}.yaml"

    @classmethod
    def load(cls, request_id: str) -> Receipt | None:
        """The kept receipt of ``request_id`` (``None``: none kept here).

        :raises ConfigError: the file is unreadable or malformed
        """
        path = cls.path(request_id)
        if not path.exists():
            return None
        try:
            doc = yaml.safe_load(path.read_text())
            return cls(str(doc["url"]), request_id, str(doc["receipt_token"]))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path} is not a receipt written by erase request: {exc}") from exc

    def save(self) -> Path:
        """Write it 0600 in a 0700 folder."""
        path = self.path(self.request_id)
        private_folder(path.parent)
        write_private(path, yaml.safe_dump({"url": self.url, "receipt_token": self.receipt_token}).encode())
        return path

    def status(self) -> Any:
        """The request's state and receipt, asked with the receipt token alone.

        :raises ApiError:
        """
        with ApiClient(Credentials(self.url, ""), headers={"Receipt-Token": self.receipt_token}) as client:
            return client.json("GET", f"/v1/erasure-requests/{quote(self.request_id, safe='')}/receipt")


#: how a process trusts the control plane's certificate when a private CA signed it (httpx reads them)
TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def http_client(**kwargs: Any) -> httpx.Client:
    """``httpx.Client(**kwargs)``, a trust bundle it cannot load named: httpx builds its TLS context when a client
    is made, and a :data:`TRUST_VARIABLES` path that does not exist, or holds no certificate, was OpenSSL's bare
    "[Errno 2] No such file or directory" for every command and in a scheduler's log.

    :raises ConfigError:
    """
    try:
        return httpx.Client(**kwargs)
    except OSError as exc:  # ssl.SSLError is one
        given = ", ".join(f"{name}={os.environ[name]}" for name in TRUST_VARIABLES if os.environ.get(name))
        raise ConfigError(
            f"cannot load the certificates to trust ({given or 'the default bundle'}): {first_line(exc)}"
        ) from None


def unreachable(what: str, exc: httpx.HTTPError) -> str:
    """``what`` could not be reached, and why; an untrusted certificate met while ``SSL_CERT_DIR`` (read when
    ``SSL_CERT_FILE`` is not set) names no folder says so (OpenSSL skips a missing folder without a word, so
    only the failed check shows it)."""
    folders = "" if os.environ.get("SSL_CERT_FILE") else os.environ.get("SSL_CERT_DIR", "")  # the file wins, in httpx
    missing = [folder for folder in folders.split(os.pathsep) if folder and not Path(folder).is_dir()]
    note = (
        f" (SSL_CERT_DIR names no folder: {', '.join(missing)})"
        if missing and "CERTIFICATE_VERIFY_FAILED" in str(exc)
        else ""
    )
    return f"{what} unreachable: {exc}{note}"


class ApiClient:
    """httpx calls to the control plane with the login's bearer token."""

    def __init__(
        self, credentials: Credentials, *, timeout: float = 30.0, headers: dict[str, str] | None = None
    ) -> None:
        self.url = credentials.url
        sent = {"Authorization": f"Bearer {credentials.token}"} if credentials.token else {}
        try:
            self._http = http_client(base_url=credentials.url, headers={**sent, **(headers or {})}, timeout=timeout)
        except UnicodeEncodeError:  # a header that is not ASCII: a token pasted with a non-breaking space
            raise _malformed_header(self.url) from None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; its JSON answer (``None`` for an answer without a body, e.g. 204).

        :raises ApiError: the server answered with an error or cannot be reached
        """
        with self._send(method, path, **kwargs) as response:
            return response.json() if response.read() else None

    def lines(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A streamed NDJSON answer, one object at a time."""
        with self._send("GET", path, params={k: v for k, v in params.items() if v is not None}) as response:
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    @contextmanager
    def _send(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            response = self._http.send(self._http.build_request(method, path, **kwargs), stream=True)
        except httpx.LocalProtocolError:  # its text quotes the header refused: the token itself
            raise _malformed_header(self.url) from None
        except httpx.HTTPError as exc:
            raise ApiError(unreachable(f"control plane {mask_url(self.url)}", exc)) from exc
        try:
            if response.is_error:
                response.read()
                raise ApiError(
                    f"control plane {mask_url(self.url)}: {response.status_code} {_detail(response)}",
                    response.status_code,
                )
            yield response
        finally:
            response.close()


def _malformed_header(url: str) -> ApiError:
    """The error of a header httpx refuses, without its text: that quotes the header, the token."""
    return ApiError(
        f"control plane {mask_url(url)}: the request could not be sent: a header is malformed "
        "(is the saved token one line of ASCII? run `metadata-pipeline login` again)"
    )


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('title', '')}: {body.get('detail', '')}".strip(": ")
    except ValueError:
        return response.reason_phrase
