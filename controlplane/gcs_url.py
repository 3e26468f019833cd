"""GCS URLs: where the log lives. One URL form for users (``postgresql://...``) and the
driver-specific forms derived from it, plus redaction for messages."""

from __future__ import annotations

import os
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit, urlunsplit

ENV_VAR = "CAIRN_GCS_URL"
# the URL a head hands the nodes that join it (for their machines), in its daemon's
# environment: it holds the runtime's password
JOIN_ENV_VAR = "CAIRN_JOIN_GCS_URL"
# the GCS replicas' plans (a JSON list of gcs_replica.ReplicaPlan, one per server of
# the log), from the head's process to its daemon, which hands them to the node that
# joins on the replicas' host
JOIN_REPLICA_ENV_VAR = "CAIRN_JOIN_GCS_REPLICA"
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
    """The form SQLAlchemy needs to use psycopg 3 (several hosts, for failover, go in
    the query string as ``host=`` parameters, as SQLAlchemy wants them)."""
    parts = urlsplit(normalize(url))._replace(scheme="postgresql+psycopg")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," in hosts:
        query = "&".join([*(f"host={h}" for h in hosts.split(",")), *filter(None, [parts.query])])
        parts = parts._replace(netloc=f"{userinfo}{at}", query=query)
    return urlunsplit(parts)


def with_query(url: str, params: dict[str, str]) -> str:
    """The URL with ``params`` set in its query string (replacing those of the same
    name): how a node adds its TLS files to the URL it was given."""
    parts = urlsplit(url)
    query = {k: v for k, v in parse_qsl(parts.query) if k not in params}
    return urlunsplit(parts._replace(query=urlencode({**query, **params})))


def hosts(url: str) -> list[str]:
    """The ``host:port`` entries of a URL, in order (several for failover)."""
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[2].split(",")


def with_hosts(url: str, entries: list[str]) -> str:
    """The URL naming ``entries`` (``host:port``, IPv6 hosts in brackets) instead of its
    own hosts; user, password, database and query kept."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{','.join(entries)}"))


def with_login(url: str, user: str, password: str) -> str:
    """The URL with another login (hosts, database and query kept)."""
    parts = urlsplit(url)
    hostlist = parts.netloc.rpartition("@")[2]
    login = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{login}@{hostlist}"))


def single_host_urls(url: str) -> list[str]:
    """One URL per host of a (multi-host) URL, in order."""
    return [with_hosts(url, [entry]) for entry in hosts(url)]


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for error messages and logs."""
    parts: SplitResult = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")  # hosts: one, or several (failover)
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hosts}"))
