"""The one redactor: every error message and stored response excerpt passes through `redact`.

It knows the secrets in play (the client secret of every session this process opened and every
access token they were issued, remembered by `auth.ClientCredentials`) and masks them, plus any
text shaped like a credential: `Bearer <token>` and `Authorization: <value>`, JSON-quoted too
(`"Authorization": "Bearer ..."`), as a proxy or debug endpoint echoing a request writes it.

A secret is masked only as a whole value: where it is not part of a longer run of letters or
digits. A secret `co` leaves `contoso.crm.dynamics.com` alone.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from urllib.parse import quote

import orjson

MASK = "***"
# Access tokens live about an hour; the newest few thousand (months of hourly refreshes) are
# every token a message could still hold while it is valid. Client secrets are never dropped.
MAX_REMEMBERED_TOKENS = 4096

_LETTER_OR_DIGIT = r"[^\W_]"
# RFC 6750 token68 characters; 16 or more, so prose ("a Bearer challenge") is not masked.
_BEARER = re.compile(
    r"\b(bearer\s+)[A-Za-z0-9\-._~+/]{16,}=*(?=$|[\s,;\"'\\)\]}&])", re.IGNORECASE)
# `Authorization: value`, `authorization=value`, `"Authorization": "value"` and its escaped
# form inside JSON text (`\"Authorization\": \"value\"`): the value up to its quote, the
# end of the header or the next query parameter.
_AUTHORIZATION = re.compile(
    r"""(\bauthorization\b\\?["']?\s*[:=]\s*\\?["']?)[^"'\\\r\n,;}&]+""", re.IGNORECASE)


class Redactor:
    """The secret values in play, and masking them and credential-shaped text in a text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._tokens: OrderedDict[str, None] = OrderedDict()
        self._pattern: re.Pattern[str] | None = None

    def remember_secret(self, value: str | None) -> None:
        """A client secret: masked in every text from now on."""
        if value and value.strip() and value not in self._secrets:
            with self._lock:
                self._secrets.add(value)
                self._pattern = None

    def remember_token(self, value: str | None) -> None:
        """An access token issued to a session of this process."""
        if not value or not value.strip():
            return
        with self._lock:
            if value in self._tokens:
                return
            self._tokens[value] = None
            while len(self._tokens) > MAX_REMEMBERED_TOKENS:
                self._tokens.popitem(last=False)
            self._pattern = None

    def __call__(self, text: str, *secrets: str | None) -> str:
        """`text` with every secret (remembered ones and `secrets`) and every Authorization
        or Bearer value replaced by `***`."""
        pattern = self._known_pattern()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        extra = [s for s in secrets if s and s.strip()]
        if extra:
            text = _whole_values_pattern(extra).sub(MASK, text)
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
        return _AUTHORIZATION.sub(lambda m: m.group(1) + MASK, text)

    def clear(self) -> None:
        """Forget every remembered secret and token (what a new process knows)."""
        with self._lock:
            self._secrets.clear()
            self._tokens.clear()
            self._pattern = None

    def _known_pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and (self._secrets or self._tokens):
                self._pattern = _whole_values_pattern([*self._secrets, *self._tokens])
            return self._pattern


def _written_forms(value: str) -> set[str]:
    """A secret as it may appear in a text: as is, URL-encoded (a form body, a query) and
    escaped inside a JSON string."""
    return {value, quote(value, safe=""), orjson.dumps(value).decode()[1:-1]}


def _whole_values_pattern(values: list[str]) -> re.Pattern[str]:
    forms = sorted({form for value in values for form in _written_forms(value)},
                   key=len, reverse=True)  # longest first: a secret containing another
    alternatives = []
    for form in forms:
        # Only an edge that is a letter or digit can continue a longer word.
        before = f"(?<!{_LETTER_OR_DIGIT})" if re.match(_LETTER_OR_DIGIT, form[0]) else ""
        after = f"(?!{_LETTER_OR_DIGIT})" if re.match(_LETTER_OR_DIGIT, form[-1]) else ""
        alternatives.append(before + re.escape(form) + after)
    return re.compile("|".join(alternatives))


# The process's redactor: sessions tell it their secret and tokens; every message asks it.
REDACTOR = Redactor()


def redact(text: str, *secrets: str | None) -> str:
    """`text` without any secret of this process (nor `secrets`), Bearer token or
    Authorization value: for every error message and stored response excerpt."""
    return REDACTOR(text, *secrets)
