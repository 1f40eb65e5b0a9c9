"""Where a cache is kept: a local folder or an fsspec URL, behind one small interface.

Local folders keep POSIX guarantees (fsync, atomic rename); on a URL every
put of one object is atomic and storage failures become one-line CacheErrors.
layout.py builds the cache protocol on top (markers, claims, completeness).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import zarr

from ..errors import CacheError


class Location:
    """Where a cache is: a local folder, or an fsspec URL such as ``s3://bucket/prefix``.

    Operations take paths relative to the location. On a URL, storage errors
    (unreachable endpoint, missing credentials or bucket) become one-line
    CacheErrors that name the URL.
    """

    def __init__(self, where: str | os.PathLike, _remote: tuple[Any, str] | None = None):
        text = os.fspath(where)
        if "://" not in text or text.startswith("file://"):
            self.local: Path | None = Path(text.removeprefix("file://")).expanduser()
            self.fs, self.path, self.url = None, "", str(self.local)
            return
        self.local = None
        self.url = text.rstrip("/")
        if _remote is None:
            import fsspec.core

            try:
                _remote = fsspec.core.url_to_fs(self.url)
            except ImportError as exc:
                raise CacheError(f"{self.url}: {str(exc).splitlines()[0]} (for s3:// URLs: pip install 'hpd-tools[s3]')") from None
            except ValueError as exc:
                raise CacheError(f"{self.url}: not a storage URL ({exc}); give a local folder or a URL such as s3://bucket/prefix") from None
        self.fs, self.path = _remote[0], _remote[1].rstrip("/")
        if not self.path:
            raise CacheError(f"{self.url}: the URL names no bucket or folder; give one such as s3://bucket/prefix")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self.identity == other.identity

    def __hash__(self) -> int:
        return hash(self.identity)

    @property
    def identity(self) -> str:
        return str(self.local.resolve()) if self.local is not None else self.url

    def __truediv__(self, name: str) -> "Location":
        if self.local is not None:
            return Location(self.local / name)
        return Location(f"{self.url}/{name}", (self.fs, f"{self.path}/{name}"))

    @property
    def parent(self) -> "Location":
        if self.local is not None:
            return Location(self.local.parent)
        if "/" not in self.path:
            return self
        return Location(self.url.rsplit("/", 1)[0], (self.fs, self.path.rsplit("/", 1)[0]))

    def _key(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    @contextlib.contextmanager
    def guard(self, action: str) -> Iterator[None]:
        """Turn a storage failure into a CacheError naming the URL; a missing object
        stays a FileNotFoundError for the caller (a missing bucket does not)."""
        try:
            yield
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise CacheError(f"{self.url}: the bucket does not exist ({exc}); create it or fix the URL") from None
            raise
        except CacheError:
            raise
        except Exception as exc:  # storage clients raise their own types (botocore, aiohttp, ...)
            raise CacheError(f"{self.url}: {action} failed: {_storage_problem(exc)}") from None

    # -- objects ------------------------------------------------------------
    def read(self, rel: str) -> bytes | None:
        """The bytes of one file or object, or None when there is none."""
        if self.local is not None:
            try:
                return (self.local / rel).read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        try:
            with self.guard("reading"):
                return self.fs.cat_file(self._key(rel))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def read_many(self, rels: list[str]) -> list[bytes]:
        if self.local is not None:
            return [(self.local / rel).read_bytes() for rel in rels]
        with self.guard("reading"):
            got = self.fs.cat([self._key(r) for r in rels], on_error="raise")
        return [got[self._key(r)] for r in rels]

    def write(self, rel: str, data: bytes) -> None:
        """Put one file or object whole: readers see the old content or the new one.
        Local files are fsync-ed and renamed into place; an object put is atomic."""
        if self.local is not None:
            try:
                _write_atomic(self.local / rel, data)
            except OSError as exc:
                raise CacheError(f"{self.url}: writing {rel} failed ({os_problem(exc)}); fix that and rerun the same command (finished work is kept)") from None
            return
        with self.guard("writing"):
            self.fs.pipe_file(self._key(rel), data)

    def delete(self, rel: str) -> None:
        if self.local is not None:
            (self.local / rel).unlink(missing_ok=True)
            return
        try:
            with self.guard("deleting"):
                self.fs.rm_file(self._key(rel))
        except FileNotFoundError:
            pass

    def modified(self, rel: str) -> float | None:
        """When an object was last put, in seconds on the store's clock (None if absent).
        Local files: their mtime, set by the filesystem (the server's clock on NFS)."""
        if self.local is not None:
            try:
                return (self.local / rel).stat().st_mtime
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            with self.guard("reading"):
                self.fs.invalidate_cache(self._key(rel).rsplit("/", 1)[0])
                return self.fs.modified(self._key(rel)).timestamp()
        except FileNotFoundError:
            return None

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries in a folder (prefix); [] when there is none."""
        if self.local is not None:
            folder = self.local / rel if rel else self.local
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        key = self._key(rel)
        try:
            with self.guard("listing"):
                self.fs.invalidate_cache(key)
                entries = self.fs.ls(key, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != key)

    def chunk_sizes(self, array: str) -> dict[int, int]:
        """Bytes of each chunk file of a Zarr array chunked along its first axis only
        (``array/c/I`` or ``array/c/I/0``), by chunk index, from one listing."""
        out: dict[int, int] = {}
        if self.local is not None:
            root = self.local / array / "c"
            if not root.is_dir():
                return out
            for entry in os.scandir(root):
                if not entry.name.isdigit():
                    continue
                if entry.is_dir():
                    inner = Path(entry.path) / "0"
                    if inner.is_file():
                        out[int(entry.name)] = inner.stat().st_size
                else:
                    out[int(entry.name)] = entry.stat().st_size
            return out
        prefix = self._key(f"{array}/c")
        try:
            with self.guard("listing"):
                self.fs.invalidate_cache(prefix)
                found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return out
        for key, info in found.items():
            parts = key[len(prefix) :].strip("/").split("/")
            if parts and parts[0].isdigit() and (len(parts) == 1 or parts[1:] == ["0"]):
                out[int(parts[0])] = int(info.get("size") or 0)
        return out

    def size(self, rel: str) -> int:
        """Bytes stored under a folder (prefix)."""
        if self.local is not None:
            return sum(f.stat().st_size for f in (self.local / rel).rglob("*") if f.is_file())
        try:
            with self.guard("listing"):
                self.fs.invalidate_cache(self._key(rel))
                return sum(int(info.get("size") or 0) for info in self.fs.find(self._key(rel), detail=True).values())
        except FileNotFoundError:
            return 0

    def upload(self, folder: Path, skip: Iterable[str] = ()) -> None:
        """Put every file of a local folder here (concurrently), except those in ``skip``."""
        files = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).as_posix() not in skip]
        if files:
            with self.guard("writing"):
                self.fs.put([str(f) for f in files], [self._key(f.relative_to(folder).as_posix()) for f in files])

    def open_group(self, mode: str = "r+", wrap: Callable[[Any], Any] | None = None) -> zarr.Group:
        """The Zarr group here; ``wrap`` wraps the Zarr store (integrity.ChecksummedStore)."""
        from zarr.storage import FsspecStore, LocalStore

        with self.guard("opening") if self.local is None else contextlib.nullcontext():
            if self.local is not None:
                store: Any = LocalStore(str(self.local), read_only=mode == "r")
            else:
                store = FsspecStore.from_url(self.url, read_only=mode == "r")
            return zarr.open_group(wrap(store) if wrap else store, mode=mode)


def check_writable(path: Path, where: str) -> None:
    """Fail in one line, before any expensive work, when nothing can be written at
    ``path`` (a folder to create or fill): a file in the way, a read-only or full
    filesystem, no permission. A probe file is created and removed in the folder
    itself when it exists, else in its nearest existing parent."""
    import tempfile

    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CacheError(f"{where}: {folder} is a file, not a folder; choose a location under a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hpd-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CacheError(f"{where}: cannot write under {folder} ({os_problem(exc)}); choose a writable location") from None


def os_problem(exc: OSError) -> str:
    """An OSError from a local filesystem, for a person: the cause, without a traceback."""
    import errno

    causes = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a path component is a file, not a folder",
              errno.EFBIG: "file too large for this filesystem or process limit"}
    cause = causes.get(exc.errno or -1, exc.strerror or type(exc).__name__)
    return f"{cause}: {exc.filename}" if exc.filename else cause


def _storage_problem(exc: BaseException) -> str:
    """What a storage client's exception means for the user, in one line."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, (ConnectionError, TimeoutError, PermissionError)):
        return os_problem(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"):
        return f"no usable credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile"
    if isinstance(exc, PermissionError):
        return f"access denied ({text}); check the credentials and the bucket's permissions"
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Endpoint" in name or "Timeout" in name:
        return f"cannot reach the storage endpoint ({text}); check AWS_ENDPOINT_URL and that the server is up"
    return f"{name}: {text}"


def as_location(where: str | os.PathLike | Location) -> Location:
    return where if isinstance(where, Location) else Location(where)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries durable (a rename or a new file in it): without it a
    power loss can keep a marker's new name and lose the chunk it vouches for."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; nothing more can be done there
        pass
    finally:
        os.close(fd)
