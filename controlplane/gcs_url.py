"""GCS URLs: where the log lives. One URL form for users (``postgresql://...``) and the
driver-specific forms derived from it, plus redaction for messages."""

from __future__ import annotations

import os
from urllib.parse import SplitResult, urlsplit, urlunsplit

ENV_VAR = "CAIRN_GCS_URL"
_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg"}


def resolve_gcs_url(url: str | None = None) -> str | None:
    """The URL given, else ``$CAIRN_GCS_URL``, else None (meaning: embedded server)."""
    url = url or os.environ.get(ENV_VAR) or None
    return normalize(url) if url else None


def normalize(url: str) -> str:
    """The plain ``postgresql://`` form; refuses what is not a PostgreSQL URL."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"not a PostgreSQL URL: {redact(url)!r} (expected postgresql://user:pass@host:port/db)"
        )
    return urlunsplit(parts._replace(scheme="postgresql"))


def sqlalchemy_url(url: str) -> str:
    """The form SQLAlchemy needs to use psycopg 3."""
    return urlunsplit(urlsplit(normalize(url))._replace(scheme="postgresql+psycopg"))


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for error messages and logs."""
    parts: SplitResult = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{userinfo}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
