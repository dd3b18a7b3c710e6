"""Values the program did not choose, made safe to show to a person.

- :func:`mask_url`: settings hold URLs such as ``postgresql+psycopg://root:SECRET@db/meta``;
  every message, listing and log line that shows a URL passes it through this first.
  SQLAlchemy's ``render_as_string(hide_password=True)`` only understands database
  URLs; this works for any scheme, and for URLs inside a URL's query
  (``s3://bucket/prefix?endpoint=http://user:SECRET@host``).
- :func:`mask_urls`: the same for every URL in a text a library wrote (botocore's
  ``Could not connect to the endpoint URL: "http://user:SECRET@host/..."``).
- :func:`printable`: names come from users; a newline or an ESC sequence in one
  must not forge lines or drive the terminal of whoever reads the output.
- :func:`quoted`: a bad value in an error message is shown in part, never whole.
- :func:`first_line`: an error message is one line, whatever a library's exception says,
  and shows no password of a URL it quotes.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["first_line", "mask_url", "mask_urls", "printable", "quoted"]

MASK = "***"
#: query parameters that carry a secret (libpq's ``password``, cloud SDKs' tokens and keys)
_SECRET_PARAMS = ("password", "passwd", "secret", "token", "key", "signature", "credential")
#: a URL in free text: it ends at whitespace or a quote
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
#: ``user:password@`` without a scheme (an endpoint written ``user:password@host:port``)
_USERINFO = re.compile(r"([^\s:/@\"'<>`]+):[^\s/@\"'<>`]+@")


def mask_url(url: str) -> str:
    """``url`` with its password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparseable (e.g. a broken IPv6 host): hide everything before the host
        return f"{url.split('//', 1)[0]}//{MASK}@{url.rpartition('@')[2]}" if "@" in url else url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, MASK if _is_secret(k) else mask_urls(v)) for k, v in pairs]
        if masked != pairs:
            query = urlencode(masked, safe="*/:=@")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    tail = (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def mask_urls(text: str) -> str:
    """``text`` with :func:`mask_url` applied to every URL in it, and any ``user:password@`` masked."""
    if "://" in text:
        text = _URL.sub(lambda match: mask_url(match.group()), text)
    return _USERINFO.sub(rf"\1:{MASK}@", text) if "@" in text else text


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_PARAMS)


_QUOTE = 40  # characters of a bad value an error message shows


def quoted(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters: a message never carries a whole bad value."""
    text = repr(value)
    return text if len(text) <= _QUOTE else f"{text[: _QUOTE - 1]}…"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (SDK errors carry tracebacks and response bodies),
    its URLs passed through :func:`mask_urls` (SDK errors quote the endpoint URL, password included)."""
    lines = str(error).splitlines()
    return mask_urls(lines[0]) if lines else type(error).__name__


def printable(text: str, keep: str = "") -> str:
    """``text`` with control and format characters (newline, ESC, bidi overrides) escaped as ``\\x1b``.

    :param keep: characters left as they are (``"\\n"`` for multi-line output a program built)
    """
    if text.isprintable():
        return text
    return "".join(
        c if c in keep or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") else _escape(c)
        for c in text
    )


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
