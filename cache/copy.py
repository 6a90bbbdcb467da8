"""``repa cache copy SRC DST``: stage a committed cache between local disk and object storage.

The copy keeps the cache's own ordering, so an interrupted copy is never read as a complete one and
running the command again finishes it:

1. the root metadata and the plan (a new destination), or a check that the destination is the same
   cache (same base fingerprint) when it exists;
2. for each group: its zarr metadata, then per shard the stored objects, each hashed and compared
   with the shard record *before* it is written, then the record;
3. the manifest, then each group's commit record, verbatim, last.

Shards whose destination record already equals the source record are skipped (a record is written
only after its data), so a rerun copies only what is missing. Every object is copied byte for byte:
the destination verifies with the same checksums as the source.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repa_cache.cache.codec import FEATURE_CODECS, scale_name
from repa_cache.cache.defaults import DEFAULT_COPY_JOBS
from repa_cache.cache.errors import CacheError, FingerprintMismatch, UsageError
from repa_cache.cache.format import (
    LATENTS,
    MANIFEST_FILE,
    PLAN_FILE,
    TEACHER_PREFIX,
    GroupMeta,
    commit_path,
    fingerprint_diff,
    record_path,
    with_feature_codec,
)
from repa_cache.cache.latent_stats import carry_latent_stats, stats_path
from repa_cache.cache.layout import bulk_reads, open_zarr, read_record, record_shards, shard_key, zarr_array
from repa_cache.cache.lock import LOCK_FILE, is_our_lock, writer_lock
from repa_cache.cache.progress import Progress, format_bytes
from repa_cache.cache.reader import CacheReader, ReaderBase, commit_record, group_meta, list_groups, open_meta, parse_record
from repa_cache.cache.storage import StorePath, store_path


@dataclass
class CopyResult:
    src: StorePath
    dst: StorePath
    groups: dict[str, str] = field(default_factory=dict)  # group -> "copied" | "already there"
    shards_copied: int = 0
    shards_skipped: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0


def copy_cache(
    src: str | Path | StorePath,
    dst: str | Path | StorePath,
    groups: Iterable[str] | None = None,
    jobs: int = DEFAULT_COPY_JOBS,
    quiet: bool = False,
    feature_codec: str | None = None,
) -> CopyResult:
    """Copy the committed groups of ``src`` (or ``groups``; latents are always included) to ``dst``.

    ``feature_codec``: store every teacher group in this codec (:mod:`cache.codec`): a group stored
    otherwise is transcoded (read and decoded, checked against its checksums, encoded again and
    written shard by shard with its own records and commit, resumable like a precompute); the
    latents and groups already in that codec are copied byte for byte."""
    t0 = time.perf_counter()
    if jobs <= 0:
        raise UsageError(f"--jobs must be positive, not {jobs}")
    if feature_codec is not None and feature_codec not in FEATURE_CODECS:
        raise UsageError(f"--feature-codec must be one of {', '.join(FEATURE_CODECS)}, not '{feature_codec}'")
    src_root, meta = open_meta(src)
    dst_root = store_path(dst)
    if dst_root.is_within(src_root) or src_root.is_within(dst_root):
        raise UsageError(f"source {src_root} and destination {dst_root} overlap")
    present = list_groups(src_root)
    if groups is None:
        wanted = [g for g in present if commit_record(src_root, g) is not None]
        if not wanted:
            raise CacheError(f"{src_root} has no committed group (was its precompute interrupted? run it again)")
    else:
        wanted = list(dict.fromkeys(["latents", *(ReaderBase.resolve_group(g) for g in groups)]))
    # Opening a reader checks what a reader checks: committed, every record and object present.
    CacheReader(src_root, groups=wanted)
    _check_dst(dst_root, meta)  # refuse a destination that is not ours before writing anything
    targets = {g: _transcoded(src_root, g, feature_codec) for g in wanted}
    with writer_lock(dst_root, "repa cache copy"):  # one writer per cache
        return _copy_locked(src_root, dst_root, meta, wanted, jobs, quiet, t0, targets)


def _transcoded(src: StorePath, group: str, codec: str | None) -> GroupMeta | None:
    """The metadata a group gets in ``codec`` when that changes how it is stored, else None."""
    if codec is None:
        return None
    gmeta = group_meta(src, group)
    if gmeta.kind != "teacher":
        return None
    target = with_feature_codec(gmeta, codec)
    return None if target.fingerprint_hash == gmeta.fingerprint_hash else target


def _copy_locked(src_root: StorePath, dst_root: StorePath, meta: Any, wanted: list[str], jobs: int, quiet: bool,
                 t0: float, targets: dict[str, GroupMeta | None]) -> CopyResult:
    _prepare_dst(src_root, dst_root, meta)
    result = CopyResult(src_root, dst_root)
    done_groups = []
    transcoded: list[GroupMeta] = []
    for group in wanted:
        target = targets[group]
        if target is not None:
            dst_commit = commit_record(dst_root, group)
            if dst_commit is not None:
                if dst_commit["fingerprint_hash"] != target.fingerprint_hash:
                    raise FingerprintMismatch(f"group '{group}' of {dst_root} was made with other settings than "
                                              f"{target.codec_name} tokens from {src_root}")
                result.groups[group] = "already there"
            else:
                _transcode_group(src_root, dst_root, meta, target, jobs, quiet, result)
                transcoded.append(target)
            continue
        src_commit = (commit_path(src_root, group)).read_bytes()
        dst_commit = commit_record(dst_root, group)
        if dst_commit is not None:
            want = commit_record(src_root, group)
            assert want is not None  # the source group was checked to be committed above
            if (dst_commit["fingerprint_hash"], dst_commit["weights_sha256"]) != (want["fingerprint_hash"], want["weights_sha256"]):
                raise FingerprintMismatch(f"group '{group}' of {dst_root} was made with other settings or weights than in {src_root}")
            result.groups[group] = "already there"
            continue
        _copy_group(src_root, dst_root, meta, group, jobs, quiet, result)
        done_groups.append((group, src_commit))

    if done_groups or transcoded:
        src_manifest = (src_root / MANIFEST_FILE).read_bytes()
        dst_manifest = dst_root / MANIFEST_FILE
        if not dst_manifest.exists():
            dst_manifest.write_bytes(src_manifest)
        elif not dst_manifest.read_parquet(columns=["status", "reason"]).equals(
                (src_root / MANIFEST_FILE).read_parquet(columns=["status", "reason"])):
            raise FingerprintMismatch(f"the manifest of {dst_root} differs from that of {src_root}")
        for group, raw in done_groups:  # last: the group is committed at the destination
            commit_path(dst_root, group).write_bytes(raw)
            result.groups[group] = "copied"
        for target in transcoded:
            from repa_cache.cache.writer import commit_group  # transcoding writes; a plain copy never does

            commit_group(dst_root, meta, target)
            result.groups[target.group] = f"transcoded to {target.codec_name}"
    latents = commit_record(src_root, LATENTS)
    assert latents is not None  # every copy holds the latents, checked committed above
    carried = carry_latent_stats(src_root, stats_path(dst_root), latents["fingerprint_hash"])
    if carried is not None:
        result.groups["latent statistics"] = carried
    result.seconds = time.perf_counter() - t0
    return result


def _check_dst(dst: StorePath, meta: Any) -> None:
    """The destination is new, empty (our own lock aside) or the same cache; else refused untouched."""
    if (dst / "zarr.json").is_file():
        _, old = open_meta(dst)
        diff = fingerprint_diff(old.base_fingerprint, meta.base_fingerprint)
        if diff:
            raise FingerprintMismatch(f"{dst} is another cache (made with other settings: {'; '.join(diff)})")
    elif dst.is_file():
        raise UsageError(f"destination {dst} is an existing file, not a cache")
    elif any(not (p.name == LOCK_FILE and is_our_lock(p)) for p in dst.iterdir()):
        raise UsageError(f"destination {dst} is not empty and is not a repa cache")


def _prepare_dst(src: StorePath, dst: StorePath, meta: Any) -> None:
    """A new destination gets the root metadata and plan; an existing one must be the same cache."""
    _check_dst(dst, meta)  # again, under the lock: another writer may have been there meanwhile
    dst.mkdir()
    if not (dst / "zarr.json").exists():
        (dst / "zarr.json").write_bytes((src / "zarr.json").read_bytes())
    if not (dst / PLAN_FILE).exists():
        (dst / PLAN_FILE).write_bytes((src / PLAN_FILE).read_bytes())


def _copy_group(src: StorePath, dst: StorePath, meta: Any, group: str, jobs: int, quiet: bool, result: CopyResult) -> None:
    if group.startswith(TEACHER_PREFIX) and not (dst / TEACHER_PREFIX / "zarr.json").exists():
        parent = src / TEACHER_PREFIX / "zarr.json"
        if parent.exists():
            (dst / TEACHER_PREFIX / "zarr.json").write_bytes(parent.read_bytes())
    if (dst / group / "zarr.json").exists():
        old, new = group_meta(dst, group), group_meta(src, group)
        if old.fingerprint_hash != new.fingerprint_hash:
            diff = "; ".join(fingerprint_diff(old.fingerprint, new.fingerprint))
            raise FingerprintMismatch(f"group '{group}' of {dst} was made with other settings: {diff}")
    gmeta = group_meta(src, group)
    for spec in gmeta.arrays:  # array metadata first, then the group's (which holds the attributes)
        (dst / group / spec.name / "zarr.json").write_bytes((src / group / spec.name / "zarr.json").read_bytes())
    (dst / group / "zarr.json").write_bytes((src / group / "zarr.json").read_bytes())

    arrays = open_zarr(src / group)
    keys = {spec.name: [shard_key(zarr_array(arrays, spec.name), s) for s in range(meta.num_shards)] for spec in gmeta.arrays}
    have = record_shards(dst, meta, group)

    def copy_shard(shard: int) -> int | None:
        """Copy one shard's objects, then its record; None when the destination has it already."""
        raw_rec = record_path(src, group, shard).read_bytes()
        rec = parse_record(group, shard, raw_rec)
        if rec is None:
            raise CacheError(f"group '{group}' of {src}: shard {shard} has an unreadable record; it was not copied "
                             "(run `repa verify` on the source)")
        if shard in have and parse_record(group, shard, record_path(dst, group, shard).read_bytes()) == rec:
            return None
        nbytes = 0
        for name, shard_keys in keys.items():
            target = dst / group / shard_keys[shard]
            if rec.checksums[name] == "absent":  # every row skipped: no object (NaN fill)
                target.unlink()
                continue
            raw = (src / group / shard_keys[shard]).read_bytes()
            if hashlib.sha256(raw).hexdigest() != rec.checksums[name]:
                raise CacheError(f"group '{group}' of {src}: shard {shard} of '{name}' fails its checksum; "
                                 "it was not copied (run `repa verify` on the source)")
            target.write_bytes(raw)
            nbytes += len(raw)
        record_path(dst, group, shard).write_bytes(raw_rec)  # after its data, as the writer does; byte for byte
        return nbytes

    with Progress(meta.num_shards, f"copy {group}", "shards", quiet=quiet) as bar, ThreadPoolExecutor(max_workers=jobs) as pool:
        for nbytes in pool.map(copy_shard, range(meta.num_shards)):
            if nbytes is None:
                result.shards_skipped += 1
            else:
                result.bytes_copied += nbytes
                result.shards_copied += 1
            bar.update(1)


