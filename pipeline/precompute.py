"""``repa precompute``: encode a dataset into a cache, resuming or adding groups as needed.

Running the same command again is always safe: it compares fingerprints, skips committed groups,
and submits only the shards that have no record yet. Asking for a new teacher on an existing cache
re-reads the images but does not run the VAE.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import torch

from repa_cache.cache.codec import FLOAT16
from repa_cache.cache.errors import CacheError, FingerprintMismatch, RepaError, UsageError, quiet_unraisable
from repa_cache.cache.format import (
    LATENTS,
    PLAN_FILE,
    ROOT_ATTR,
    CacheMeta,
    GroupMeta,
    commit_path,
    fingerprint_diff,
    record_path,
    teacher_group,
    with_feature_codec,
)
from repa_cache.cache.latent_stats import compute_latent_stats, stats_path, write_latent_stats
from repa_cache.cache.layout import read_record, record_shards, shard_key
from repa_cache.cache.lock import LOCK_FILE, is_our_lock, writer_lock
from repa_cache.cache.progress import Progress
from repa_cache.cache.reader import commit_record, group_arrays, group_meta, list_groups, open_meta
from repa_cache.cache.storage import StorePath, store_path
from repa_cache.cache.writer import commit_group, create_cache, create_group
from repa_cache.pipeline.groups import STAGE_ONE_PRECISIONS, teacher_group_meta, vae_group
from repa_cache.pipeline.plan import PrecomputeConfig, check_config, make_plan, sample_order
from repa_cache.pipeline.source import list_source
from repa_cache.pipeline.worker import ShardTask, release_models, run_shard_task, shard_tasks
from repa_cache.stages.devices import check_precision
from repa_cache.stages.teachers import get_teacher, hidden_metadata, parse_layers
from repa_cache.stages.vae import DEFAULT_VAE, VAESpec
from repa_cache.stages.vae_presets import canonical_vae

log = logging.getLogger(__name__)


@dataclass
class PrecomputeResult:
    root: StorePath
    groups: dict[str, str] = field(default_factory=dict)  # group -> "written" | "resumed" | "already committed"
    shards_written: int = 0
    seconds: float = 0.0
    samples: int = 0
    skipped: int = 0
    repaired: dict[str, list[int]] = field(default_factory=dict)  # group -> damaged shards encoded again
    latent_stats: bool = False  # dataset latent statistics computed (--latent-norm dataset)


def _check_out_path(out: StorePath) -> bool:
    """True when ``out`` already holds a cache; UsageError when it holds something else (nothing
    we did not write is overwritten: only an empty folder, or one holding only our lock, is new)."""
    if (out / "zarr.json").is_file():
        return True
    if out.is_file():
        raise UsageError(f"output path {out} is an existing file, not a cache")
    if any(not (p.name == LOCK_FILE and is_our_lock(p)) for p in out.iterdir()):
        raise UsageError(f"output folder {out} is not empty and is not a repa cache")
    return False


def precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    t0 = time.perf_counter()
    check_config(cfg)  # bounds, device, OUT not inside DATA
    for name in cfg.teachers:
        get_teacher(name)  # unknown teacher: one clear message before any work
    if cfg.precision is not None:
        check_precision(cfg.precision, allowed=STAGE_ONE_PRECISIONS)
    if len(set(cfg.teachers)) != len(cfg.teachers):
        raise UsageError("a teacher is named twice")
    _check_layers(cfg)
    out = store_path(cfg.out)
    _check_out_path(out)  # before anything is written there
    listing = list_source(cfg.data)
    meta, plan = make_plan(listing, cfg)
    with writer_lock(out, "repa precompute"):  # one writer per cache
        return _precompute_locked(cfg, out, listing, meta, plan, t0)


def _precompute_locked(cfg: PrecomputeConfig, out: StorePath, listing: Any, meta: CacheMeta, plan: Any,
                       t0: float) -> PrecomputeResult:
    existing = _check_out_path(out)  # again: another writer may have created it meanwhile

    if existing:
        _, old = open_meta(out)
        diff = fingerprint_diff(old.base_fingerprint, meta.base_fingerprint)
        if diff:
            raise FingerprintMismatch(f"{out} was made with other settings: {'; '.join(diff)}")
        meta = old
        if not (out / PLAN_FILE).exists():  # killed between the root metadata and the plan
            create_cache(out, meta, plan)

    present = list_groups(out) if existing else []
    repaired = _reopen_damaged(cfg, out, meta, present) if cfg.repair else {}

    layers = _teacher_layers(cfg, out, present)

    def precision(group: str) -> str:  # as the VAE: the group's own when none is asked for
        if cfg.precision is not None:
            return cfg.precision
        return group_meta(out, group).model.get("precision", "fp32") if group in present else "fp32"

    wanted: list[GroupMeta] = [vae_group(meta, _vae_spec(cfg, out if existing else None), precision("latents"))]
    def registers(group: str) -> bool:  # as the hidden tokens: a group that holds them keeps them
        return cfg.registers or (group in present and "registers" in group_meta(out, group).model)

    wanted += [_stored_as(teacher_group_meta(meta, t, cfg.feature_dtype, cfg.teacher_checkpoints.get(t), precision(teacher_group(t)),
                                             layers[t], registers(teacher_group(t))),
                          cfg.feature_codec)
               for t in cfg.teachers]
    if not existing:  # only now: a VAE or teacher that cannot be described leaves no cache behind
        create_cache(out, meta, plan)

    result = PrecomputeResult(root=out, samples=meta.num_samples, repaired=repaired)
    todo: dict[int, list[str]] = {}
    known_weights: dict[str, str] = {}
    for i, g in enumerate(wanted):
        if g.group in present:
            old_g = group_meta(out, g.group)
            diff = fingerprint_diff(old_g.fingerprint, g.fingerprint)
            if diff:
                raise FingerprintMismatch(_group_mismatch(out, old_g, g, diff))
            wanted[i] = g = old_g  # the same settings; a group of an older format keeps its own metadata
            if commit_record(out, g.group) is not None:
                result.groups[g.group] = "already committed"
                continue
            result.groups[g.group] = "resumed"
        else:
            create_group(out, meta, g)
            result.groups[g.group] = "written"
        done = record_shards(out, meta, g.group)
        if done:
            known_weights[g.group] = read_record(out, g.group, min(done)).weights_sha256
        for shard in range(meta.num_shards):
            if shard not in done:
                todo.setdefault(shard, []).append(g.group)

    items = listing.items.take(sample_order(len(listing.items), cfg.seed))  # in cache order
    tasks = shard_tasks(out, meta, items, todo, cfg.batch_size, cfg.device, cpu_threads=_cpu_threads(cfg))
    if tasks:
        result.shards_written = _run_tasks(cfg, tasks, known_weights)
    for g in wanted:
        if result.groups[g.group] != "already committed":
            commit = commit_group(out, meta, g)
            result.skipped = commit["counts"]["skipped"]
    if cfg.latent_norm == "dataset" and (result.groups[LATENTS] != "already committed" or not stats_path(out).exists()):
        write_latent_stats(out, compute_latent_stats(out, quiet=cfg.quiet))  # over the latents just committed
        result.latent_stats = True
    result.seconds = time.perf_counter() - t0
    return result


def _reopen_damaged(cfg: PrecomputeConfig, out: StorePath, meta: CacheMeta, present: list[str]) -> dict[str, list[int]]:
    """``--repair``: verify the cache, then take back every damaged shard (its stored objects and
    its record) and the commit of its group, so that the run encodes those shards again from the
    source and commits the group anew. A group the command does not name is refused untouched."""
    from repa_cache.cache.verify import verify_cache

    if not present:
        raise UsageError(f"--repair needs an existing cache; {out} holds none")
    report = verify_cache(str(out), quiet=cfg.quiet)
    damaged: dict[str, set[int]] = {}
    for p in report.problems:
        if p.shard is not None:
            damaged.setdefault(p.group, set()).add(p.shard)
        elif p.group in present and commit_record(out, p.group) is not None:
            raise CacheError(f"cannot repair {out}: {p} (not a damaged shard: copy what is intact with repa cache copy)")
    named = {LATENTS} | {teacher_group(t) for t in cfg.teachers}
    unnamed = sorted(set(damaged) - named)
    if unnamed:
        raise UsageError(f"{', '.join(unnamed)} of {out} has damaged shards: name its teacher with --teacher to repair it")
    for group, shards in damaged.items():
        gmeta = group_meta(out, group)
        arrays = group_arrays(out, meta, group, gmeta)
        commit_path(out, group).unlink(missing_ok=True)  # first: from here on readers refuse the group
        for shard in sorted(shards):
            for arr in arrays.values():
                (out / group / shard_key(arr, shard)).unlink(missing_ok=True)
            record_path(out, group, shard).unlink(missing_ok=True)
        log.info("repair: %s shards %s taken back", group, sorted(shards))
    return {g: sorted(s) for g, s in sorted(damaged.items())}


def _teacher_layers(cfg: PrecomputeConfig, out_path: StorePath, present: list[str]) -> dict[str, tuple[int, int | None] | None]:
    """The hidden tokens of each teacher of the command: ``--teacher-layers NAME=FIRST[-LAST]``, or
    ``FIRST[-LAST]`` for every teacher; a teacher it does not name keeps what its group already
    holds (as the precision does), and a new one gets none (None)."""
    out: dict[str, tuple[int, int | None] | None] = {}
    for t in cfg.teachers:
        held = group_meta(out_path, teacher_group(t)).model.get("hidden") if teacher_group(t) in present else None
        first, last = (held.get("first_block"), held.get("last_block")) if isinstance(held, dict) else (None, None)
        out[t] = (first, last) if isinstance(first, int) and isinstance(last, int) else None
    for name, text in cfg.teacher_layers.items():
        if name == "*":
            out = {t: parse_layers(text) for t in cfg.teachers}
    for name, text in cfg.teacher_layers.items():
        if name != "*":
            out[name] = parse_layers(text)
    return out


def _check_layers(cfg: PrecomputeConfig) -> None:
    """Refuse a bad ``--teacher-layers`` before anything is written: its syntax, the teachers it
    names, and blocks the teacher has (its attention must be readable)."""
    for name, text in cfg.teacher_layers.items():
        if name != "*" and name not in cfg.teachers:
            raise UsageError(f"--teacher-layers names teacher '{name}', which this command does not encode "
                             f"(--teacher: {', '.join(cfg.teachers)})")
        for t in cfg.teachers if name == "*" else (name,):
            hidden_metadata(get_teacher(t), cfg.resolution, parse_layers(text))


def _group_mismatch(out: StorePath, old: GroupMeta, new: GroupMeta, diff: list[str]) -> str:
    """One line for a group that exists with other settings; other hidden tokens say what to do."""
    had, wants = old.model.get("hidden"), new.model.get("hidden")
    if had != wants:
        def blocks(h: Any) -> str:
            return f"hidden tokens for blocks {h['first_block']}-{h['last_block']}" if h else "no hidden tokens"
        return (f"group '{new.group}' of {out} holds {blocks(had)}, and this command asks for {blocks(wants)} "
                "(--teacher-layers); a group's arrays are fixed once written: copy the latents to a new cache "
                f"(repa cache copy {out} NEW --latents-only) and precompute the teacher there")
    return f"group '{new.group}' of {out} was made with other settings: {'; '.join(diff)}"


def _stored_as(gmeta: GroupMeta, codec: str) -> GroupMeta:
    """A teacher group with ``--feature-codec``: float16 leaves it exactly as it always was."""
    return gmeta if codec == FLOAT16 else with_feature_codec(gmeta, codec)


def _vae_spec(cfg: PrecomputeConfig, existing: StorePath | None) -> VAESpec:
    """The VAE asked for; when none is named, the one the cache already has, else the default."""
    if cfg.vae is not None:
        return VAESpec(canonical_vae(cfg.vae), cfg.vae_revision, cfg.vae_config)
    if existing is not None and "latents" in list_groups(existing):
        return VAESpec.of_record(group_meta(existing, "latents").model)
    return VAESpec(DEFAULT_VAE, cfg.vae_revision, cfg.vae_config)


def _run_tasks(cfg: PrecomputeConfig, tasks: list[ShardTask], known_weights: dict[str, str]) -> int:
    """Run one task per shard, checking records as they arrive: in this process when the work is
    local and one worker does it, else on a dask cluster (a local one, or ``cfg.scheduler``)."""
    weights = dict(known_weights)  # group -> weights sha256 of the shards already written
    images = {t.shard: len(t.items) for t in tasks}  # counted when its shard finishes
    bar = Progress(sum(images.values()), "precompute", "img", quiet=cfg.quiet)
    written = 0
    with closing(_completed(cfg, tasks)) as completed:  # an error stops the other tasks at once
        for task, result in completed:
            if "user_error" in result:
                err = RepaError(result["user_error"])
                err.exit_code = result["exit_code"]
                raise err
            for rec in result["records"]:
                w = weights.setdefault(rec["group"], rec["weights_sha256"])
                if w != rec["weights_sha256"]:
                    raise FingerprintMismatch(
                        f"the weights of '{rec['group']}' differ from those that wrote its other shards "
                        f"({w[:12]} vs {rec['weights_sha256'][:12]}); use the same model files to resume"
                    )
            written += 1
            bar.update(images[task.shard])
    bar.close()
    return written


def _completed(cfg: PrecomputeConfig, tasks: list[ShardTask]) -> Generator[tuple[ShardTask, dict[str, Any]], None, None]:
    """``(task, result)`` of :func:`run_shard_task` for every task, as they finish. Closing the
    iterator early (an error) stops the tasks still to run."""
    cuda = torch.cuda.is_available() and (cfg.device == "auto" or cfg.device.startswith("cuda"))
    # On a GPU, two tasks per worker overlap one shard's decode and write with the next one's
    # encode (they share the worker's models); on a CPU the cores are already split up.
    per_worker = 2 if cuda else 1
    workers = cfg.workers or (torch.cuda.device_count() if cuda else 1)
    if cfg.scheduler is None and workers == 1:
        yield from _completed_here(tasks, per_worker)
    else:
        yield from _completed_on_dask(cfg, tasks, workers, per_worker)


def _completed_here(tasks: list[ShardTask], threads: int) -> Generator[tuple[ShardTask, dict[str, Any]], None, None]:
    """The tasks in this process (no cluster to start: the work of one local worker), ``threads``
    at a time. Its models and torch's thread count are given back when it ends."""
    torch_threads = torch.get_num_threads()
    try:
        if threads == 1:
            for task in tasks:
                yield task, run_shard_task(task)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="shard") as pool:
            running = {pool.submit(run_shard_task, t): t for t in tasks}
            try:
                for future in as_completed(running):
                    yield running[future], future.result()
            finally:
                for future in running:
                    future.cancel()
    finally:
        release_models()
        torch.set_num_threads(torch_threads)


