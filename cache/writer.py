"""The write side of the cache format: create a cache, add groups, write whole shards, commit.

Ordering is what makes a cache trustworthy (see :mod:`cache.format`):

1. ``create_cache`` writes the root metadata and the plan (index -> source key) before any data.
2. ``create_group`` writes a group's zarr metadata (its arrays are empty: NaN fill).
3. ``write_shard`` writes one whole zarr shard per array (never a partial shard: zarr's sharding
   codec does read-modify-write, and two writers on one shard lose data), makes it durable, hashes
   the stored bytes and only then writes the shard record.
4. ``commit_group`` checks that every shard has a record, writes the manifest and finally the
   commit record. Readers trust a group only once its commit record exists.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from repa_cache.cache.chunks import ChunkTable, chunk_layout
from repa_cache.cache.codec import MISSING_INT8, cosine_check, decode_numpy, encode_int8, merge_checks, scale_name, token_cosine
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import (
    FORMAT_VERSION,
    GROUP_ATTR,
    MANIFEST_FILE,
    PLAN_FILE,
    ROOT_ATTR,
    CacheMeta,
    GroupMeta,
    ShardRecord,
    commit_path,
    record_path,
    sha256_json,
    write_json_atomic,
)
from repa_cache.cache.layout import load_records, open_zarr, read_shard_bytes, record_shards, shard_key, zarr_array
from repa_cache.cache.storage import StorePath, store_path

log = logging.getLogger(__name__)

DEFAULT_CODEC: dict[str, Any] = {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "shuffle"}


def make_codec(codec: dict[str, Any]) -> BloscCodec:
    if codec.get("name") != "blosc":
        raise CacheError(f"unsupported codec {codec!r} (this version writes blosc)")
    return BloscCodec(cname=codec["cname"], clevel=codec["clevel"], shuffle=codec["shuffle"])


def chunk_codecs(codec: dict[str, Any]) -> tuple[Any, ...]:
    """What each inner chunk goes through after serialisation: the array's compressor, then a
    crc32c of the compressed bytes, which zarr checks whenever it decodes the chunk (format v2)."""
    return (make_codec(codec), Crc32cCodec())


def create_cache(root: StorePath | Path, meta: CacheMeta, plan: pa.Table) -> None:
    """Create an empty cache: root group with its metadata, and the plan table."""
    root = store_path(root)
    root.mkdir()
    zarr.open_group(store=root.zarr_store(), mode="a", attributes={ROOT_ATTR: meta.to_json()})
    (root / PLAN_FILE).write_parquet(plan)


def require_format(root: StorePath, version: int = FORMAT_VERSION) -> None:
    """Raise the cache's format version to ``version`` (readers of older formats then refuse it);
    nothing else of the root metadata changes."""
    zroot = open_zarr(root, mode="r+")
    meta: dict[str, Any] = dict(zroot.attrs.asdict()[ROOT_ATTR])  # type: ignore[arg-type]  # checked by cache.reader.open_meta
    if meta["format_version"] < version:
        zroot.attrs[ROOT_ATTR] = meta | {"format_version": version}


def create_group(root: StorePath | Path, meta: CacheMeta, gmeta: GroupMeta) -> None:
    """Create a group and its (empty) arrays. Safe to call again with identical metadata.

    Its arrays store every inner chunk with a crc32c after compression (format v2), and a cache of
    an older format that gets such a group says v2 from then on (:func:`require_format`).

    The group's attributes (its :class:`GroupMeta`) are written last, in one atomic write of its
    ``zarr.json``: until then readers and a rerun treat the group as absent
    (:func:`cache.reader.list_groups`), so a kill at any point leaves either a whole group or one
    that the next run creates again from scratch (its arrays rewritten, never merged).
    """
    root = store_path(root)
    require_format(root)
    store_root = open_zarr(root, mode="r+")
    grp = store_root.require_group(gmeta.group)
    complete = GROUP_ATTR in grp.attrs.asdict()
    for spec in gmeta.arrays:
        shape = (meta.num_samples, len(meta.views), *spec.sample_shape)
        if complete and spec.name in grp:
            continue
        grp.create_array(
            spec.name,
            shape=shape,
            shards=(meta.shard_size, *shape[1:]),
            chunks=(1, 1, *shape[2:]),  # one sample, one view: a reader decodes only the view it uses
            dtype=spec.dtype,
            compressors=chunk_codecs(spec.codec),
            fill_value=MISSING_INT8 if spec.dtype == "int8" else np.nan,  # int8: a value the codec never writes
            dimension_names=("sample", "view", *[f"d{i}" for i in range(len(spec.sample_shape))]),
            overwrite=True,  # a half-created group (killed before its attributes) holds no data of ours yet
        )
    grp.attrs[GROUP_ATTR] = gmeta.to_json()  # one atomic write of the group's zarr.json: the group exists


def write_shard(
    root: StorePath | Path,
    meta: CacheMeta,
    gmeta: GroupMeta,
    shard: int,
    data: dict[str, np.ndarray],
    outcomes: list[list[Any]],
    weights_sha256: str,
    input_sha256: list[str] | None = None,
) -> ShardRecord:
    """Write one whole shard of every array of a group, then its record.

    ``input_sha256``: the sha256 of each input's encoded bytes, in shard order (kept in the record).

    ``data[name]`` has shape ``(stop - start, V, *sample_shape)``; rows of skipped inputs must be
    NaN (they are never read as data). Returns the record that was written.
    """
    root = store_path(root)
    start, stop = meta.shard_range(shard)
    codec_check: dict[str, Any] = {}
    if gmeta.feature_codec is not None:
        data, codec_check = encode_features(gmeta, data, outcomes, f"group '{gmeta.group}' shard {shard}")
    grp = open_zarr(root / gmeta.group, mode="r+")
    checksums: dict[str, str] = {}
    stored: dict[str, int] = {}
    tables: dict[str, dict[str, str]] = {}
    for spec in gmeta.arrays:
        arr = zarr_array(grp, spec.name)
        block = data[spec.name]
        expected = (stop - start, len(meta.views), *spec.sample_shape)
        if block.shape != expected:
            raise ValueError(f"{gmeta.group}/{spec.name} shard {shard}: shape {block.shape}, expected {expected}")
        # zarr's sharding codec merges a write into whatever shard object exists, even when the
        # write covers the whole shard; a half-written object left by a killed run would poison
        # the merge. This task owns the shard, so it starts from nothing.
        sync(arr.store.delete(shard_key(arr, shard)))
        arr[start:stop] = block.astype(spec.dtype, copy=False)
        (root / gmeta.group / shard_key(arr, shard)).fsync()  # local disk only; a PUT is durable
        raw = read_shard_bytes(arr, shard)
        if raw is None:  # every row skipped: nothing to store, NaN fill is the truth
            checksums[spec.name], stored[spec.name] = "absent", 0
        else:
            checksums[spec.name], stored[spec.name] = hashlib.sha256(raw).hexdigest(), len(raw)
            layout = chunk_layout(arr)
            if layout is not None:  # arrays created before v2 (a resumed v1 group) have no chunk checksums
                tables[spec.name] = ChunkTable.of_object(raw, layout).to_json()
    record = ShardRecord(
        group=gmeta.group,
        shard=shard,
        start=start,
        stop=stop,
        count=stop - start,
        checksums=checksums,
        stored_bytes=stored,
        weights_sha256=weights_sha256,
        fingerprint_hash=gmeta.fingerprint_hash,
        outcomes=outcomes,
        input_sha256=list(input_sha256 or []),
        codec_check=codec_check,
        chunks=tables,
    )
    write_json_atomic(record_path(root, gmeta.group, shard), record.to_json())
    return record


def encode_features(gmeta: GroupMeta, data: dict[str, np.ndarray], outcomes: list[list[Any]],
                    where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One shard of a quantised group's float tokens -> its stored arrays, and the cosine check.

    ``data[name]`` is ``(n, V, ..., D)`` float (rows of skipped inputs NaN). Rows of skipped inputs
    are stored as the int8 fill value with NaN scales, exactly as if never written. Every stored
    token is decoded again and compared with its source: the record keeps the cosine summary.

    Raises:
        CacheError: a non-skipped row holds NaN or infinity (``where`` names the shard).
    """
    codec = gmeta.codec
    assert codec is not None
    keep = np.array([o[0] != "skipped" for o in outcomes], dtype=bool)
    out = dict(data)
    cosines = []
    for name in codec.arrays:
        x = np.array(data[name], dtype=np.float32)  # (n, V, ..., D), a copy
        x[~keep] = 0  # skipped rows: no data; the rest keep their positions for the message
        try:
            q, scale = encode_int8(x, codec, f"{where}, array '{name}'")
        except ValueError as e:
            raise CacheError(str(e)) from None
        q[~keep], scale[~keep] = MISSING_INT8, np.nan
        cosines.append(token_cosine(x[keep], decode_numpy(q[keep], scale[keep], codec)).reshape(-1))
        out[name], out[scale_name(name)] = q, scale
    return out, cosine_check(np.concatenate(cosines) if cosines else np.empty(0))


