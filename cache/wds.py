"""Webdataset export of a committed cache (its reader is :mod:`cache.wds_reader`).

``export_wds(CACHE, OUT)`` writes plain webdataset tar shards (``webdataset.ShardWriter``), one tar
sample per valid cache index, in cache order::

    OUT/
      shard-000000.tar ...   members <key>.<field>, key = zero-padded cache index:
                               latents.mean.npy, latents.std.npy      (V, C, h, w) float32
                               teachers.<name>.patch.npy              (V, T, D)   stored dtype
                               teachers.<name>.cls.npy                (V, D)
                               cls (label), txt (source key)
      shard-000000.crc ...   the crc32c of every member's data (4 bytes each, little-endian):
                             sample by sample in the shard's order, members in the order of
                             index.json's "members"
      manifest.parquet       copy of the cache's manifest (index, key, label, status, ...)
      index.json             written last: shards (file, first/last index, count, bytes, sha256,
                             and its checksum file with that file's sha256), the field -> member
                             map and a copy of the cache metadata (root meta, every group's meta
                             and commit record, class names)

The shards stream with any webdataset loader (``wds.WebDataset(urls).decode()``); for random
access, :class:`cache.wds_reader.WdsReader` builds a per-shard index of member offsets from the tar headers on the
first read that touches a shard, then reads members with ``os.pread``: one read per requested array
per sample, never a scan of other shards. With ``verify_checksums`` it also reads the shard's
checksum file once (checked against ``index.json``) and checks the crc32c of every member it reads:
the work follows the bytes read (exports of version 1 have no checksum files; their shards are
hashed whole on first touch). :func:`cache.open.open_reader` picks the backend.

The export is committed like the cache: shards first (fsynced), then ``index.json`` atomically.
A folder without ``index.json`` (an interrupted export) is not an export. The destination must be
empty or one of our exports: ``.repa-export.json`` is written before the first shard (and removed
once ``index.json`` exists), so a rerun recognises and replaces an interrupted export of its own,
while a folder holding anything export-wds did not write is refused untouched. A ``_lock.json``
keeps a second export out of the folder while one runs (:mod:`cache.lock`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from repa_cache.cache.defaults import DEFAULT_SHARD_BYTES
from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import (
    FORMAT_VERSION,
    LATENTS,
    MANIFEST_FILE,
    write_json_atomic,
)
from repa_cache.cache.latent_stats import EXPORT_STATS_FILE, carry_latent_stats
from repa_cache.cache.layout import bulk_reads
from repa_cache.cache.lock import LOCK_FILE, is_our_lock, writer_lock
from repa_cache.cache.progress import Progress, format_bytes
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.storage import StorePath, store_path

WDS_MARKER = "repa-cache-wds"
WDS_VERSION = 2  # 2: a crc32c per member, in a checksum file per shard
INDEX_FILE = "index.json"
EXPORT_MARKER = ".repa-export.json"  # written before the first shard: this folder is an export in progress
EXPORT_MARKER_FORMAT = "repa-cache-wds-export-in-progress"
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.(tar|crc)$")
LABEL_FIELD = "cls"
KEY_FIELD = "txt"
_TAR_MTIME = 0  # fixed member mtime: the same cache exports to byte-identical shards


def member_field(group: str, array: str) -> str:
    """Tar member suffix of one array: ``latents/mean`` -> ``latents.mean.npy``."""
    return f"{group.replace('/', '.')}.{array}.npy"


def crc_file(tar_name: str) -> str:
    """The checksum file of a tar shard: ``shard-000000.tar`` -> ``shard-000000.crc``."""
    return tar_name[: -len(".tar")] + ".crc"


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as a ``.npy`` member holds it (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def crc32c(data: bytes) -> bytes:
    """The crc32c of ``data`` as 4 little-endian bytes (zarr's crc32c codec writes the same)."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it, so a shard's
    checksum needs no second read (which would be a second download on an object store)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def is_export(path: str | Path | StorePath) -> bool:
    """True when ``path`` is a finished webdataset export of a cache (``index.json`` with the marker)."""
    try:
        return json.loads((store_path(path) / INDEX_FILE).read_bytes()).get("format") == WDS_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _is_export_file(name: str) -> bool:
    """A name export-wds writes in its destination (shards, index, manifest, marker, lock, and the
    temporary names of its atomic writes)."""
    ours = (INDEX_FILE, MANIFEST_FILE, EXPORT_MARKER, LOCK_FILE, EXPORT_STATS_FILE)
    if _SHARD_RE.match(name) or name in ours or name == f"{LOCK_FILE}.takeover":
        return True
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in ours)


