"""Where a cache lives: a local folder or an object-store URL (``s3://bucket/prefix``, any fsspec protocol).

:class:`StorePath` is the one file API the cache code uses. It keeps the guarantees the format
relies on for both kinds of storage:

* **atomic writes**: a local file is written to a temporary name, fsynced and renamed; an object
  is written with a single PUT (or a multipart upload, which also appears whole or not at all);
* **no stale listings**: remote filesystems are opened without fsspec's listing cache, so a
  reader sees a commit record as soon as it exists;
* **plain names**: ``root / "a" / "b"`` joins with ``/`` on every backend, and ``str()`` gives
  back the path or URL the user typed.

Credentials and endpoints come from the usual places of each backend (for S3: ``AWS_*``
environment variables such as ``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles), so that dask
workers and DataLoader workers started elsewhere open the same store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from repa_cache.cache.errors import UsageError, one_line

_LOCAL = LocalFileSystem()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[io.BufferedWriter]:
    """A local file opened for binary writing that appears whole or not at all.

    The data goes to a temporary name beside ``path`` (in the same folder, so the rename stays on
    one filesystem); on success it is flushed, fsynced and renamed over ``path``. On any failure
    (a full disk, an exception in the caller) the temporary file is removed and ``path`` keeps its
    old content, if it had one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``proto://...`` paths other than ``file://``."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


