"""Feature codecs: how a teacher group's tokens are stored, and how they are turned back into floats.

Teacher tokens only reach the loss through a cosine similarity after L2 normalisation, so they do
not need 16 bits per value. Two codecs exist:

* ``float16`` (the default): the tokens as they always were stored (the group's float dtype). A
  group stored this way carries no codec metadata at all, so its metadata and fingerprint are
  byte for byte those of a cache written before codecs existed.
* ``int8``: per token, the absolute maximum ``m`` (float32) and one signed byte per value,
  ``q = round(127 * sign(x) * sqrt(|x| / m))``, decoded as ``x' = q * |q| * m / 127²``. The square
  root companding spends the 255 levels where the values are: plain linear absmax quantisation
  (``q = round(127 x / m)``) has a step of ``m / 127`` everywhere, so one channel 30x larger than
  the rest, or a heavy tail (DINOv2's final-norm tokens have both), makes the step too coarse for
  all other channels and the cosine drops below 0.999. With companding the rounding error of a
  value is at most about ``sqrt(|x| m) / 127`` (half a step, step ``2 sqrt(|x| m) / 127``), so the
  squared error of a token is at most ``m ||x||_1 / (4 * 127²)`` <= ``sqrt(D) ||x||² / 64516``
  (``m <= ||x||``, ``||x||_1 <= sqrt(D) ||x||``): ``1 - cos <= sqrt(D) / 129032``, 2.1e-4 for
  D = 768 and 2.5e-4 for D = 1024, whatever the distribution. Measured values are far better
  (docs/benchmarks.md). Stored: ``<array>`` int8 ``(..., D)`` and ``<array>_scale`` float32
  ``(..., 1)`` (float32 rather than float16: the scale does not change a cosine, but a float16
  scale would overflow above 65504).

The value -128 is never written; it is the int8 arrays' fill value, so a chunk that was never
written (a lost chunk, or a skipped input's row) can be told from data, as NaN does for floats.

A quantised group's metadata carries ``feature_codec`` (name, version, parameters, which arrays),
which is also part of its fingerprint. A reader that does not know the codec or its version
refuses the group (:func:`codec_problem`).

The read side decodes with :func:`decode_numpy` (the reader hands out float16 tokens by default, as
a float16 group has them);
a trainer can instead take the stored arrays (``read_views(..., raw=True)``), move the int8 values
and scales to the GPU (a quarter of the float32 bytes, half of float16's) and decode there with
:func:`dequantize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

FLOAT16 = "float16"
INT8 = "int8"
#: Codecs ``--feature-codec`` accepts, the default first.
FEATURE_CODECS = (FLOAT16, INT8)
INT8_VERSION = 1
LEVELS = 127  # largest stored magnitude; -128 is the fill value
MISSING_INT8 = -128
SCALE_SUFFIX = "_scale"
SCALE_DTYPE = "float32"

# Bins of ``1 - cos`` for the write-time check: 10^-9 .. 10^0 in tenths of a decade.
_CHECK_EDGES = 10.0 ** (np.arange(-90, 1) / 10.0)


@dataclass(frozen=True)
class Int8Codec:
    """The ``int8`` codec of a group: which arrays it stores quantised and its companding power
    (0.5: square root; 1.0 would be plain linear absmax, kept for measurements only). Its JSON
    (:meth:`to_json`) is what a group's metadata and fingerprint record."""

    arrays: tuple[str, ...] = ("patch", "cls")
    power: float = 0.5
    name: ClassVar[str] = INT8

    def to_json(self) -> dict[str, Any]:
        return {"name": INT8, "version": INT8_VERSION, "levels": LEVELS, "power": self.power, "scale_dtype": SCALE_DTYPE,
                "arrays": list(self.arrays)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Int8Codec:
        """The codec a group's metadata records (checked first by :func:`codec_problem`)."""
        return cls(tuple(d["arrays"]), float(d["power"]))


def scale_name(array: str) -> str:
    """Name of the per-token scale array stored beside a quantised array."""
    return f"{array}{SCALE_SUFFIX}"


def scale_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape of the scales of an array of ``sample_shape``: one per token, kept as a
    trailing axis of 1 so that ``q * scale`` broadcasts."""
    return (*sample_shape[:-1], 1)


def codec_problem(codec: Any, arrays: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """What a reader of this version cannot accept in a group's ``feature_codec``, or None.

    ``arrays`` maps each array of the group to its ``(sample_shape, dtype)``.
    """
    if codec is None:
        return None
    if not isinstance(codec, dict):
        return f"feature codec {codec!r} is not a JSON object"
    name = codec.get("name")
    if name != INT8:
        return f"unknown feature codec {name!r} (this version reads {', '.join(FEATURE_CODECS)}); upgrade repa-cache"
    if codec.get("version") != INT8_VERSION:
        return f"feature codec int8 version {codec.get('version')!r} (this version reads {INT8_VERSION}); upgrade repa-cache"
    power, levels = codec.get("power"), codec.get("levels")
    if not isinstance(power, (int, float)) or isinstance(power, bool) or not 0.1 <= power <= 1.0:
        return f"feature codec int8 has power {power!r} (expected a number in [0.1, 1])"
    if levels != LEVELS or codec.get("scale_dtype") != SCALE_DTYPE:
        return f"feature codec int8 has levels {levels!r} and scale dtype {codec.get('scale_dtype')!r} ({LEVELS}, {SCALE_DTYPE} expected)"
    names = codec.get("arrays")
    if not isinstance(names, list) or not names:
        return "feature codec int8 names no arrays"
    for a in names:
        if not isinstance(a, str) or a not in arrays:
            return f"feature codec int8 names array {a!r}, which the group does not have"
        shape, dtype = arrays[a]
        if dtype != "int8":
            return f"array '{a}' is {dtype}, the int8 codec stores int8"
        s = arrays.get(scale_name(a))
        if s is None or s != (scale_shape(shape), SCALE_DTYPE):
            return f"array '{scale_name(a)}' is {s!r}, the int8 codec needs {(scale_shape(shape), SCALE_DTYPE)!r}"
    return None


def stored_arrays(codec: Int8Codec | None, names: list[str]) -> list[str]:
    """The stored arrays a read of ``names`` needs: each quantised array with its scales."""
    quantised = set(codec.arrays) if codec else set()
    out: list[str] = []
    for n in names:
        out += [n, scale_name(n)] if n in quantised else [n]
    return list(dict.fromkeys(out))


# -- encode ----------------------------------------------------------------------------------------
def encode_int8(x: np.ndarray, codec: Int8Codec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Quantise tokens ``x`` (..., D) to ``(q int8 (..., D), scale float32 (..., 1))``.

    All-zero tokens store scale 0 and decode to zeros; a constant token decodes exactly (every
    value is its maximum).

    Raises:
        ValueError: ``x`` holds NaN or infinity (``where`` names the shard).
    """
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(f"{where}: non-finite teacher feature {x[tuple(bad)]} at position {tuple(int(i) for i in bad)}; "
                         "refusing to quantise it")
    scale = np.abs(x).max(axis=-1, keepdims=True)  # (..., 1)
    u = np.divide(np.abs(x), scale, out=np.zeros_like(x), where=scale > 0)  # (..., D) in [0, 1]
    power = codec.power
    if power != 1.0:
        u = np.sqrt(u) if power == 0.5 else u**power
    q = np.rint(u * LEVELS) * np.sign(x)
    return q.astype(np.int8), scale.astype(np.float32)


_BYTES = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)
_SQUARE_LUT = _BYTES * np.abs(_BYTES) / np.float32(LEVELS * LEVELS)  # int8 byte -> q |q| / 127², float32