def _is_marker(path: StorePath) -> bool:
    try:
        return json.loads(path.read_bytes()).get("format") == EXPORT_MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: StorePath) -> list[str]:
    """The names in ``out`` that a new export replaces; UsageError when ``out`` is not ours.

    ``out`` is ours when it is absent or empty (our own lock aside), or when it carries our marker:
    a finished export's ``index.json``, or the ``.repa-export.json`` an export writes before its
    first shard. Even then, a file export-wds does not write is never touched: the export is refused.
    """
    if out.is_file():
        raise UsageError(f"output path {out} is an existing file, not a folder")
    names = [p.name for p in out.iterdir()]
    if all(n == LOCK_FILE and is_our_lock(out / n) for n in names):
        return []
    if not ((INDEX_FILE in names and is_export(out)) or (EXPORT_MARKER in names and _is_marker(out / EXPORT_MARKER))):
        raise UsageError(f"output folder {out} is not empty and is not a webdataset export of a cache "
                         "(export-wds writes only into an empty folder or one of its own exports; nothing was changed)")
    foreign = [n for n in names if not _is_export_file(n)]
    if foreign:
        raise UsageError(f"output folder {out} holds {foreign[0]!r}, which export-wds did not write; "
                         "move it away or choose another folder (nothing was changed)")
    return [n for n in names if n not in (LOCK_FILE, f"{LOCK_FILE}.takeover", EXPORT_MARKER)]