class StorePath:
    """A file or folder on local disk or in an object store (see the module docstring)."""

    __slots__ = ("_fs", "_pid", "_protocol", "path")

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, protocol: str = "") -> None:
        self._fs = fs
        self._pid = os.getpid()
        self.path = path
        self._protocol = protocol

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, re-created in a forked child (DataLoader and dask workers): an async
        client's connections and event loop belong to the process that opened them."""
        if self._protocol and self._pid != os.getpid():
            self._fs = fsspec.filesystem(self._protocol, **self._fs.storage_options)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._fs, self.path, self._protocol)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._fs, self.path, self._protocol = state
        self._pid = os.getpid()

    @classmethod
    def of(cls, where: str | os.PathLike[str] | StorePath) -> StorePath:
        """The store path of a local path, a ``file://`` URL or a ``proto://`` URL."""
        if isinstance(where, StorePath):
            return where
        s = os.fspath(where)
        if not is_url(s):
            return cls(_LOCAL, s.removeprefix("file://"))
        protocol = s.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(s, use_listings_cache=False)
        except ImportError as e:  # the protocol's filesystem package is an optional extra
            package = _PACKAGES.get(protocol)
            install = f"pip install {package}" if package else "install the fsspec filesystem for it"
            raise UsageError(f"{s}: {protocol}:// needs a package that is not installed ({install})") from e
        except ValueError as e:  # a protocol fsspec does not know
            raise UsageError(f"{s}: {one_line(e)}") from e
        return cls(fs, path.rstrip("/"), protocol)

    # -- names ---------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return not self._protocol

    @property
    def local(self) -> Path:
        """The local path (``ValueError`` for an object-store URL)."""
        if not self.is_local:
            raise ValueError(f"{self} is not a local path")
        return Path(self.path)

    def __truediv__(self, name: str) -> StorePath:
        return StorePath(self.fs, posixpath.join(self.path, name), self._protocol)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> StorePath:
        return StorePath(self.fs, posixpath.dirname(self.path.rstrip("/")), self._protocol)

    def resolve(self) -> StorePath:
        """Absolute local path; URLs are already absolute."""
        return StorePath(self.fs, str(Path(self.path).resolve()), "") if self.is_local else self

    def is_within(self, other: StorePath) -> bool:
        """True when this path is ``other`` or inside it (same backend)."""
        a, b = self.resolve(), other.resolve()
        return a._protocol == b._protocol and (a.path == b.path or a.path.startswith(b.path.rstrip("/") + "/"))

    def __str__(self) -> str:
        return f"{self._protocol}://{self.path}" if self._protocol else self.path

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and (self._protocol, self.path) == (other._protocol, other.path)

    def __hash__(self) -> int:
        return hash((self._protocol, self.path))

    # -- queries -------------------------------------------------------------------------------
    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.path)
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        if self.is_local:
            return os.path.isfile(self.path)
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        if self.is_local:
            return os.path.isdir(self.path)
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> list[StorePath]:
        """Entries of a folder (files and sub-folders), sorted by name; empty when it does not exist."""
        if self.is_local:
            if not os.path.isdir(self.path):
                return []
            return [self / n for n in sorted(os.listdir(self.path))]
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [self / posixpath.basename(n.rstrip("/")) for n in sorted(names) if n.rstrip("/") != self.path]

    def find(self) -> dict[str, int]:
        """Every file below this folder: relative name -> size in bytes."""
        if self.is_local:
            out: dict[str, int] = {}
            for dirpath, _, files in os.walk(self.path):
                for f in files:
                    full = os.path.join(dirpath, f)
                    out[os.path.relpath(full, self.path)] = os.path.getsize(full)
            return out
        found = self.fs.find(self.path, detail=True)
        return {posixpath.relpath(k, self.path): int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def size(self) -> int:
        return os.path.getsize(self.path) if self.is_local else int(self.fs.size(self.path))

    # -- reading -------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.is_local:
            with open(self.path, "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (one ranged GET on an object store)."""
        if self.is_local:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        return self.fs.cat_file(self.path, start=offset, end=offset + size)

    def read_many(self, paths: Iterable[StorePath]) -> dict[StorePath, bytes]:
        """Contents of several files of this store, fetched concurrently where the backend can;
        absent files are left out of the result."""
        paths = list(paths)
        if self.is_local:
            out = {}
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    out[p] = p.read_bytes()
            return out
        got = self.fs.cat([p.path for p in paths], on_error="omit") if paths else {}
        by_path = {p.path: p for p in paths}
        return {by_path[k]: v for k, v in got.items() if k in by_path and isinstance(v, bytes)}

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        if self.is_local:
            return pq.read_table(self.path, columns=columns)
        return pq.read_table(io.BytesIO(self.read_bytes()), columns=columns)

    def parquet_rows(self) -> int:
        """Row count of a Parquet file, from its footer (no data is read)."""
        if self.is_local:
            return int(pq.read_metadata(self.path).num_rows)
        with self.fs.open(self.path, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        if self.is_local:
            return open(self.path, mode)
        return self.fs.open(self.path, mode, **kwargs)

    def sha256(self, bufsize: int = 1 << 22) -> str:
        h = hashlib.sha256()
        with self.open("rb") as f:
            while chunk := f.read(bufsize):
                h.update(chunk)
        return h.hexdigest()

    # -- writing -------------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create a local folder (and parents); object stores have no folders to create."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Write so that readers see either nothing (or the old file) or all of ``data``."""
        if not self.is_local:
            self.fs.pipe_file(self.path, data)
            return
        with atomic_file(self.path) as f:
            f.write(data)

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def write_parquet(self, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(buf.getvalue())

    def fsync(self) -> None:
        """Make a local file durable (object stores are durable once a PUT returns)."""
        if self.is_local and os.path.exists(self.path):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            if self.is_local:
                os.unlink(self.path)
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    # -- zarr ----------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False) -> Any:
        """A zarr v3 store rooted here: ``LocalStore`` on disk, ``FsspecStore`` for a URL."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(str(self), storage_options=dict(self.fs.storage_options), read_only=read_only)


#: The fsspec filesystem package of each object-store protocol (``s3``: also ``pip install 'repa-cache[s3]'``).
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
             "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko"}


def store_path(where: str | os.PathLike[str] | StorePath) -> StorePath:
    """Shorthand for :meth:`StorePath.of`."""
    return StorePath.of(where)


def is_storage_error(e: BaseException) -> bool:
    """True for failures of the storage itself (I/O, network, object-store service errors)."""
    if isinstance(e, OSError):
        return True
    mod = type(e).__module__ or ""
    return mod.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs")


def describe_storage_error(e: BaseException) -> str:
    """One line for a storage failure: what failed, and that a rerun resumes."""
    return (f"storage failed: {type(e).__name__}: {e}. What was committed is intact; run the command again "
            "once the storage is back to resume.")


__all__ = ["StorePath", "atomic_file", "describe_storage_error", "is_storage_error", "is_url", "npy_problem", "read_npy_header",
           "store_path"]


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, Any]:
    """``(shape, fortran_order, dtype)`` from the header of a ``.npy`` stream positioned at its
    start, leaving it at the first data byte; reads no data and runs no pickle.

    Raises:
        ValueError: not a ``.npy`` header of version 1.0 or 2.0.
    """
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def npy_problem(shape: tuple[int, ...], dtype: Any, offset: int, size: int, max_bytes: int) -> str | None:
    """What makes a ``.npy`` unfit to read, from its header alone (:func:`read_npy_header`): Python
    objects (reading them would unpickle), or data bytes (``size`` in all, the data from ``offset``)
    that are not exactly what the header claims, or more than ``max_bytes``. None when fit: every
    size the header gives is then backed by bytes that are there."""
    if dtype.hasobject:
        return f"it holds Python objects ({dtype} {shape}), which are never unpickled"
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= int(n)
    if nbytes > max_bytes or size != offset + nbytes:
        return f"its header says {dtype} {shape} but the file has {size} bytes"
    return None
