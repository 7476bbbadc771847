"""Keeping credentials out of what we print and log.

Error messages and logs quote what they were given (a URL, a server's answer, a file name), and
that can carry a secret: a signed URL (``?X-Goog-Signature=...``), an OAuth token
(``access_token=ya29...``), ``user:password@`` in a URL, an ``Authorization: Bearer ...`` header
echoed by a server. :func:`redact` replaces the secret part with ``[REDACTED]`` and keeps the
rest, so the message still names the host, bucket, object or file at fault.
:class:`RedactingFilter` does the same for every log record, and :func:`format_error` turns an
exception into the one line the command line prints.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[REDACTED]"

# Names whose value is a secret in a query string or a `name=value` pair: signed-URL signatures
# and credentials (GCS, S3, Azure SAS `sig`), OAuth tokens, passwords, API keys.
_SECRET_NAME = (
    r"[A-Za-z0-9_.-]*(?:token|password|passwd|secret|api[_-]?key|apikey|signature|credential)"
    r"|sig|key"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM private keys, whole blocks.
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.S,
        ),
        REDACTED,
    ),
    # `name=value` (query strings, form bodies, command lines). The name must start at a boundary
    # (after ?, &, ;, space, quote...), so `TOKEN_PATH=/var/run/...` is not a token.
    # A quoted value keeps its quotes and may hold spaces: password="a b" -> password="[REDACTED]".
    # An unterminated one (a message cut short) runs to the end of its line.
    (
        re.compile(
            rf"(?i)(?<![A-Za-z0-9_.-])((?:{_SECRET_NAME})=([\"']))(?!\[REDACTED\])"
            r"(?:(?!\2)[^\n])*"
        ),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            rf"(?i)(?<![A-Za-z0-9_.-])((?:{_SECRET_NAME})=[\"']?)(?!\[REDACTED\])"
            rf"[^\s&#'\",;)\]}}]+"
        ),
        rf"\1{REDACTED}",
    ),
    # `Name: value` (YAML, HTTP headers such as X-Auth-Token), for the unambiguous names only:
    # "key: ..." and "sig: ..." are too common in ordinary messages. A space or quote must follow
    # the colon: `scheme://user-token:secret@host` is the URL rule's.
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9_.-])([A-Za-z0-9_.-]*(?:token|password|passwd|secret|api[_-]?key"
            r"|apikey|signature|credential)\s*:[ \t]*([\"']))(?!\[REDACTED\])"
            r"(?:(?!\2)[^\n])*"
        ),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9_.-])([A-Za-z0-9_.-]*(?:token|password|passwd|secret|api[_-]?key"
            r"|apikey|signature|credential)\s*:(?:[ \t]+[\"']?|[\"']))(?!\[REDACTED\])"
            r"[^\s&#'\",;)\]}]+"
        ),
        rf"\1{REDACTED}",
    ),
    # JSON or Python-dict fields: "access_token": "...", 'private_key': '...'.
    (
        re.compile(
            r"(?i)([\"'](?:[A-Za-z0-9_-]*(?:token|password|passwd|secret|api[_-]?key|"
            r"private[_-]?key|signature|credential))[\"']\s*:\s*[\"'])[^\"']*"
        ),
        rf"\1{REDACTED}",
    ),
    # Authorization headers and bare bearer/basic credentials.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # user:password@ in URLs.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), rf"\1{REDACTED}@"),
    # Well-known token formats wherever they appear.
    (re.compile(r"\bya29\.[0-9A-Za-z_-]+"), REDACTED),  # Google OAuth access token
    (re.compile(r"\b1//[0-9A-Za-z_-]{20,}"), REDACTED),  # Google OAuth refresh token
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), REDACTED),  # Google API key
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),  # AWS access key id
    (re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}"), REDACTED),  # Slack
    # JSON Web Tokens (ServiceAccount tokens, OIDC id tokens).
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def redact(text: str) -> str:
    """Replace the credentials in ``text`` with ``[REDACTED]``; keep everything else.

    Covers signed-URL and token query parameters (``X-Goog-Signature``, ``X-Goog-Credential``,
    ``X-Amz-*``, ``sig``, ``access_token``, ``token``, ``key``, ...), ``name=value`` (quoted or
    not), ``Name: value`` (YAML, HTTP headers) and JSON fields named like a secret,
    ``Bearer``/``Basic`` credentials, ``user:password@`` in URLs, PEM private keys, and
    well-known token formats (Google OAuth ``ya29.``, Google API keys, GitHub, AWS access key
    ids, Slack, JWTs). Idempotent: ``redact(redact(t)) == redact(t)``.

    Args:
        text: Any text; non-strings are converted with ``str``.

    Returns:
        The text with every recognised secret replaced.
    """
    text = str(text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def format_error(err: BaseException) -> str:
    """One printable line for an error: its message, redacted, control characters escaped.

    A file name with a newline in it cannot forge a second log line.
    """
    message = redact(str(err)) or type(err).__name__
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", message)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback (see :func:`redact`).

    Attach it to handlers (:func:`install`): handler filters see the records of every logger,
    those of TensorFlow, kfp and urllib3 included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Attach a :class:`RedactingFilter` to every handler of ``logger`` (default: the root).

    Idempotent: a handler gets at most one.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


__all__ = ["REDACTED", "RedactingFilter", "format_error", "install", "redact"]