def _prepare_out(out: StorePath, source: StorePath) -> None:
    """Mark ``out`` as ours (before any shard), then clear a previous export of ours in it."""
    names = _check_out(out)
    out.mkdir()
    write_json_atomic(out / EXPORT_MARKER, {
        "format": EXPORT_MARKER_FORMAT, "source_cache": str(source),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if INDEX_FILE in names:
        (out / INDEX_FILE).unlink()  # uncommit first: a half-rewritten export is never read as whole
    for n in names:
        if n != INDEX_FILE:
            (out / n).unlink()


@bulk_reads()
def export_wds(
    cache_path: str | Path,
    out_dir: str | Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    groups: Iterable[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Export the committed groups of a cache (or ``groups``) to webdataset shards; returns the index.

    ``shard_bytes`` bounds the payload of a tar shard (a shard closes once it reaches it, so a shard
    exceeds it by at most one sample). Refuses an uncommitted or damaged cache (through
    :class:`CacheReader`, checking every shard's checksum as it reads it) and an output folder
    that holds anything but a previous export (which it replaces).
    """
    if shard_bytes <= 0:
        raise UsageError(f"--shard-bytes must be positive, not {shard_bytes}")
    # Checksums on: an export must never give damaged cache data fresh, valid-looking checksums.
    reader = CacheReader(cache_path, groups=groups, verify_checksums=True)
    out = store_path(out_dir)
    if out.is_within(reader.root):
        raise UsageError(f"output folder {out} is inside the cache {reader.root}")
    _check_out(out)  # refuse a folder that is not ours before writing anything into it
    with writer_lock(out, "repa export-wds"):
        return _export_locked(reader, out, shard_bytes, quiet)


def _export_locked(reader: CacheReader, out: StorePath, shard_bytes: int, quiet: bool) -> dict[str, Any]:
    _prepare_out(out, reader.root.resolve())
    meta = reader.meta
    fields = {f"{g}/{a.name}": member_field(g, a.name) for g, info in reader.groups.items() for a in info.meta.arrays}
    width = max(9, len(str(meta.num_samples - 1)))

    shards: list[dict[str, Any]] = []
    open_files: dict[str, Any] = {}
    members: dict[str, list[int]] = {}
    crcs: dict[str, bytearray] = {}  # tar name -> the crc32c of each member written to it, in checksum-file order
    order = sorted([*fields.values(), LABEL_FIELD, KEY_FIELD])  # the members of a sample, as the checksum file lists them

    def opener(fname: str):
        f = _HashingWriter((out / fname).open("wb"))
        open_files[fname] = f
        members[fname] = []
        crcs[fname] = bytearray()
        return f

    def post(fname: str) -> None:  # ShardWriter calls this after closing the tar stream of a shard
        f = open_files.pop(fname)
        f.close()  # an object-store upload completes here, whole or not at all
        path = out / fname
        path.fsync()
        idx = members.pop(fname)
        table = bytes(crcs.pop(fname))
        if not idx:  # ShardWriter opens its first shard before any sample: an empty export
            path.unlink()
            return
        crc_path = out / crc_file(fname)
        crc_path.write_bytes(table)  # atomic, and before index.json lists it
        shards.append({"file": fname, "first": idx[0], "last": idx[-1], "count": len(idx),
                       "bytes": f.nbytes, "sha256": f.sha.hexdigest(),
                       "crc_file": crc_file(fname), "crc_sha256": hashlib.sha256(table).hexdigest()})

    import webdataset as wds

    block = max(1, min(meta.shard_size, 256))
    with (
        Progress(meta.num_samples, "export-wds", "samples", quiet=quiet) as bar,  # cache indices, skipped ones included
        wds.ShardWriter(SHARD_PATTERN, maxcount=1 << 40, maxsize=float(shard_bytes), post=post,
                        verbose=0, opener=opener, mtime=_TAR_MTIME) as sink,
    ):
        for start in range(0, meta.num_samples, block):
            data = reader.read_block(start, min(start + block, meta.num_samples), raw=True)  # as stored: int8 tokens stay int8
            for j, i in enumerate(data["index"].tolist()):
                sample: dict[str, Any] = {LABEL_FIELD: str(int(data["label"][j])).encode("ascii"),
                                          KEY_FIELD: reader.keys[i].encode("utf-8")}  # the bytes webdataset would write
                for name, member in fields.items():
                    sample[member] = npy_bytes(data[name][j])
                sink.write({"__key__": f"{i:0{width}d}", **sample})
                members[sink.fname].append(i)
                crcs[sink.fname] += b"".join(crc32c(sample[m]) for m in order)
            bar.update(min(block, meta.num_samples - start))

    manifest_bytes = (reader.root / MANIFEST_FILE).read_bytes()
    (out / MANIFEST_FILE).write_bytes(manifest_bytes)
    if LATENTS in reader.groups:  # the latents' dataset statistics travel with them (repa train --latent-norm dataset)
        carry_latent_stats(reader.root, out / EXPORT_STATS_FILE, reader.groups[LATENTS].commit["fingerprint_hash"])
    index = {
        "format": WDS_MARKER,
        "wds_version": WDS_VERSION,
        "cache_format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_cache": str(reader.root.resolve()),
        "key_width": width,
        "num_samples": sum(s["count"] for s in shards),
        "shard_bytes": int(shard_bytes),
        "fields": fields,
        "members": order,
        "label_field": LABEL_FIELD,
        "key_field": KEY_FIELD,
        "manifest": {"file": MANIFEST_FILE, "sha256": hashlib.sha256(manifest_bytes).hexdigest()},
        "class_names": list(meta.class_names),
        "cache": {
            "meta": meta.to_json(),
            "groups": {g: {"meta": info.meta.to_json(), "commit": info.commit} for g, info in reader.groups.items()},
        },
        "shards": shards,
    }
    write_json_atomic(out / INDEX_FILE, index)  # written last: the export is complete
    (out / EXPORT_MARKER).unlink()  # index.json now marks the folder as ours
    return index


def describe_export(index: dict[str, Any], out: str | Path | StorePath) -> str:
    total = sum(s["bytes"] for s in index["shards"])
    groups = ", ".join(index["cache"]["groups"])
    return (f"exported {index['num_samples']} samples to {len(index['shards'])} webdataset shards in {out} "
            f"({format_bytes(total)}; groups: {groups})")


__all__ = ["DEFAULT_SHARD_BYTES", "INDEX_FILE", "WDS_MARKER", "describe_export", "export_wds", "is_export", "member_field"]