@bulk_reads()
def _transcode_group(src: StorePath, dst: StorePath, meta: Any, target: GroupMeta, jobs: int, quiet: bool,
                     result: CopyResult) -> None:
    """Write ``target.group`` at ``dst`` in its codec from the source's decoded tokens, shard by shard.

    Each source shard is checked against its checksums, decoded to float32 and written by the
    writer as a precompute would (encode, record with the cosine check, later the commit). Shard
    records keep the source's outcomes, weights and input hashes. A shard whose record at ``dst``
    already has the target's fingerprint and the source's outcomes and weights is not written
    again, so a rerun finishes an interrupted transcode.
    """
    from repa_cache.cache.writer import create_group, write_shard  # transcoding writes; a plain copy never does

    group = target.group
    if not (dst / TEACHER_PREFIX / "zarr.json").exists() and (src / TEACHER_PREFIX / "zarr.json").exists():
        (dst / TEACHER_PREFIX / "zarr.json").write_bytes((src / TEACHER_PREFIX / "zarr.json").read_bytes())
    if group in list_groups(dst):
        old = group_meta(dst, group)
        if old.fingerprint_hash != target.fingerprint_hash:
            diff = "; ".join(fingerprint_diff(old.fingerprint, target.fingerprint))
            raise FingerprintMismatch(f"group '{group}' of {dst} was made with other settings: {diff}")
    create_group(dst, meta, target)
    reader = CacheReader(src, groups=[group], verify_checksums=True)
    floats = [a for a in target.arrays if a.name not in {scale_name(n) for n in (target.codec.arrays if target.codec else ())}]
    have = record_shards(dst, meta, group)

    def transcode_shard(shard: int) -> int | None:
        """Write one shard in the target codec; None when the destination has it already."""
        rec = read_record(src, group, shard)
        if shard in have:
            done = read_record(dst, group, shard)
            if (done.fingerprint_hash, done.weights_sha256, done.outcomes) == (target.fingerprint_hash, rec.weights_sha256, rec.outcomes):
                return None
        start, stop = meta.shard_range(shard)
        got = reader.read_block(start, stop, fields=[f"{group}/{a.name}" for a in floats])  # decoded, float32 or float16
        rows = got["index"] - start
        data = {}
        for a in floats:
            data[a.name] = np.full((stop - start, len(meta.views), *a.sample_shape), np.nan, dtype=np.float32)  # (n, V, ...)
            data[a.name][rows] = got[f"{group}/{a.name}"]
        written = write_shard(dst, meta, target, shard, data, rec.outcomes, rec.weights_sha256, rec.input_sha256)
        return sum(written.stored_bytes.values())

    with Progress(meta.num_shards, f"transcode {group}", "shards", quiet=quiet) as bar, ThreadPoolExecutor(max_workers=jobs) as pool:
        for nbytes in pool.map(transcode_shard, range(meta.num_shards)):
            if nbytes is None:
                result.shards_skipped += 1
            else:
                result.bytes_copied += nbytes
                result.shards_copied += 1
            bar.update(1)


def describe_copy(res: CopyResult) -> str:
    parts = ", ".join(f"{g}: {s}" for g, s in res.groups.items())
    return (f"copied {res.src} -> {res.dst}: {res.shards_copied} shards ({format_bytes(res.bytes_copied)}) in "
            f"{res.seconds:.1f}s, {res.shards_skipped} already there; {parts}")


__all__ = ["CopyResult", "copy_cache", "describe_copy"]
