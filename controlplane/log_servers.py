"""A log on several PostgreSQL servers: how the head makes it, and how a process given
server 0's URL finds the others (migrations/sql/0021 and 0023; controlplane/README.md,
"A log on several servers").

Server 0 is the log's home: membership, projections and jobs live there, as on a log of
one server, and every process is given its URL only. Its ``log_servers`` table names the
others; its ``log_union`` schema reads every server's events through ``postgres_fdw``
(the one entry point of audit queries: a view per server merged in ``cairn sql`` would
have to copy every view and ``lineage()`` into Python, where the union lets PostgreSQL
run them, and push their filters down to each server)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from controlplane import schema
from controlplane.errors import GcsError
from controlplane.eventlog.servers import server_url
from controlplane.gcs_url import hosts, normalize, redact
from controlplane.sql import queries

FOREIGN_SERVER = "cairn_log_server_{}"  # server 0's postgres_fdw server for server k
FOREIGN_SCHEMA = "log_server_{}"  # ... and the schema of its foreign `events`
_FOREIGN_SERVER_NAMED = re.compile('"' + FOREIGN_SERVER.format(r"(\d+)") + '"')
READERS = ("cairn_runtime", "cairn_audit")
FOLLOWING = ("target_session_attrs",)  # the options of a URL kept beside TLS's


def server_not_answering(error: BaseException) -> int | None:
    """The server of the log that ``error`` (a query through ``log_union``) says does not
    answer (postgres_fdw could not connect to it, or lost it), else None."""
    if not str(getattr(error, "sqlstate", "")).startswith("08"):  # (connection exceptions)
        return None
    found = _FOREIGN_SERVER_NAMED.search(str(error))
    return int(found.group(1)) if found else None


def address_of(url: str, *, on_home_machine: bool) -> str:
    """What ``log_servers`` keeps of a server's URL: no login; without hosts for a
    server on server 0's machine, its ports only (each process reaches it at the host
    it reaches server 0 at: loopback on the head, the head's address on other
    machines). Several entries: a primary and its replica (on another machine, at the
    same port: one entry, which each process pairs with each host of server 0's)."""
    entries = hosts(normalize(url))
    if on_home_machine:
        entries = list(dict.fromkeys(f":{_port(entry)}" for entry in entries))
    return urlunsplit(urlsplit(normalize(url))._replace(netloc=",".join(entries)))


def server_urls(url: str) -> list[str]:
    """Every server of the log whose server 0 ``url`` names, in order, with its login
    (``eventlog.servers.log_urls`` without an event loop: the command line's
    maintenance, which may run inside one)."""
    with psycopg.connect(normalize(url), autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(queries["log_server_addresses"]).fetchall()
    return [url, *(server_url(url, address) for (address,) in rows[1:])]


def _port(entry: str) -> int:
    """The port of a ``host:port`` entry of a URL (PostgreSQL's if it names none)."""
    return urlsplit(f"//{entry}").port or 5432


def place_log(
    owner_urls: Sequence[str], runtime_urls: Sequence[str], addresses: Sequence[str], shards: int
) -> None:
    """Makes the log of migrated servers (owners' URLs, server 0 first) one log of
    ``shards`` shards, or checks that they are one already, in this order; names the
    servers on server 0, and makes its union of their events. ``runtime_urls``: each
    server as server 0 reaches it (its foreign tables log in with them)."""
    layouts = [_layout(url) for url in owner_urls]
    if all(servers == len(owner_urls) for _shards, _index, servers, _events in layouts):
        misplaced = [i for i, layout in enumerate(layouts) if layout[1] != i]
        if misplaced:
            raise GcsError(
                f"{redact(owner_urls[misplaced[0]])} is server {layouts[misplaced[0]][1]} of "
                f"its log, not {misplaced[0]}: name the servers in the order the log was made with"
            )
    elif any(servers > 1 or events for _shards, _index, servers, events in layouts):
        raise GcsError(
            "the servers given hold logs already (events, or another placement on servers): "
            f"a log is placed on {len(owner_urls)} servers when it is made, on new databases"
        )
    else:
        schema.set_log_servers(owner_urls, max(shards, len(owner_urls)))
    with psycopg.connect(normalize(owner_urls[0]), autocommit=True, connect_timeout=5) as conn:
        if len(owner_urls) > 1:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        for index, (url, address) in enumerate(zip(runtime_urls, addresses, strict=True)):
            conn.execute(
                "INSERT INTO log_servers (server_index, address) VALUES (%s, %s) "
                "ON CONFLICT (server_index) DO UPDATE SET address = EXCLUDED.address",
                (index, address),
            )
            if index:
                _foreign_events(conn, index, url)
        conn.execute("SELECT cairn_make_log_union_v1()")


def _layout(url: str) -> tuple[int, int, int, bool]:
    with psycopg.connect(normalize(url), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT shard_count, server_index, server_count, "
            "EXISTS (SELECT 1 FROM events) FROM event_log_head WHERE id = 1"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), bool(row[3])


def _foreign_events(conn: psycopg.Connection, index: int, url: str) -> None:
    """Server ``index``'s events as a foreign table on server 0, made anew."""
    parts = urlsplit(normalize(url))
    server = sql.Identifier(FOREIGN_SERVER.format(index))
    into = sql.Identifier(FOREIGN_SCHEMA.format(index))
    entries = hosts(normalize(url))
    options = {  # (several hosts: a primary and its replica, the one taking writes used)
        "host": ",".join(urlsplit(f"//{entry}").hostname or "127.0.0.1" for entry in entries),
        "port": ",".join(str(_port(entry)) for entry in entries),
        "dbname": parts.path.lstrip("/") or "postgres",
        **{k: v for k, v in parse_qsl(parts.query) if k.startswith("ssl") or k in FOLLOWING},
    }
    login = {"user": unquote(parts.username or ""), "password": unquote(parts.password or "")}
    conn.execute(sql.SQL("DROP SERVER IF EXISTS {} CASCADE").format(server))
    conn.execute(
        sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({})").format(
            server, _options(options)
        )
    )
    conn.execute(
        sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER {} OPTIONS ({})").format(
            server, _options(login)
        )
    )
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(into))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(into))
    conn.execute(
        sql.SQL("IMPORT FOREIGN SCHEMA public LIMIT TO (events) FROM SERVER {} INTO {}").format(
            server, into
        )
    )
    for role in READERS:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            grantee = sql.Identifier(role)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(into, grantee))
            conn.execute(sql.SQL("GRANT SELECT ON {}.events TO {}").format(into, grantee))


def _options(options: dict[str, str]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items()
    )
