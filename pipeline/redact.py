"""Values the program did not choose, made safe to show to a person.

- :func:`mask_url`: settings hold URLs such as ``postgresql+psycopg://root:SECRET@db/meta``;
  every message, listing and log line that shows a URL passes it through this first.
  SQLAlchemy's ``render_as_string(hide_password=True)`` only understands database
  URLs; this works for any scheme.
- :func:`printable`: names come from users; a newline or an ESC sequence in one
  must not forge lines or drive the terminal of whoever reads the output.
- :func:`quoted`: a bad value in an error message is shown in part, never whole.
- :func:`first_line`: an error message is one line, whatever a library's exception says.
"""

from __future__ import annotations

import unicodedata
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["first_line", "mask_url", "printable", "quoted"]

MASK = "***"
#: query parameters that carry a secret (libpq's ``password``, cloud SDKs' tokens and keys)
_SECRET_PARAMS = ("password", "passwd", "secret", "token", "key", "signature", "credential")


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
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _is_secret(k) else v) for k, v in pairs], safe="*/:=")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    tail = (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_PARAMS)


_QUOTE = 40  # characters of a bad value an error message shows


def quoted(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters: a message never carries a whole bad value."""
    text = repr(value)
    return text if len(text) <= _QUOTE else f"{text[: _QUOTE - 1]}…"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (SDK errors carry tracebacks and response bodies)."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


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
