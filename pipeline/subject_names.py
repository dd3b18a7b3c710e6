"""Account and user names as data subjects: one normal form, and nothing that joins two names into one.

A subject's ref is a keyed hash of its account, or of account, NUL and user. A name
holding NUL would make account ``a\\0b`` the same subject as user ``b`` of account
``a`` (erasing one would shred the other), so no name may hold a control character.
Names are compared as refs are made, in NFC: ``café`` typed with a combining accent
and without is one name.
"""

from __future__ import annotations

import unicodedata

from pipeline.errors import InvalidName

__all__ = ["MAX_NAME_CHARS", "checked", "control_character", "normalise", "same"]

#: characters of an account or user name the API takes (and the CLI gives tokens and accounts)
MAX_NAME_CHARS = 200


def normalise(name: str) -> str:
    """NFC: ``café`` typed with a combining accent and without is one name, one ref."""
    return unicodedata.normalize("NFC", name)


def checked(what: str, name: str) -> str:
    """``name`` in NFC.

    :raises InvalidName: it holds a control character (NUL, a line break, ...), naming it and ``what``
    """
    found = control_character(name)
    if found is not None:
        raise InvalidName(f"{what}: a name may not hold a control character ({found})")
    return normalise(name)


def control_character(text: str) -> str | None:
    """The first control character in ``text``, as ``U+XXXX``; None when it holds none."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return None


def same(a: str | None, b: str | None) -> bool:
    """Whether two names (or two absent names) are one, however their accents were typed."""
    if a is None or b is None:
        return a is b
    return normalise(a) == normalise(b)
