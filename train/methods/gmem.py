"""``--method gmem``: GMem, generative modelling with an external memory (arXiv 2412.08781,
github.com/LINs-lab/GMem).

The student is conditioned on the teacher's CLS token of the same image instead of its class:

* the condition is the first ``--teacher``'s CLS token of the view the latent comes from,
  L2-normalised, and enters the adaLN condition through ``Linear(Z, D)`` in place of the label
  table: ``c = t_embed(t) + W normalize(cls) + b``;
* for classifier-free guidance a whole condition is replaced by the null condition, the zero
  vector (so the unconditional embedding is the bias ``b``), with probability ``cond_dropout``
  (0.4) per sample; the public code drops elements of the condition instead (docs/methods.md);
* REPA's alignment is trained as usual: ``L_v + 0.5 * REPA`` on the patch tokens.

Sampling draws each sample's condition from a memory bank: the normalised CLS tokens of every
view of a cache (the first teacher of the run) or a bank file written by ``repa gmem-bank``. The
bank entry of sample ``i`` comes from the seed ``(seed, i)`` (see
:func:`repa_cache.eval.samplers.bank_choices`), so it depends neither on the batch size nor on the
rank; guidance's unconditional branch uses the null condition.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa_cache.cache.codec import dequantize, scale_name
from repa_cache.cache.errors import RepaError, UsageError
from repa_cache.cache.format import TEACHER_PREFIX, TeacherRecord, teacher_group
from repa_cache.cache.storage import npy_problem, read_npy_header
from repa_cache.train.methods.base import Method, MethodOptions, StepBatch
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.schedule import WARMUP
from repa_cache.train.transport import Draws, Transport

#: the largest bank file read (entries x dim x itemsize), far above ImageNet's 2 x 1.28M x 1024 float32
MAX_BANK_BYTES = 64 * 2**30


@dataclass
class GMemOptions(MethodOptions):
    proj_coeff: float = 0.5
    cond_dropout: float = 0.4  # probability that a sample's condition is the null condition (zeros)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise UsageError(f"gmem cond_dropout must be in [0, 1], got {self.cond_dropout}")


def normalize_cls(cls: Tensor) -> Tensor:
    """CLS tokens (..., Z) -> float32 unit vectors (an all-zero token stays zero)."""
    return F.normalize(cls.float(), p=2, dim=-1)


class GMemSiT(SiT):
    """SiT conditioned on a vector: ``forward(x, t, c)`` with c (B, Z) a normalised CLS token or the
    null condition (zeros). The label table is replaced by ``cond_embedder = Linear(Z, D)``
    (xavier weights, zero bias, as the public code initialises it), so no parameter goes unused."""

    def __init__(self, config: SiTConfig, cond_dim: int) -> None:
        super().__init__(config)
        del self.y_embedder  # the label table: a GMem student has no classes
        self.cond_embedder = nn.Linear(cond_dim, config.hidden_size)
        nn.init.xavier_uniform_(self.cond_embedder.weight)
        nn.init.zeros_(self.cond_embedder.bias)

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """The adaLN condition (B, D) of times t (B,) and condition vectors y (B, Z)."""
        if y.ndim != 2 or not y.is_floating_point():
            raise ValueError(f"the GMem student is conditioned on (B, Z) float vectors (Method.condition), got {y.dtype} "
                             f"{tuple(y.shape)}")
        return self.t_embedder(t) + self.cond_embedder(y.to(self.cond_embedder.weight.dtype))


class Gmem(Method[GMemOptions]):
    name = "gmem"
    summary = ("GMem: conditioned on the first teacher's normalised CLS token (Linear, null condition at rate 0.4) "
               "instead of the class, REPA on top; samples from a memory bank (repa sample --bank)")
    source = ("arXiv 2412.08781; github.com/LINs-lab/GMem (models/lightningdit.py, models/feature_embedder.py, "
              "engine/train.py, engine/evaluation.py, transport/transport.py)")
    Options = GMemOptions
    sampling_source = "GMem's SiT script scripts/sample-gmem-xl.sh, guidance off; the interval is REPA's"

    def teacher_fields(self, align: bool = True) -> tuple[str, ...]:
        return ("cls", "patch") if align else ("cls",)

    def check_cache(self, arrays: dict[str, Sequence[str]]) -> None:
        first = next(iter(arrays), None)
        if first is not None and "cls" not in arrays[first]:
            raise UsageError(f"--method gmem needs the CLS token of teacher '{first}', which the cache does not hold")
        super().check_cache(arrays)

    def build_student(self, config: SiTConfig) -> SiT:
        return GMemSiT(config, cond_dim=config.z_dims[0])

    def draw(self, transport: Transport, batch: StepBatch, phase: str) -> Draws:
        """Times, latent noise, then one dropout coin per sample (the warm-up: the coins alone),
        from the global RNG in that order; ``Draws.y_used`` is the (B, Z) condition after dropout.
        The transport's label dropout does not apply."""
        c = self.condition(batch)
        if phase == WARMUP:
            t = torch.zeros(batch.x.shape[0], device=batch.x.device)  # (B,) clean inputs
            return Draws(t, None, self.drop_condition(c), [])
        t = transport.sample_t(batch.x.shape[0], batch.x.device)  # (B,)
        noise = torch.randn_like(batch.x)  # (B, C, H, W)
        return Draws(t, noise, self.drop_condition(c), [])

    def drop_condition(self, c: Tensor) -> Tensor:
        """Replace each row of c (B, Z) by the null condition (zeros) with probability ``cond_dropout``."""
        p = self.options.cond_dropout
        if p <= 0:
            return c
        drop = torch.rand(c.shape[0], device=c.device) < p  # (B,)
        return torch.where(drop.unsqueeze(1), torch.zeros_like(c), c)

    def condition(self, batch: StepBatch) -> Tensor:
        """The normalised CLS token (B, Z) of the first teacher."""
        if not batch.cls:
            raise ValueError("--method gmem needs the CLS tokens in the batch")
        return normalize_cls(batch.cls[0])

    def null_condition(self, y: Tensor, null_class: int) -> Tensor:
        return torch.zeros_like(y)

    def samples_from_bank(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------
# the memory bank


class MemoryBank:
    """Conditions to sample from: ``size`` normalised CLS tokens of dimension ``dim``, read on demand.

    Entry ``k`` of a cache bank is view ``k % V`` of the ``k // V``-th valid cache index (V stored
    views); entry ``k`` of a bank file is its row ``k``."""

    size: int
    dim: int
    source: str

    def entries(self, ks: Sequence[int]) -> Tensor:
        """Normalised float32 conditions (len(ks), Z) of entries ``ks``."""
        rows = self._rows(np.asarray(ks, dtype=np.int64))
        if not np.isfinite(rows).all():
            raise UsageError(f"--bank {self.source} holds non-finite values")
        return normalize_cls(torch.from_numpy(np.ascontiguousarray(rows)))

    def _rows(self, ks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CacheBank(MemoryBank):
    """The CLS tokens of every stored view of a cache's teacher group, read only where drawn."""

    def __init__(self, cache: str | Path, teacher: str) -> None:
        from repa_cache.cache.open import open_reader

        group = teacher_group(teacher)
        try:
            self.reader = open_reader(cache, groups=[group])
        except RepaError as e:
            raise UsageError(f"--bank {cache}: {e}") from None
        if "cls" not in self.reader.array_names(group):
            raise UsageError(f"--bank {cache}: teacher '{teacher}' has no CLS tokens in this cache")
        self.group, self.teacher, self.source = group, teacher, str(cache)
        self.valid = self.reader.valid_indices()
        self.views = len(self.reader.views)
        self.size = int(self.valid.size) * self.views
        self.dim = TeacherRecord.of(self.reader.group(group).meta).dim
        self.codec = self.reader.feature_codec(group)
        if self.size == 0:
            raise UsageError(f"--bank {cache} holds no samples")

    @property
    def weights_sha256(self) -> str | None:
        """The teacher's weights hash recorded by the cache."""
        return self.reader.group(self.group).commit.get("weights_sha256")

    def _cls(self, data: dict[str, np.ndarray]) -> Tensor:
        """The CLS tokens of a raw read (as stored), dequantised to float32 as the trainer does."""
        q = torch.from_numpy(data[f"{self.group}/cls"])  # (..., Z) as stored
        scale = data.get(f"{self.group}/{scale_name('cls')}")
        return dequantize(q, torch.from_numpy(scale) if scale is not None else q, self.codec)

    def _rows(self, ks: np.ndarray) -> np.ndarray:
        idx, view = self.valid[ks // self.views], ks % self.views
        data = self.reader.read_views(idx, view, fields=[f"{self.group}/cls"], raw=True)
        return self._cls(data).numpy()  # (n, Z)

    def block(self, start: int, stop: int) -> Tensor:
        """Normalised entries of valid samples ``[start, stop)`` (positions in the valid order), all views."""
        cls = self._cls(self.reader.read(self.valid[start:stop], fields=[f"{self.group}/cls"], raw=True))  # (n, V, Z)
        return normalize_cls(cls.reshape(-1, cls.shape[-1]))  # (n * V, Z), entry k = position * V + view


class NpyBank(MemoryBank):
    """A bank file: a float (N, Z) ``.npy`` array, memory-mapped. The header is checked against the
    file's size before any data is read; pickled objects are never loaded."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.source = str(path)
        bad = f"--bank {path} is not a bank (a float32 (N, Z) .npy from repa gmem-bank)"
        try:
            with open(path, "rb") as f:
                shape, _fortran, dtype = read_npy_header(f)
                offset = f.tell()
            size = path.stat().st_size
        except OSError as e:
            raise UsageError(f"--bank {path}: {e.strerror or e}") from None
        except (ValueError, SyntaxError, TypeError, EOFError):
            raise UsageError(bad) from None
        if dtype.kind != "f" or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise UsageError(f"{bad}; it holds {dtype} {shape}")
        problem = npy_problem(shape, dtype, offset, size, MAX_BANK_BYTES)
        if problem:
            raise UsageError(f"{bad}; {problem}")
        self.array = np.load(path, mmap_mode="r", allow_pickle=False)  # (N, Z)
        self.size, self.dim = int(shape[0]), int(shape[1])

    def _rows(self, ks: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[ks], dtype=np.float32)


def open_bank(source: str | Path, teacher: str, dim: int, weights_sha256: str | None = None) -> MemoryBank:
    """The memory bank at ``source`` for a model conditioned on ``teacher``'s CLS token of size
    ``dim``: a cache (its ``teacher`` group) or a ``.npy`` bank file.

    Raises:
        UsageError: no such bank, an unreadable or hostile file, another dimension, or a cache whose
            teacher has other weights (``weights_sha256``) than the one the model was trained with.
    """
    path = Path(source)
    bank: MemoryBank
    if path.is_file():
        bank = NpyBank(path)
    elif path.is_dir() or "://" in str(source):
        bank = CacheBank(source, teacher)
        theirs = bank.weights_sha256 if isinstance(bank, CacheBank) else None
        if weights_sha256 and theirs and theirs != weights_sha256:
            raise UsageError(f"--bank {source}: teacher '{teacher}' there has other weights than the one the model was "
                             "trained with")
    else:
        raise UsageError(f"--bank {source}: no such cache or bank file")
    if bank.dim != dim:
        raise UsageError(f"--bank {source} holds {bank.dim}-dimensional tokens, the model is conditioned on {dim}")
    return bank


def export_bank(cache: str | Path, out: str | Path, teacher: str | None = None, block: int = 4096) -> tuple[Path, int, int]:
    """Write the bank of a cache (the normalised CLS tokens of every valid sample and view of one
    teacher) to ``out`` as a float32 (N * V, Z) ``.npy``; it appears whole or not at all.
    ``teacher`` may be omitted when the cache has one. Returns ``(out, entries, dim)``."""
    from repa_cache.cache.open import open_reader

    out = Path(out)
    if teacher is None:
        try:
            groups = [g for g in open_reader(cache).groups if g.startswith(TEACHER_PREFIX)]
        except RepaError as e:
            raise UsageError(f"{cache}: {e}") from None
        if len(groups) != 1:
            have = ", ".join(g[len(TEACHER_PREFIX):] for g in groups) or "none"
            raise UsageError(f"the cache has teachers: {have}; choose with --teacher")
        teacher = groups[0][len(TEACHER_PREFIX):]
    if out.suffix != ".npy":
        raise UsageError(f"the bank file must end in .npy, got {out}")
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; remove it or choose another path")
    bank = CacheBank(cache, teacher)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)  # ours alone
    os.close(fd)
    tmp = Path(name)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(bank.size, bank.dim))
        n = int(bank.valid.size)
        for start in range(0, n, block):
            stop = min(n, start + block)
            arr[start * bank.views:stop * bank.views] = bank.block(start, stop).numpy()
        arr.flush()
        del arr
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, bank.size, bank.dim