def decode_numpy(q: Any, scale: Any, codec: Int8Codec) -> Any:
    """Float32 tokens (..., D) from stored ``q`` (..., D) and ``scale`` (..., 1). Plain array
    arithmetic, so a dask array decodes lazily too."""
    power = codec.power
    if power == 0.5 and isinstance(q, np.ndarray):  # one table lookup per value, then the scale in place
        out = _SQUARE_LUT[q.view(np.uint8)]
        out *= scale
        return out
    qf = q.astype(np.float32)
    if power == 0.5:
        return qf * abs(qf) / np.float32(LEVELS * LEVELS) * scale.astype(np.float32)  # 127 * 127 / 16129 == 1: maxima exact
    mag = (abs(qf) / np.float32(LEVELS)) ** np.float32(1.0 / power)
    return np.sign(qf) * mag * scale.astype(np.float32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, codec: Int8Codec | None) -> torch.Tensor:
    """Float32 tokens (..., D) from stored int8 ``q`` (..., D) and float32 ``scale`` (..., 1), on
    whatever device they are (decode on the GPU after copying the stored bytes). With
    ``codec=None`` (a float16 group) ``q`` is the tokens themselves and ``scale`` is ignored."""
    if codec is None:
        return q.float()
    qf = q.float()
    s = scale.float()
    power = codec.power
    if power == 0.5:
        return qf * qf.abs() / float(LEVELS * LEVELS) * s  # (..., D), the same arithmetic as decode_numpy
    return qf.sign() * (qf.abs() / LEVELS) ** (1.0 / power) * s


