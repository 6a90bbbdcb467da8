"""One dask task = one shard: read its images, crop, encode with the groups it still lacks, write
each group's whole shard and its record. Models are loaded once per worker process and reused
by every task that process runs."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repa_cache.cache.codec import scale_name
from repa_cache.cache.errors import CacheError, RepaError
from repa_cache.cache.format import LATENTS, RECORDS_DIR, TEACHER_PREFIX, CacheMeta, GroupMeta, ShardRecord, record_path
from repa_cache.cache.reader import group_meta, open_meta
from repa_cache.cache.storage import StorePath, describe_storage_error, is_storage_error, store_path
from repa_cache.cache.writer import write_shard
from repa_cache.pipeline.source import ItemTable, SourceItem, read_bytes
from repa_cache.stages import teachers as teachers_mod
from repa_cache.stages import vae as vae_mod
from repa_cache.stages.devices import resolve_device
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.images import DecodeResult, decode_and_crop

log = logging.getLogger(__name__)

_MODELS: dict[tuple[Any, ...], tuple[torch.nn.Module, str]] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs for one shard: where, which inputs (in cache order), which groups."""

    root: str
    shard: int
    items: ItemTable
    groups: tuple[str, ...]
    batch_size: int
    device: str
    cpu_threads: int = 0  # torch threads on a CPU worker (0: leave as is); set per task so a restarted worker matches
    decode_threads: int = 0  # threads decoding and cropping images (0: this machine's cores per GPU)


def _worker_number() -> int:
    """This dask worker's number: a local cluster names its workers 0, 1, ... (worker ``i`` then
    takes GPU ``i % n``); 0 for a worker with another name, or outside a worker."""
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        return 0
    return int(name) if name.isdigit() else 0


def _model(gmeta: GroupMeta, resolution: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The group's model on ``device`` and the sha256 of its weights, loaded once per process."""
    m = gmeta.model
    precision = m.get("precision", "fp32")
    key = (gmeta.group, m.get("id"), m.get("revision"), m.get("config"), m.get("timm_id"), m.get("checkpoint"), resolution, str(device), precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if gmeta.kind == "latents":
                model = vae_mod.load_vae(vae_mod.VAESpec.of_record(m), device=device)
                if precision == "bf16" and device.type == "cuda":
                    model = model.to(memory_format=torch.channels_last)  # the VAE is all convolutions: NHWC is faster under bf16
            else:
                spec = teachers_mod.get_teacher(m["name"])
                model = teachers_mod.load_teacher(spec, resolution, device=device, checkpoint=m.get("checkpoint"))
            _MODELS[key] = (model, state_dict_sha256(model))
            log.info("loaded %s on %s", gmeta.group, device)
        return _MODELS[key]


def release_models() -> None:
    """Drop the models this process loaded (a driver that ran its shards itself gives their
    memory back when it is done)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _encode(gmeta: GroupMeta, model: torch.nn.Module, images: torch.Tensor, resolution: int,
            names: Sequence[str]) -> dict[str, np.ndarray]:
    """Encode a batch of uint8 crops (B, 3, H, W) into the group's arrays ``names`` (numpy,
    float32), in the group's precision (``bf16``: autocast; weights, inputs to autocast and
    outputs stay float32)."""
    bf16 = gmeta.model.get("precision", "fp32") == "bf16"
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        if gmeta.kind == "latents":
            mean, std = vae_mod.encode_images(model, images)  # (B, C, h, w) each
            return {"mean": mean.float().cpu().numpy(), "std": std.float().cpu().numpy()}
        spec = teachers_mod.get_teacher(gmeta.model["name"])
        arrays = teachers_mod.encode_arrays(model, spec, images, resolution, names, gmeta.model)
        return {n: t.cpu().numpy() for n, t in arrays.items()}


def run_shard_task(task: ShardTask) -> dict[str, Any]:
    """The dask task: ``{"records": [...]}``, or ``{"user_error": message}`` for a failure the user
    must fix (a model that cannot load, storage that stopped answering) — returned, not raised, so dask neither retries it
    nor logs a traceback; the driver raises it once. Other exceptions are bugs or lost workers and
    are raised (and retried)."""
    try:
        return {"records": encode_shard(task)}
    except RepaError as e:
        return {"user_error": str(e), "exit_code": e.exit_code}
    except Exception as e:
        if not is_storage_error(e):  # its client already retried them
            raise
        return {"user_error": describe_storage_error(e), "exit_code": 1}


def encode_shard(task: ShardTask) -> list[dict[str, Any]]:
    """Run one shard task; returns the shard records it wrote (as JSON dicts)."""
    root = store_path(task.root)
    _, meta = open_meta(root)
    start, stop = meta.shard_range(task.shard)
    assert len(task.items) == stop - start, "task items do not match the shard range"
    device = resolve_device(task.device, _worker_number())
    if device.type == "cpu" and task.cpu_threads and torch.get_num_threads() != task.cpu_threads:
        torch.set_num_threads(task.cpu_threads)  # CPU results depend on it in the last bits

    # Decode and crop every input, in threads (PIL releases the GIL; one core decodes some 400
    # img/s, less than one GPU encodes); skipped ones keep a defined outcome and no pixels.
    with ThreadPoolExecutor(max_workers=_decode_threads(task, device)) as pool:
        read = list(pool.map(lambda it: _read_and_decode(it, meta.resolution), task.items))
    decoded = [d for d, _ in read]
    hashes = [h for _, h in read]
    _check_inputs_unchanged(root, task, hashes)
    outcomes = [[d.status, d.reason, d.width, d.height] for d in decoded]
    keep = np.array([d.image is not None for d in decoded], dtype=bool)
    crops = np.stack([d.image for d in decoded if d.image is not None]) if keep.any() else None  # (n, H, W, 3)

    records = []
    for group in task.groups:
        gmeta = group_meta(root, group)
        model, weights = _model(gmeta, meta.resolution, device)
        scales = {scale_name(a) for a in (gmeta.codec.arrays if gmeta.codec else ())}  # made by the writer's encoding
        data = {
            a.name: np.full((stop - start, len(meta.views), *a.sample_shape), np.nan, dtype=np.float32)
            for a in gmeta.arrays if a.name not in scales
        }
        if crops is not None:
            for v, view in enumerate(meta.views):
                for b0 in range(0, len(crops), task.batch_size):
                    batch = torch.from_numpy(crops[b0 : b0 + task.batch_size]).permute(0, 3, 1, 2)  # (B, 3, H, W)
                    if view == "hflip":
                        batch = batch.flip(-1)
                    batch = batch.contiguous().to(device, non_blocking=True)
                    out = _encode(gmeta, model, batch, meta.resolution, list(data))
                    rows = np.flatnonzero(keep)[b0 : b0 + task.batch_size]
                    for name, arr in out.items():
                        data[name][rows, v] = arr
        record = write_shard(root, meta, gmeta, task.shard, data, outcomes, weights, input_sha256=hashes)
        records.append(record.to_json())
    return records


def _read_and_decode(item: SourceItem, resolution: int) -> tuple[DecodeResult, str]:
    """An item's decoded crop and the sha256 of the bytes it was decoded from (same read)."""
    data = read_bytes(item)
    return decode_and_crop(data, resolution), hashlib.sha256(data).hexdigest()


