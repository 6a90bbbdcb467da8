"""The on-disk layout of a cache (format v1) and the small typed records stored in it.

A cache is one zarr v3 group plus a few JSON and Parquet files beside the arrays::

    CACHE/
      zarr.json                     root group; attributes["repa_cache"] = CacheMeta
      plan.parquet                  cache index -> source key, label (written before any data)
      latents/                      group: mean, std            (N, V, C, h, w) float32
      teachers/<name>/              group: patch (N, V, T, D), cls (N, V, D)   float16 by default
      _records/<group>/<shard>.json one ShardRecord per written shard (after its data is durable)
      manifest.parquet              plan + per-input outcome (written before the first commit)
      _commits/<group>.json         CommitRecord, written last: the group is committed

Every array is chunked along the sample axis with zarr's sharding codec: one zarr shard = one
cache shard = one unit of work, written whole by exactly one task. Inner chunks hold one view of
one sample, so random access by index (and view) reads only what it asks for. The fill value is NaN, so a
chunk that was never written can never pass for data: readers check shard records, commit
records and finiteness before they hand anything out. See docs/cache-format.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from repa_cache.cache.codec import FEATURE_CODECS, FLOAT16, INT8, SCALE_DTYPE, Int8Codec, codec_problem, scale_name, scale_shape
from repa_cache.cache.storage import StorePath, store_path

#: The format this code writes. v2: every inner chunk and shard index carries a crc32c, and shard
#: records bind each shard object's chunk checksums (cache.chunks); a cache that holds any group
#: written by v2 code (an int8 one included) says v2, so that readers of v1 refuse it. Readers read
#: v1 and v2; a v1 group is checked with its whole-shard sha256 checksums.
FORMAT_VERSION = 2
CODE_VERSION = "0.1.0"

ROOT_ATTR = "repa_cache"
GROUP_ATTR = "repa_group"
LATENTS = "latents"
TEACHER_PREFIX = "teachers/"
PLAN_FILE = "plan.parquet"
MANIFEST_FILE = "manifest.parquet"
RECORDS_DIR = "_records"
COMMITS_DIR = "_commits"

VIEW_NAMES = ("orig", "hflip")

# Bounds on sizes read from a cache's metadata, checked before anything is allocated or looped
# over (a file a user hands over is hostile). Far above any real dataset or model.
MAX_SAMPLES = 1 << 34  # ~17e9 inputs (LAION-5B has 5.9e9)
MAX_SHARD_SIZE = 1 << 20  # samples per shard
MAX_SAMPLE_ELEMENTS = 1 << 26  # values per sample and view of one array (DINOv2-G at 512 px: 1024 x 1536)
MAX_CLASSES = 1 << 20
MAX_RESOLUTION = 1 << 14
CROP_RULE = "adm-center"  # ADM/DiT: BOX-halve while >= 2x, BICUBIC resize of the short side, center crop


def teacher_group(name: str) -> str:
    """Group path of a teacher's features inside the cache."""
    return f"{TEACHER_PREFIX}{name}"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the input of every hash in the cache."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def write_json_atomic(path: StorePath | Path, obj: Any) -> None:
    """Write ``obj`` as JSON so that readers see either nothing or the whole file (see
    :meth:`cache.storage.StorePath.write_bytes`: temp file, fsync, rename on disk; one PUT on S3)."""
    store_path(path).write_json(obj)


def read_json(path: StorePath | Path) -> Any:
    return store_path(path).read_json()


