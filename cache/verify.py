"""``repa verify``: check every shard of every group against its record.

For each group: the commit record exists; every shard has a record; every stored shard object
exists and hashes to the record's checksum; it decodes to the expected shape; and the rows of
inputs that were not skipped hold finite values (a lost chunk reads back as NaN fill).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repa_cache.cache.codec import MISSING_INT8
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import MANIFEST_FILE, CacheMeta
from repa_cache.cache.layout import load_records
from repa_cache.cache.progress import Progress
from repa_cache.cache.reader import (
    GroupInfo,
    check_plan,
    check_shard,
    commit_record,
    group_arrays,
    group_meta,
    list_groups,
    open_meta,
    read_manifest,
)
from repa_cache.cache.storage import StorePath

log = logging.getLogger(__name__)


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
        status = np.asarray(read_manifest(root, meta, columns=["status"]).column("status").to_pylist())
        valid = status != "skipped"
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
        records = load_records(root, meta, group)
        info = GroupInfo(gmeta, {}, arrays, records)
        for shard in range(meta.num_shards):
            bar.update(1)
            report.shards_checked += 1
            if shard not in records:
                report.problems.append(Problem(group, shard, "has no record (never finished)"))
                continue
            problem = _record_problem(info, meta, shard) or check_shard(info, shard) or _check_contents(info, meta, shard, valid)
            if problem:
                report.problems.append(Problem(group, shard, problem))
    bar.close()
    return report


def _record_problem(info: GroupInfo, meta: CacheMeta, shard: int) -> str | None:
    """A record that does not describe this shard (its range, count, outcomes, arrays)."""
    rec = info.records[shard]
    start, stop = meta.shard_range(shard)
    if (rec.start, rec.stop, rec.count) != (start, stop, stop - start) or len(rec.outcomes) != stop - start:
        return f"has a record for [{rec.start}, {rec.stop}) with {len(rec.outcomes)} outcomes, expected [{start}, {stop})"
    if set(rec.checksums) != set(info.arrays):
        return f"has a record for arrays {sorted(rec.checksums)}, expected {sorted(info.arrays)}"
    return None


def _check_contents(info: GroupInfo, meta: CacheMeta, shard: int, valid: np.ndarray | None) -> str | None:
    start, stop = meta.shard_range(shard)
    rec = info.records[shard]
    keep = np.array([o[0] != "skipped" for o in rec.outcomes], dtype=bool) if valid is None else valid[start:stop]
    for name, arr in info.arrays.items():
        try:
            block = np.asarray(arr[start:stop])
        except Exception as e:  # noqa: BLE001 - undecodable data is exactly what verify reports
            return f"of '{name}' does not decode: {e}"
        spec = info.meta.array(name)
        want = (stop - start, len(meta.views), *spec.sample_shape)
        if block.shape != want:
            return f"of '{name}' has shape {block.shape}, expected {want}"
        if keep.any() and not np.isfinite(block[keep]).all():
            return f"of '{name}' has missing or non-finite values in encoded rows"
        if keep.any() and block.dtype == np.int8 and (block[keep] == MISSING_INT8).any():  # the int8 fill value
            return f"of '{name}' has missing values in encoded rows"
    return None