def describe_item(item: SourceItem) -> str:
    """The file an item is read from, for a message: its path, or ``TAR member KEY``."""
    if item.offset < 0:
        return item.path
    return f"{item.path} member {item.key.split('/', 1)[-1]}"


def _check_inputs_unchanged(root: StorePath, task: ShardTask, hashes: list[str]) -> None:
    """Refuse to encode this shard if another group already wrote it from different bytes.

    The listing fingerprint covers each input's key, label and size, not its content; a file
    replaced by another of the same size between a killed run and its resume (or before a teacher
    is added) would mix the old pixels' data with the new ones'. Records written before input
    hashes existed have none, and are not checked.

    Raises:
        CacheError: an input's bytes differ from those another group's record was made from.
    """
    records = root / RECORDS_DIR
    teachers = records / TEACHER_PREFIX.rstrip("/")
    groups = [LATENTS] + ([f"{TEACHER_PREFIX}{p.name}" for p in teachers.iterdir()] if teachers.is_dir() else [])
    for group in groups:
        if group in task.groups:
            continue
        path = record_path(root, group, task.shard)
        if not path.is_file():
            continue
        recorded = ShardRecord.from_json(path.read_json()).input_sha256
        if not recorded:
            continue
        if len(recorded) != len(hashes):
            raise CacheError(f"shard {task.shard} of '{group}' records {len(recorded)} inputs, not {len(hashes)}; the cache is damaged")
        for item, old, new in zip(task.items, recorded, hashes):
            if old != new:
                raise CacheError(
                    f"{describe_item(item)} changed since shard {task.shard} of '{group}' was encoded from it "
                    f"(same size, sha256 {old[:12]} -> {new[:12]}); restore the file or precompute into a new cache"
                )


def _decode_threads(task: ShardTask, device: torch.device) -> int:
    if task.decode_threads:
        return task.decode_threads
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    return max(1, (os.cpu_count() or 1) // max(1, gpus))


def shard_tasks(
    root: StorePath,
    meta: CacheMeta,
    items_in_order: ItemTable,
    todo: dict[int, list[str]],
    batch_size: int,
    device: str,
    cpu_threads: int = 0,
) -> list[ShardTask]:
    """One task per shard that still lacks at least one group (its items: a slice of
    ``items_in_order``, which shares its arrays)."""
    tasks = []
    for shard in sorted(todo):
        start, stop = meta.shard_range(shard)
        items = items_in_order[start:stop]
        tasks.append(ShardTask(str(root), shard, items, tuple(todo[shard]), batch_size, device, cpu_threads, decode_threads=cpu_threads))
    return tasks