def _completed_on_dask(cfg: PrecomputeConfig, tasks: list[ShardTask], workers: int,
                       per_worker: int) -> Generator[tuple[ShardTask, dict[str, Any]], None, None]:
    """The tasks on ``cfg.scheduler``'s cluster, or on a local cluster of ``workers`` workers."""
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_completed

    if cfg.scheduler:
        client = Client(cfg.scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=per_worker, processes=cfg.processes,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
        if cfg.processes:
            client.run(_die_with_parent)
            client.run(quiet_unraisable)
    if not cfg.quiet and client.dashboard_link:
        print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        futures = [client.submit(run_shard_task, t, pure=False, retries=2, key=f"shard-{t.shard:06d}-{time.time_ns()}") for t in tasks]
        by_key = {f.key: t for f, t in zip(futures, tasks)}
        try:
            for future, result in dask_completed(futures, with_results=True):
                yield by_key[future.key], result
        finally:
            client.cancel(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _cpu_threads(cfg: PrecomputeConfig) -> int:
    """Torch threads per local CPU worker: the cores shared among the workers (0 on a remote cluster)."""
    if cfg.scheduler:
        return 0
    return max(1, (os.cpu_count() or 1) // (cfg.workers or 1))


def _die_with_parent() -> None:
    """Make a local worker process die with the driver (Linux), so a killed run leaves no writer."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def describe_result(res: PrecomputeResult) -> str:
    parts = [f"{g}: {s}" + (f" (shards {res.repaired[g]} repaired)" if res.repaired.get(g) else "") for g, s in res.groups.items()]
    return (
        f"cache {res.root}: {res.samples} samples ({res.skipped} skipped), {res.shards_written} shard tasks run "
        f"in {res.seconds:.1f}s; " + ", ".join(parts) + ("; latent statistics computed" if res.latent_stats else "")
    )


__all__ = ["ROOT_ATTR", "PrecomputeConfig", "PrecomputeResult", "describe_result", "precompute"]
