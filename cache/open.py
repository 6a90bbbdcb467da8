"""Open a cache whatever its backend: the zarr store (:class:`cache.reader.CacheReader`) or its
webdataset export (:class:`cache.wds_reader.WdsReader`). Both are :class:`cache.reader.ReaderBase`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from repa_cache.cache.format import CacheMeta
from repa_cache.cache.reader import CacheReader, ReaderBase, list_groups, open_meta
from repa_cache.cache.storage import StorePath, store_path
from repa_cache.cache.wds import INDEX_FILE, is_export
from repa_cache.cache.wds_reader import WdsReader


def open_meta_any(path: str | Path | StorePath) -> tuple[StorePath, CacheMeta, list[str]]:
    """(root, metadata, groups present) of a cache or of an export, without opening any group.

    For a cache, the groups present include uncommitted ones (as :func:`cache.reader.list_groups`);
    an export holds committed groups only.
    """
    if is_export(path):
        root = store_path(path)
        index = (root / INDEX_FILE).read_json()
        return root, CacheMeta.from_json(index["cache"]["meta"]), list(index["cache"]["groups"])
    root, meta = open_meta(path)
    return root, meta, list_groups(root)


def open_reader(path: str | Path | StorePath, groups: Iterable[str] | None = None, verify_checksums: bool = False) -> ReaderBase:
    """A :class:`WdsReader` for a webdataset export (``index.json`` with the marker), else a :class:`CacheReader`."""
    if is_export(path):
        return WdsReader(path, groups=groups, verify_checksums=verify_checksums)
    return CacheReader(path, groups=groups, verify_checksums=verify_checksums)
