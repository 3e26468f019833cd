"""The control plane's error hierarchy. Driver errors (asyncpg, psycopg) are translated
into these at the boundary where they happen, so callers handle one small set."""


class GcsError(Exception):
    """Base class of every error raised by the GCS client code."""


class GcsUnavailableError(GcsError):
    """The GCS (PostgreSQL) could not be reached within the allowed time.

    The message names the URL with its password hidden."""


class InvalidEventError(GcsError, ValueError):
    """An event was refused before anything was written: unknown entity kind or event
    type, a malformed payload, or an id that PostgreSQL cannot store."""


class EmbeddedPostgresError(GcsError):
    """The embedded PostgreSQL server could not be initialised, started or stopped."""


class LogGapError(GcsError):
    """A tailer found a hole in the positions that did not fill within its patience:
    an invariant of the log is broken (never expected; raised rather than skipping)."""


class LogDivergedError(GcsError):
    """After a failover, the log no longer holds events a tailer had read on the old
    primary (commits that became visible there without reaching the replica, never
    acknowledged to their writers): whatever was built on them may not stand. The
    process stops, and one started anew reads the log as it is."""


class GcsDiskFullError(GcsUnavailableError):
    """The GCS's PostgreSQL could not write: the disk under its data directory is full
    (SQLSTATE 53100, "could not extend file ...: No space left on device"). Held and
    retried as an unreachable GCS is, for the same bound, so that appends go through as
    soon as space is freed; then raised with a message naming the GCS (password
    hidden), saying the disk is full and quoting PostgreSQL (which names the file). A
    full disk under the write-ahead log is worse: PostgreSQL stops (a PANIC, and its
    restart fails while the disk stays full), which callers see as an unreachable GCS."""


class GcsFencedError(GcsUnavailableError):
    """The server reached is behind the log's failover: its epoch is lower than one this
    process has already seen for the same log (an old primary back after its replica
    was promoted), or equal with another promotion's id (a second server promoted from
    the same past). Nothing is written to it; the message names both epochs. Retried as
    an unreachable GCS is (another server of a multi-host URL may be the current one)."""


class NodeFencedError(GcsError):
    """The log refused the appends of a node that was declared dead (its old
    incarnation, back from a partition): they are not stored, a ``stale_refused`` event
    says so, and the node must stop and rejoin under a new id."""


class GcsIdentityError(GcsError):
    """The GCS reached is not the log this node was using: another log (it was wiped,
    or another server answers at its address: another cluster id or server identifier),
    no log at all, or the same log ending below a position this node has already seen
    (put back from an older copy, a restored backup). Going on would hand out positions
    and ids the cluster already used, so it is not retried: the node stops. The message
    names both logs (or both positions)."""
