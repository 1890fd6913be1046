"""What went wrong when a host could not be reached: DNS, TLS or the connection, in one line.

httpx reports all three as a `ConnectError` (its text is the socket's or ssl's message); a
person needs to know which, and what to check. Retrying cannot fix a name that does not exist
or a certificate that is not trusted, so those are `permanent`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

# getaddrinfo's messages on Linux (glibc, musl), macOS and Windows.
_DNS_PERMANENT = ("name or service not known", "nodename nor servname", "no address associated",
                  "getaddrinfo failed", "name does not resolve", "no such host")
_DNS_TEMPORARY = ("temporary failure in name resolution",)
_TLS = ("ssl", "certificate", "tls", "wrong version number", "handshake")


@dataclass(frozen=True)
class ConnectionProblem:
    """`kind` is dns, tls, refused or connection; `message` is the one line to show."""

    kind: str
    message: str
    permanent: bool


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def connection_problem(exc: BaseException, url: str) -> ConnectionProblem:
    """Which of DNS, TLS or the connection failed reaching `url`'s host, and why."""
    parts = urlsplit(url)
    host = parts.hostname or url
    where = f"{host}:{parts.port}" if parts.port else host
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    detail = next((str(e) for e in chain if str(e)), type(exc).__name__)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
            "certificate verify failed" in text):
        return ConnectionProblem("tls", f"TLS failure with {where}: its certificate is not "
                                 f"trusted ({detail}); if a proxy or private CA signs it, point "
                                 "SSL_CERT_FILE at that CA's certificate", permanent=True)
    if any(isinstance(e, ssl.SSLError) for e in chain) or (
            isinstance(exc, httpx.ConnectError) and any(word in text for word in _TLS)):
        return ConnectionProblem("tls", f"TLS failure with {where}: the TLS handshake failed "
                                 f"({detail}); does {where} serve https:// on that port?",
                                 permanent=True)
    if any(isinstance(e, socket.gaierror) for e in chain) or any(
            words in text for words in _DNS_PERMANENT + _DNS_TEMPORARY):
        temporary = any(words in text for words in _DNS_TEMPORARY)
        return ConnectionProblem("dns", f"DNS failure: {host} could not be resolved ({detail});"
                                 " check the host name in the URL and this machine's DNS",
                                 permanent=not temporary)
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text:
        return ConnectionProblem("refused", f"connection refused by {where} ({detail}); is "
                                 "the URL's port right and the service up?", permanent=False)
    return ConnectionProblem("connection", f"connection error with {where} "
                             f"({type(exc).__name__}: {detail})", permanent=False)