#: shard records read together while committing (memory stays flat in the number of shards)
COMMIT_BATCH = 256


def outcome_columns(outcomes: list[list[Any]]) -> dict[str, pa.Array]:
    """The manifest's outcome columns of some inputs: status, reason and original size."""
    status, reason, width, height = zip(*outcomes) if outcomes else ((), (), (), ())
    return {"status": pa.array(list(status), pa.string()), "reason": pa.array(list(reason), pa.string()),
            "width": pa.array(list(width), pa.int32()), "height": pa.array(list(height), pa.int32())}


def commit_group(root: StorePath | Path, meta: CacheMeta, gmeta: GroupMeta) -> dict[str, Any]:
    """Commit a group whose shards are all written: manifest, then the commit record (last).

    Records are read a batch at a time and only their outcome columns and checksums are kept."""
    root = store_path(root)
    present = record_shards(root, meta, gmeta.group)
    missing = [s for s in range(meta.num_shards) if s not in present]
    if missing:
        raise CacheError(f"cannot commit {gmeta.group}: shards {missing[:10]} have no record")
    weights: set[str] = set()
    columns: dict[str, list[pa.Array]] = {"status": [], "reason": [], "width": [], "height": []}
    checksums: list[dict[str, str]] = []
    checks: list[dict[str, Any]] = []
    for first in range(0, meta.num_shards, COMMIT_BATCH):
        records = load_records(root, meta, gmeta.group, range(first, min(first + COMMIT_BATCH, meta.num_shards)))
        for s in sorted(records):
            rec = records[s]
            if rec.fingerprint_hash != gmeta.fingerprint_hash:
                raise CacheError(f"cannot commit {gmeta.group}: some shards were written under another fingerprint")
            weights.add(rec.weights_sha256)
            for k, v in outcome_columns(rec.outcomes).items():
                columns[k].append(v)
            checksums.append(rec.checksums)
            checks.append(rec.codec_check)
    if len(weights) != 1:
        raise CacheError(f"cannot commit {gmeta.group}: its shards were written with different weights {sorted(weights)}")
    plan = (root / PLAN_FILE).read_parquet()
    manifest = plan
    for k, parts in columns.items():
        manifest = manifest.append_column(k, pa.chunked_array(parts, pa.int32() if k in ("width", "height") else pa.string()))
    manifest = manifest.combine_chunks()
    mpath = root / MANIFEST_FILE
    if mpath.exists():
        old = mpath.read_parquet()
        if not old.select(["status", "reason"]).equals(manifest.select(["status", "reason"])):
            raise CacheError(
                f"cannot commit {gmeta.group}: the inputs decoded differently than when the cache was "
                "first written (did the image files change?)"
            )
    else:
        mpath.write_parquet(manifest)
    counts = dict(zip(*(c.to_pylist() for c in pc.value_counts(manifest.column("status")).flatten())))
    check = {"codec_check": merge_checks(checks)} if gmeta.feature_codec else {}
    commit = {
        "group": gmeta.group,
        "fingerprint_hash": gmeta.fingerprint_hash,
        "weights_sha256": weights.pop(),
        "num_shards": meta.num_shards,
        "records_sha256": sha256_json(checksums),
        "counts": {k: int(counts.get(k, 0)) for k in ("ok", "converted", "skipped")},
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **check,
    }
    write_json_atomic(commit_path(root, gmeta.group), commit)
    return commit
