"""``repa verify``: check every shard of every group against its record.

For each group: the commit record exists; every shard has a record; every stored shard object
exists and hashes to the record's checksum (and, written by format v2, carries the chunk checksums
the record lists); it decodes to the expected shape (zarr checks each chunk's crc32c); and the rows
of inputs that were not skipped hold finite values (a lost chunk reads back as NaN fill).

Records are read a batch at a time (concurrently on an object store), so memory does not grow with
the number of shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import zarr

from repa_cache.cache.chunks import chunk_layout
from repa_cache.cache.codec import MISSING_INT8
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import MANIFEST_FILE, CacheMeta, GroupMeta, ShardRecord, record_path
from repa_cache.cache.layout import bulk_reads, record_shards
from repa_cache.cache.progress import Progress
from repa_cache.cache.reader import (
    check_plan,
    check_shard,
    commit_record,
    group_arrays,
    group_meta,
    list_groups,
    open_meta,
    parse_record,
    read_manifest,
)
from repa_cache.cache.storage import StorePath

log = logging.getLogger(__name__)

RECORD_BATCH = 64  # shard records read together


@dataclass
class Problem:
    group: str
    shard: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.group} shard {self.shard}" if self.shard is not None else self.group
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    root: StorePath
    groups: list[str] = field(default_factory=list)
    shards_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@bulk_reads()
def verify_cache(path: str | Path, quiet: bool = False) -> VerifyReport:
    """Check the whole cache; never raises for damage to shards or groups, it reports it.

    CacheError (one line) when it is not a cache, or when what the sizes of everything else
    depend on cannot be trusted: root metadata out of bounds, a plan (or, once a group is
    committed, a manifest) missing or with another row count than ``num_samples``.
    """
    root, meta = open_meta(path)
    check_plan(root, meta)
    report = VerifyReport(root)
    groups = list_groups(root)
    report.groups = groups
    if not groups:
        report.problems.append(Problem("cache", None, "has no groups"))
        return report
    committed = {g for g in groups if commit_record(root, g) is not None}
    valid = None
    if committed or (root / MANIFEST_FILE).exists():
        status = read_manifest(root, meta, columns=["status", "label"]).column("status")  # labels checked in range
        valid = pc.not_equal(status, "skipped").to_numpy(zero_copy_only=False)
    total = len(groups) * meta.num_shards
    bar = Progress(total, "verify", "shards", quiet=quiet)
    for group in groups:
        if group not in committed:
            report.problems.append(Problem(group, None, "is not committed (its precompute did not finish)"))
        try:
            gmeta = group_meta(root, group)
            arrays = group_arrays(root, meta, group, gmeta)
        except CacheError as e:
            report.problems.append(Problem(group, None, str(e)))
            bar.update(meta.num_shards)
            continue
        have = record_shards(root, meta, group)
        layouts = {name: chunk_layout(arr) for name, arr in arrays.items()}
        for first in range(0, meta.num_shards, RECORD_BATCH):
            batch = range(first, min(first + RECORD_BATCH, meta.num_shards))
            raw = root.read_many(record_path(root, group, s) for s in batch if s in have)
            for shard in batch:
                bar.update(1)
                report.shards_checked += 1
                data = raw.get(record_path(root, group, shard))
                if data is None:
                    report.problems.append(Problem(group, shard, "has no record (never finished)"))
                    continue
                rec = parse_record(group, shard, data)
                problem = "has an unreadable or foreign record" if rec is None else (
                    _record_problem(rec, arrays, meta, shard) or check_shard(arrays, rec, layouts)
                    or _check_contents(gmeta, arrays, rec, meta, valid))
                if problem:
                    report.problems.append(Problem(group, shard, problem))
    bar.close()
    return report


def _record_problem(rec: ShardRecord, arrays: dict[str, zarr.Array], meta: CacheMeta, shard: int) -> str | None:
    """A record that does not describe this shard (its range, count, outcomes, arrays)."""
    start, stop = meta.shard_range(shard)
    if (rec.start, rec.stop, rec.count) != (start, stop, stop - start) or len(rec.outcomes) != stop - start:
        return f"has a record for [{rec.start}, {rec.stop}) with {len(rec.outcomes)} outcomes, expected [{start}, {stop})"
    if set(rec.checksums) != set(arrays):
        return f"has a record for arrays {sorted(rec.checksums)}, expected {sorted(arrays)}"
    return None


def _check_contents(gmeta: GroupMeta, arrays: dict[str, zarr.Array], rec: ShardRecord, meta: CacheMeta,
                    valid: np.ndarray | None) -> str | None:
    start, stop = meta.shard_range(rec.shard)
    keep = np.array([o[0] != "skipped" for o in rec.outcomes], dtype=bool) if valid is None else valid[start:stop]
    for name, arr in arrays.items():
        try:
            block = np.asarray(arr[start:stop])
        except Exception as e:  # noqa: BLE001 - undecodable data is exactly what verify reports
            return f"of '{name}' does not decode: {e}"
        spec = gmeta.array(name)
        want = (stop - start, len(meta.views), *spec.sample_shape)
        if block.shape != want:
            return f"of '{name}' has shape {block.shape}, expected {want}"
        if keep.any() and not np.isfinite(block[keep]).all():
            return f"of '{name}' has missing or non-finite values in encoded rows"
        if keep.any() and block.dtype == np.int8 and (block[keep] == MISSING_INT8).any():  # the int8 fill value
            return f"of '{name}' has missing values in encoded rows"
    return None
