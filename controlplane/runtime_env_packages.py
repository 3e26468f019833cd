"""Runtime environments' packages: a ``working_dir`` or ``py_modules`` folder packed into
a zip whose bytes do not depend on when or where it was packed (sorted entries, fixed
timestamps), stored once in the GCS under the SHA-256 of those bytes and named in a
task's runtime_env by ``cairn://pkg/<digest>.zip``. The driver packs and stores; each
node fetches, checks the digest and unpacks once (controlplane/node/runtime_envs.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from controlplane.eventlog.connection import connect
from controlplane.sql import queries

URI_PREFIX = "cairn://pkg/"
URI_SUFFIX = ".zip"
# Ray's limit for a working_dir is 500 MiB; a package travels in one bytea value, which
# is kept well below PostgreSQL's 1 GiB ceiling
MAX_PACKAGE_BYTES = 100 * 1024**2
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class PackageError(ValueError):
    """A folder or zip cannot be a package (missing, too big, unsafe)."""


def uri_of(digest: str) -> str:
    return f"{URI_PREFIX}{digest}{URI_SUFFIX}"


def is_package_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(URI_PREFIX) and value.endswith(URI_SUFFIX)


def digest_in(uri: str) -> str:
    """The digest a package URI names (PackageError for anything else)."""
    digest = uri.removeprefix(URI_PREFIX).removesuffix(URI_SUFFIX)
    if not is_package_uri(uri) or len(digest) != 64 or not _is_hex(digest):
        raise PackageError(f"{uri!r:.200} is not a package URI ({URI_PREFIX}<sha256>{URI_SUFFIX})")
    return digest


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- packing (the driver) ------------------------------------------------------------


def pack(
    path: str | os.PathLike[str], excludes: Sequence[str] = (), *, as_module: bool = False
) -> bytes:
    """The package of ``path``: a folder's files but those ``excludes`` names
    (gitignore-style patterns, relative to the folder), a ``.py`` file, or a ``.zip``
    taken as it is. ``as_module``: entries keep the folder's name on top (a py_modules
    package, imported by that name), else the folder's content is the top."""
    source = Path(path).expanduser()
    if not source.exists():
        raise PackageError(f"{str(path)!r} does not exist")
    if source.is_file() and source.suffix == ".zip":
        data = source.read_bytes()
        _check_size(str(path), len(data))
        try:
            zipfile.ZipFile(io.BytesIO(data)).testzip()
        except zipfile.BadZipFile as exc:
            raise PackageError(f"{str(path)!r} is not a valid zip file: {exc}") from None
        return data
    if source.is_file():
        if source.suffix != ".py":
            raise PackageError(f"{str(path)!r} is neither a folder, a .py file nor a .zip file")
        files = [(source, source.name)]
    elif source.is_dir():
        prefix = f"{source.resolve().name}/" if as_module else ""
        files = [(f, prefix + rel) for f, rel in _walk(source, excludes)]
    else:
        raise PackageError(f"{str(path)!r} is neither a folder nor a file")
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file, name in files:
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.external_attr = (stat.S_IMODE(file.stat().st_mode) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            data = file.read_bytes()
            total += len(data)
            _check_size(str(path), total)
            archive.writestr(info, data)
    data = buffer.getvalue()
    _check_size(str(path), len(data))
    return data


def _check_size(what: str, size: int) -> None:
    if size > MAX_PACKAGE_BYTES:
        raise PackageError(
            f"{what!r} is more than {MAX_PACKAGE_BYTES // 1024**2} MiB, the most a runtime_env "
            "package may hold; leave out what the tasks do not need with 'excludes'"
        )


def _walk(root: Path, excludes: Sequence[str]) -> Iterator[tuple[Path, str]]:
    """The folder's regular files (following no links out of it) not excluded, as
    (path, posix name relative to ``root``), sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        rel_folder = here.relative_to(root).as_posix()
        rel_folder = "" if rel_folder == "." else f"{rel_folder}/"
        dirs[:] = sorted(d for d in dirs if not excluded(f"{rel_folder}{d}", True, excludes))
        for name in names:
            rel = f"{rel_folder}{name}"
            file = here / name
            if file.is_file() and not excluded(rel, False, excludes):
                found.append((file, rel))
    return iter(sorted(found, key=lambda pair: pair[1]))


def excluded(rel: str, is_dir: bool, patterns: Sequence[str]) -> bool:
    """Whether gitignore-style ``patterns`` leave out the entry ``rel`` (posix, relative
    to the packed folder): a pattern without a slash matches a name at any depth, one
    with a slash the path from the top, a trailing slash folders only, ``**`` any
    number of folders; a later ``!pattern`` takes an entry back."""
    path = PurePosixPath(rel)
    verdict = False
    for raw in patterns:
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if dir_only and not is_dir:
            continue
        if "/" in pattern:
            pattern = pattern.lstrip("/")
            hit = fnmatch.fnmatchcase(rel, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])
            )
        else:
            hit = fnmatch.fnmatchcase(path.name, pattern)
        if hit:
            verdict = not negate
    return verdict


# -- unpacking (a node) --------------------------------------------------------------


def unpack(data: bytes, dest: Path, *, unwrap: bool) -> None:
    """Unpacks a package into ``dest`` (made whole or not at all). ``unwrap``: a zip
    whose entries all sit in one top folder gives that folder's content (as Ray takes
    a zipped working_dir). Entries that would land outside ``dest`` are refused."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n and not n.startswith("__MACOSX/")]
            for name in names:
                target = (staging / name).resolve()
                if not target.is_relative_to(staging.resolve()):
                    raise PackageError(f"the package entry {name!r} points outside its folder")
            archive.extractall(staging, members=names)
            for info in archive.infolist():
                mode = info.external_attr >> 16
                if mode and not info.is_dir() and info.filename in names:
                    os.chmod(staging / info.filename, stat.S_IMODE(mode))
        top = {n.split("/", 1)[0] for n in names}
        root = staging
        if unwrap and len(top) == 1 and all("/" in n for n in names):
            root = staging / top.pop()
        os.replace(root, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the GCS's table -------------------------------------------------------------------


async def store(url: str, data: bytes) -> str:
    """Stores the package (unless the GCS has it already) and returns its URI."""
    digest = digest_of(data)
    conn = await connect(url)
    try:
        if await conn.fetchval(queries["runtime_env_package_exists"], digest) is None:
            await conn.execute(queries["runtime_env_package_store"], digest, len(data), data)
    finally:
        await conn.close()
    return uri_of(digest)


async def fetch(url: str, uri: str) -> bytes:
    """The package ``uri`` names, its digest checked."""
    digest = digest_in(uri)
    conn = await connect(url)
    try:
        data = await conn.fetchval(queries["runtime_env_package_fetch"], digest)
    finally:
        await conn.close()
    if data is None:
        raise PackageError(f"the GCS holds no package {uri}")
    if digest_of(data) != digest:
        raise PackageError(f"the GCS's package {uri} does not match its digest (corrupt)")
    return bytes(data)