# -- the write-time check --------------------------------------------------------------------------
def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each token pair (..., D) -> (...), in float64; two all-zero tokens count as 1."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(axis=-1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / (na * nb))
    return np.nan_to_num(cos, nan=0.0)


def cosine_check(cos: np.ndarray) -> dict[str, Any]:
    """What a shard record keeps of the cosines of its tokens: count, sum, min and a histogram of
    ``1 - cos`` (tenths of a decade from 1e-9), which :func:`merge_checks` combines over shards."""
    c = np.asarray(cos, dtype=np.float64).reshape(-1)
    if not c.size:
        return {"tokens": 0, "sum": 0.0, "min": 1.0, "hist": []}
    err = np.clip(1.0 - c, _CHECK_EDGES[0], _CHECK_EDGES[-1])
    hist, _ = np.histogram(err, bins=_CHECK_EDGES)
    return {"tokens": int(c.size), "sum": float(c.sum()), "min": float(c.min()), "hist": hist.tolist()}


def merge_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The cosine record of a whole group from its shards' checks: ``tokens``, ``min``, ``mean``
    and ``q001`` (the 0.1 % quantile, rounded down to its histogram bin, so never optimistic)."""
    checks = [c for c in checks if c and c.get("tokens")]
    n = sum(int(c["tokens"]) for c in checks)
    if not n:
        return {"tokens": 0}
    hist = np.zeros(len(_CHECK_EDGES) - 1, dtype=np.int64)
    for c in checks:
        h = np.asarray(c["hist"], dtype=np.int64)
        if h.shape == hist.shape:
            hist += h
    # 1 - cos ascending: the 0.1 % lowest cosines are the top 0.1 % of the histogram.
    k = max(1, math.ceil(0.001 * n))
    above = np.cumsum(hist[::-1])
    b = len(hist) - 1 - int(np.searchsorted(above, k))
    q001 = 1.0 - float(_CHECK_EDGES[min(len(_CHECK_EDGES) - 1, max(0, b) + 1)])
    return {
        "tokens": n,
        "min": min(float(c["min"]) for c in checks),
        "q001": q001,
        "mean": sum(float(c["sum"]) for c in checks) / n,
    }


__all__ = [
    "FEATURE_CODECS",
    "FLOAT16",
    "INT8",
    "MISSING_INT8",
    "Int8Codec",
    "codec_problem",
    "cosine_check",
    "decode_numpy",
    "dequantize",
    "encode_int8",
    "merge_checks",
    "scale_name",
    "stored_arrays",
    "token_cosine",
]
