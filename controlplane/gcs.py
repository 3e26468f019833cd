"""Opening the GCS for a session: the PostgreSQL named by URL (argument or
``$CAIRN_GCS_URL``), or else a private embedded server; either way migrated to head.

Two URLs come out (see SECURITY.md, "Database roles"): ``owner_url`` migrates and
maintains the schema, ``url`` is what the runtime (node daemons, schedulers, drivers)
connects with. On the embedded server they differ: the superuser owns the schema, the
runtime logs in as ``cairn_runtime`` (appends and reads, no DDL). A URL given is used
for both, with its own user, as given: give the runtime a ``cairn_runtime`` login and
run ``cairn migrate`` with an owner's URL first."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import psycopg

from controlplane import schema
from controlplane.embedded_postgres import EmbeddedPostgres, ServerTls
from controlplane.errors import GcsUnavailableError
from controlplane.eventlog.partitions import PartitionManager
from controlplane.gcs_url import redact, resolve_gcs_url

DEFAULT_CONNECT_TIMEOUT_S = 5


def check_reachable(url: str, timeout: int = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fails fast, naming the URL (password hidden), if PostgreSQL does not answer."""
    try:
        with psycopg.connect(url, connect_timeout=timeout) as conn:
            version = conn.info.server_version
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise GcsUnavailableError(f"cannot reach the GCS at {redact(url)}: {reason}") from exc
    if version < 150000:
        raise GcsUnavailableError(
            f"the GCS at {redact(url)} runs PostgreSQL {version // 10000}; Cairn needs 15 or newer"
        )


class Gcs:
    """``with Gcs() as gcs: gcs.url`` -- a migrated log, embedded unless a URL is given."""

    def __init__(
        self,
        url: str | None = None,
        *,
        session_dir: Path | None = None,
        listen_host: str | None = None,
        server_tls: ServerTls | None = None,
    ) -> None:
        """An embedded server keeps its data in ``session_dir`` (a new one if None) and
        serves other machines at ``listen_host`` (with ``server_tls``) if given."""
        self._requested_url = resolve_gcs_url(url)
        self._embedded_options = (session_dir, listen_host, server_tls)
        self.embedded: EmbeddedPostgres | None = None
        self.url = ""  # the runtime's
        self.owner_url = ""

    @property
    def cluster_url(self) -> str:
        """The runtime's URL for nodes on other machines (the URL given, for a server
        that is not embedded: it is as reachable as its operator made it)."""
        return self.embedded.cluster_url() if self.embedded else self.url

    @property
    def cluster_tls(self) -> bool:
        """Whether nodes on other machines must connect with TLS and their certificate."""
        return self.embedded is not None and self.embedded.tls is not None

    def start(self) -> str:
        if self._requested_url is None:
            session_dir, listen_host, server_tls = self._embedded_options
            self.embedded = EmbeddedPostgres(session_dir, listen_host=listen_host, tls=server_tls)
            self.owner_url = self.embedded.start()
        else:
            self.owner_url = self._requested_url
            check_reachable(self.owner_url)
        schema.upgrade(self.owner_url)
        PartitionManager(self.owner_url).maintain()
        self.url = self.embedded.runtime_url() if self.embedded else self.owner_url
        return self.url

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> Gcs:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