@dataclass(frozen=True)
class CacheMeta:
    """Cache-wide description, fixed when the cache is created (root attributes).

    ``base_fingerprint`` covers everything every group shares: the dataset listing, crop rule,
    resolution, views, sample order (seed) and shard size. Each group adds its own model part.
    """

    format_version: int
    code_version: str
    num_samples: int
    shard_size: int
    resolution: int
    crop: str
    views: tuple[str, ...]
    seed: int
    class_names: tuple[str, ...]
    source: dict[str, Any]
    base_fingerprint: dict[str, Any]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Cache indices ``[start, stop)`` of one shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["views"] = list(self.views)
        d["class_names"] = list(self.class_names)
        d["num_shards"] = self.num_shards
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["views"] = tuple(kw["views"])
        kw["class_names"] = tuple(kw["class_names"])
        return cls(**kw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def meta_problem(meta: CacheMeta) -> str | None:
    """What is out of bounds or inconsistent in root metadata read from a file, or None."""
    if not _is_int(meta.num_samples) or not 1 <= meta.num_samples <= MAX_SAMPLES:
        return f"num_samples {meta.num_samples!r} is not an integer in [1, {MAX_SAMPLES}]"
    if not _is_int(meta.shard_size) or not 1 <= meta.shard_size <= MAX_SHARD_SIZE:
        return f"shard_size {meta.shard_size!r} is not an integer in [1, {MAX_SHARD_SIZE}]"
    if not _is_int(meta.resolution) or not 1 <= meta.resolution <= MAX_RESOLUTION:
        return f"resolution {meta.resolution!r} is not an integer in [1, {MAX_RESOLUTION}]"
    if not meta.views or len(set(meta.views)) != len(meta.views) or any(v not in VIEW_NAMES for v in meta.views):
        return f"views {list(meta.views)!r} are not distinct names of {list(VIEW_NAMES)}"
    if len(meta.class_names) > MAX_CLASSES:
        return f"{len(meta.class_names)} class names (at most {MAX_CLASSES})"
    return None


def group_problem(gmeta: GroupMeta) -> str | None:
    """What is out of bounds in a group's metadata read from a file, or None."""
    if not gmeta.arrays:
        return "has no arrays"
    for a in gmeta.arrays:
        if not all(_is_int(d) and d >= 1 for d in a.sample_shape) or len(a.sample_shape) > 8:
            return f"array '{a.name}' has sample shape {list(a.sample_shape)!r} (positive integers expected)"
        n = 1
        for d in a.sample_shape:
            n *= d
        if n > MAX_SAMPLE_ELEMENTS:
            return f"array '{a.name}' has {n} values per sample (at most {MAX_SAMPLE_ELEMENTS})"
        try:
            np.dtype(a.dtype)
        except TypeError:
            return f"array '{a.name}' has unknown dtype {a.dtype!r}"
    return codec_problem(gmeta.feature_codec, {a.name: (a.sample_shape, a.dtype) for a in gmeta.arrays})


_T = TypeVar("_T")


@dataclass(frozen=True)
class LatentNorm:
    """How stored VAE latents map to the diffusion model's space and back.

    ``z = (x - shift) * scale`` and ``x = z / scale + shift``, where ``scale`` and ``shift`` hold
    either one value (SD-VAE: ``scaling_factor`` 0.18215, no shift) or one value per latent
    channel (VAEs that publish per-channel statistics). Recorded once, at stage one, from the
    VAE's own config (:func:`repa_cache.stages.vae.latent_norm`), stored in the latents group's
    metadata and in every checkpoint; the trainer, the samplers and the alignment metrics use
    these two methods and nothing else.
    """

    scale: tuple[float, ...]
    shift: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "shift", tuple(float(v) for v in self.shift))
        if not self.scale or not self.shift:
            raise ValueError("a latent normalisation needs at least one scale and one shift")
        if any(v == 0 or not np.isfinite(v) for v in self.scale) or not all(np.isfinite(v) for v in self.shift):
            raise ValueError(f"latent scale must be finite and non-zero and shift finite, got {self}")

    @property
    def channels(self) -> int | None:
        """Number of channels it is defined per, or None for one scalar each."""
        n = max(len(self.scale), len(self.shift))
        return None if n == 1 else n

    def _coef(self, values: tuple[float, ...], like: Any) -> Any:
        if len(values) == 1:
            return values[0]  # a Python scalar: the same arithmetic as ``x * 0.18215``
        shape = (1, len(values)) + (1,) * (like.ndim - 2)  # per channel of (B, C, ...)
        if hasattr(like, "new_tensor"):  # a torch tensor, without importing torch here
            return like.new_tensor(values).reshape(shape)
        return np.asarray(values, dtype=like.dtype).reshape(shape)

    def to_model(self, x: _T) -> _T:
        """Stored latents (B, C, h, w) -> the model's space: ``(x - shift) * scale``."""
        return (x - self._coef(self.shift, x)) * self._coef(self.scale, x)

    def from_model(self, z: _T) -> _T:
        """The model's latents (B, C, h, w) -> the VAE decoder's input: ``z / scale + shift``."""
        return z / self._coef(self.scale, z) + self._coef(self.shift, z)

    def to_json(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "shift": list(self.shift)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatentNorm:
        return cls(tuple(d["scale"]), tuple(d["shift"]))

    @classmethod
    def of_latents(cls, model: dict[str, Any]) -> LatentNorm:
        """The normalisation recorded in a latents group's model metadata. Caches written before
        it was recorded as one object carry the VAE's ``scaling_factor`` / ``shift_factor``."""
        if "latent_norm" in model:
            return cls.from_json(model["latent_norm"])
        shift = model.get("shift_factor")
        return cls((float(model["scaling_factor"]),), (0.0 if shift is None else float(shift),))

    def check_channels(self, channels: int) -> None:
        if self.channels is not None and self.channels != channels:
            raise ValueError(f"latent normalisation has {self.channels} channels, the latents {channels}")


@dataclass(frozen=True)
class ArraySpec:
    """One array of a group: per-sample shape after the (N, V) axes, dtype and codec."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str
    codec: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sample_shape": list(self.sample_shape), "dtype": self.dtype, "codec": self.codec}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArraySpec:
        return cls(d["name"], tuple(d["sample_shape"]), d["dtype"], d["codec"])


@dataclass(frozen=True)
class GroupMeta:
    """A feature group (latents or one teacher): what made it and how it is stored.

    ``model`` is the model description known before encoding (ids, revision, preprocessing,
    scaling factor, geometry); the hash of the weights actually used is in every shard record
    and in the commit record, since only the workers load the weights.
    """

    group: str
    kind: str
    model: dict[str, Any]
    arrays: tuple[ArraySpec, ...]
    fingerprint: dict[str, Any]
    feature_codec: dict[str, Any] | None = None  # None: stored as floats (cache.codec); absent from the JSON then

    @property
    def fingerprint_hash(self) -> str:
        return sha256_json(self.fingerprint)

    def array(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "kind": self.kind,
            "model": self.model,
            "arrays": [a.to_json() for a in self.arrays],
            "fingerprint": self.fingerprint,
        } | ({"feature_codec": self.feature_codec} if self.feature_codec is not None else {})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GroupMeta:
        return cls(d["group"], d["kind"], d["model"], tuple(ArraySpec.from_json(a) for a in d["arrays"]), d["fingerprint"],
                   d.get("feature_codec"))

    @functools.cached_property
    def codec(self) -> Int8Codec | None:
        """The group's feature codec, typed (None: stored as floats); :attr:`feature_codec` is its
        JSON as read, checked by :func:`group_problem` before a reader uses it."""
        return None if self.feature_codec is None else Int8Codec.from_json(self.feature_codec)

    @property
    def codec_name(self) -> str:
        """``float16`` for a group stored as floats (whatever its float dtype), else the codec's name."""
        return FLOAT16 if self.feature_codec is None else str(self.feature_codec["name"])


@dataclass(frozen=True)
class LatentsRecord:
    """What stage two reads of a latents group's model record: the latent grid and channels,
    and the normalisation into the model's space (the rest of the record describes the VAE)."""

    latent_size: int
    latent_channels: int
    norm: LatentNorm

    @classmethod
    def of(cls, gmeta: GroupMeta) -> LatentsRecord:
        m = gmeta.model
        return cls(int(m["latent_size"]), int(m["latent_channels"]), LatentNorm.of_latents(m))


@dataclass(frozen=True)
class TeacherRecord:
    """What stage two reads of a teacher group's model record: the registry name, the token
    width and the patch-token count (the rest describes preprocessing and geometry)."""

    name: str
    dim: int
    num_tokens: int

    @classmethod
    def of(cls, gmeta: GroupMeta) -> TeacherRecord:
        m = gmeta.model
        return cls(str(m["name"]), int(m["dim"]), int(m["num_tokens"]))


def with_feature_codec(gmeta: GroupMeta, codec: str) -> GroupMeta:
    """A teacher group's metadata stored with ``codec`` (see :mod:`cache.codec`).

    The result depends only on the group's model part, never on how ``gmeta`` itself is stored:
    ``float16`` gives exactly the metadata (and fingerprint) of a float16 group as ``repa
    precompute`` makes it, ``int8`` that group with int8 values, float32 per-token scales and the
    codec in its metadata and fingerprint. So a group precomputed as int8 and one transcoded to int8
    from a float16 or float32 cache have the same fingerprint.
    """
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown feature codec '{codec}' (known: {', '.join(FEATURE_CODECS)})")
    if gmeta.kind != "teacher":
        raise ValueError(f"group '{gmeta.group}' holds {gmeta.kind}; only teacher tokens have a feature codec")
    scales = {scale_name(a) for a in (gmeta.codec.arrays if gmeta.codec else ())}
    floats = tuple(ArraySpec(a.name, a.sample_shape, FLOAT16, a.codec) for a in gmeta.arrays if a.name not in scales)
    fingerprint = {k: v for k, v in gmeta.fingerprint.items() if k != "feature_codec"}
    if codec == FLOAT16:
        fingerprint["arrays"] = [a.to_json() for a in floats]
        return GroupMeta(gmeta.group, gmeta.kind, gmeta.model, floats, fingerprint)
    spec = Int8Codec(tuple(a.name for a in floats)).to_json()
    arrays: tuple[ArraySpec, ...] = ()
    for a in floats:
        arrays += (ArraySpec(a.name, a.sample_shape, "int8", a.codec),
                   ArraySpec(scale_name(a.name), scale_shape(a.sample_shape), SCALE_DTYPE, a.codec))
    fingerprint["arrays"] = [a.to_json() for a in arrays]
    fingerprint["feature_codec"] = spec
    assert codec == INT8
    return GroupMeta(gmeta.group, gmeta.kind, gmeta.model, arrays, fingerprint, spec)


@dataclass
class ShardRecord:
    """Written after one group's shard data is durable: proof that the shard is complete.

    ``outcomes`` lists, for each sample of the shard in cache order, ``[status, reason, width,
    height]``; ``checksums`` maps array name to the sha256 of the stored zarr shard object.
    ``chunks`` (arrays written by format v2) maps array name to its :class:`cache.chunks.ChunkTable`
    as JSON: the crc32c of the shard object's index and of each inner chunk, which readers compare
    with what they fetch (absent for an array whose shard has no object, and in v1 records).
    ``codec_check`` (quantised groups only) summarises the cosine of every stored token to the
    floats it was encoded from. ``input_sha256`` lists, in the same order, the sha256 of each input's encoded bytes as read for
    this shard (empty in records written before it existed): a task that encodes the shard for
    another group compares it with the bytes it reads, so groups never mix different pixels.
    """

    group: str
    shard: int
    start: int
    stop: int
    count: int
    checksums: dict[str, str]
    stored_bytes: dict[str, int]
    weights_sha256: str
    fingerprint_hash: str
    outcomes: list[list[Any]] = field(default_factory=list)
    input_sha256: list[str] = field(default_factory=list)
    codec_check: dict[str, Any] = field(default_factory=dict)  # quantised groups: cache.codec.cosine_check
    chunks: dict[str, dict[str, str]] = field(default_factory=dict)  # format v2: array -> ChunkTable.to_json()

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for optional in ("codec_check", "chunks"):  # absent where unused, as in records written before them
            if not d[optional]:
                del d[optional]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(**d)


def record_path(root: StorePath, group: str, shard: int) -> StorePath:
    return root / RECORDS_DIR / group / f"{shard:06d}.json"


def commit_path(root: StorePath, group: str) -> StorePath:
    return root / COMMITS_DIR / f"{group}.json"


#: Fingerprint fields that say which code wrote a cache rather than how its data was made: a v1
#: cache takes new groups and resumes under v2 code (each group is read the way it was written).
NOT_SETTINGS = frozenset({"format_version"})


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the settings that differ between two fingerprint dicts (the fields
    of :data:`NOT_SETTINGS` are not compared, at any depth)."""
    out: list[str] = []
    for key in sorted((set(old) | set(new)) - NOT_SETTINGS):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_diff(a, b, prefix=f"{name}."))
        elif canonical_json(a) != canonical_json(b):
            show_a, show_b = canonical_json(a), canonical_json(b)
            if len(show_a) > 40 or len(show_b) > 40:
                out.append(f"{name} (changed)")
            else:
                out.append(f"{name}: {show_a} -> {show_b}")
    return out
