"""How well a student's hidden states agree with its teacher's features.

The trainer logs these every ``--align-every`` steps and ``repa align`` (:mod:`repa_cache.eval.align`)
reports them for a checkpoint; both call :func:`alignment_metrics`. Two measures:

* **mean cosine**: the REPA objective itself, ``cos(h_proj, y)`` per token between the student's
  projected tokens and the cached teacher patch tokens, averaged over tokens and samples;
* **CKNNA** (Huh et al. 2024, "The Platonic Representation Hypothesis"; used in the REPA
  paper's analysis): centred kernel alignment restricted to mutual k-nearest neighbours. Each
  sample is one vector: the student's hidden state after block ``encoder_depth`` (before the
  projector, as in REPA's analysis) and, for comparison, the projected tokens, each mean-pooled
  over tokens, against the teacher's mean-pooled patch tokens. Vectors are L2-normalised, so the
  kernels are cosine similarities. ``mutual_knn`` (the fraction of shared k-nearest neighbours)
  is reported too.

The student sees ``x_t`` at one fixed time ``t`` (0.5 by default) made from the cached posterior
mean of the original view and noise seeded per sample ``(seed, cache index)``, with the true
labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LATENTS, LatentNorm, teacher_group
from repa_cache.cache.open import open_reader
from repa_cache.cache.reader import ReaderBase
from repa_cache.stages.devices import autocast
from repa_cache.train.loss import resample_tokens
from repa_cache.train.methods import Method, StepBatch, make_method
from repa_cache.train.model import SiT
from repa_cache.train.noise import SampleNoise
from repa_cache.train.transport import path_coefficients

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the measures


def _knn_mask(sim: Tensor, k: int) -> Tensor:
    """(n, n) 0/1 mask of each row's k most similar other rows (self excluded)."""
    sim = sim.clone()
    sim.fill_diagonal_(float("-inf"))
    idx = sim.topk(k, dim=1).indices  # (n, k)
    return torch.zeros_like(sim).scatter_(1, idx, 1.0)


def _hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) kernels, diagonals ignored."""
    n = K.shape[0]
    K = K.clone().fill_diagonal_(0.0)
    L = L.clone().fill_diagonal_(0.0)
    trace_kl = (K * L.T).sum()  # tr(K L)
    sums = K.sum() * L.sum() / ((n - 1) * (n - 2))  # (1'K1)(1'L1) / ((n-1)(n-2))
    cross = 2.0 * (K.sum(dim=0) * L.sum(dim=1)).sum() / (n - 2)  # 2 * 1'KL1 / (n-2)
    return (trace_kl + sums - cross) / (n * (n - 3))


def _cosine_kernel(feats: Tensor) -> Tensor:
    """(n, n) cosine similarities of n samples, in float64."""
    f = F.normalize(feats.double().flatten(1), dim=1)  # (n, D)
    return f @ f.T  # (n, n)


def _check_pair(a: Tensor, b: Tensor, k: int) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two representations have {a.shape[0]} and {b.shape[0]} samples")
    if a.shape[0] < 4:
        raise UsageError(f"CKNNA needs at least 4 samples, got {a.shape[0]}")
    if not 1 <= k < a.shape[0] - 1:
        raise UsageError(f"k={k} nearest neighbours need k >= 1 and more than k+1 samples (have {a.shape[0]})")


def cknna(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> float:
    """CKNNA between two representations of the same n samples, (n, Da) and (n, Db).

    With cosine kernels K and L and the masks M_K, M_L of each row's k nearest neighbours,
    ``CKNNA = HSIC(M∘K, M∘L) / sqrt(HSIC(M_K∘K, M_K∘K) HSIC(M_L∘L, M_L∘L))`` with
    ``M = M_K∘M_L`` (the mutual neighbours) and the unbiased HSIC estimator. 1 for identical
    representations (also under rotation and scaling), about 0 for unrelated ones.
    """
    _check_pair(feats_a, feats_b, k)
    K, L = _cosine_kernel(feats_a), _cosine_kernel(feats_b)
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    mutual = mask_k * mask_l
    kl = _hsic_unbiased(mutual * K, mutual * L)
    kk = _hsic_unbiased(mask_k * K, mask_k * K)
    ll = _hsic_unbiased(mask_l * L, mask_l * L)
    denom = torch.sqrt(kk * ll)
    return float(kl / denom) if float(denom) > 0 else 0.0


def mutual_knn(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> float:
    """Mean fraction of each sample's k nearest neighbours shared by the two representations."""
    _check_pair(feats_a, feats_b, k)
    shared = _knn_mask(_cosine_kernel(feats_a), k) * _knn_mask(_cosine_kernel(feats_b), k)
    return float(shared.sum(dim=1).mean() / k)


# --------------------------------------------------------------------------------------------
# on a model and a cache


def _view0(data: dict[str, np.ndarray], key: str, device: torch.device) -> Tensor:
    """View 0 of a read array, as float32 on the device."""
    return torch.from_numpy(np.ascontiguousarray(data[key][:, 0])).to(device).float()


@torch.no_grad()
def alignment_metrics(
    model: SiT,
    cache: str | Path | ReaderBase,
    teachers: Sequence[str],
    *,
    num: int = 512,
    t: float = 0.5,
    k: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    path: str = "linear",
    resample: bool = False,
    precision: str = "fp32",
    norm: LatentNorm | None = None,
    method: Method | None = None,
) -> dict[str, float]:
    """Alignment of ``model`` with its teachers on the last ``num`` valid samples of ``cache``.

    Pass the bare model (or its EMA copy), not the DDP or compiled wrapper; it runs on the model's
    device under ``no_grad`` and its train/eval mode is restored afterwards.

    Args:
        model: the student.
        cache: a cache (or its webdataset export), as a path or an open reader.
        teachers: teacher names in the order of the model's projectors.
        num: number of samples: the last ``num`` valid indices of the cache.
        t: the time of the noisy input, in (0, 1].
        k: nearest neighbours for CKNNA and mutual kNN.
        batch_size: samples per forward pass.
        seed: seed of the per-sample noise.
        path: the interpolant the model was trained with.
        resample: resample teacher tokens to the student's grid when their counts differ.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 autocast on CUDA).
        norm: the model's latent normalisation; default: the one the cache records.
        method: the training method (its student inputs and alignment targets); default REPA.
            Extra state (REG's CLS token) is noised to time t with a second per-sample draw.

    Returns:
        ``{"align/cos/<teacher>", "align/cknna/<teacher>", "align/cknna_proj/<teacher>",
        "align/mutual_knn/<teacher>"}`` for each teacher, plus ``"align/num"`` and ``"align/t"``.
    """
    if not 0.0 < t <= 1.0:
        raise UsageError(f"--t must be in (0, 1], got {t}")
    if num <= 0 or batch_size <= 0:
        raise UsageError("--num and --batch-size must be positive")
    if len(teachers) != len(model.projectors):
        raise UsageError(f"{len(teachers)} teachers named for a model with {len(model.projectors)} projectors")
    method = method if method is not None else make_method("repa")
    groups = [LATENTS] + [teacher_group(n) for n in teachers]
    used = [f for f in method.teacher_fields(True) if f in ("patch", "cls")]  # not HASTE's hidden tokens: no teacher runs here
    fields = [f"{LATENTS}/mean"] + [f"{g}/{f}" for g in groups[1:] for f in used]
    reader = cache if isinstance(cache, ReaderBase) else open_reader(cache, groups=groups)
    indices = reader.valid_indices()[-num:]
    if len(indices) < num:
        logger.warning("the cache has %d valid samples; measuring on all of them, not %d", len(indices), num)
    if norm is None:
        norm = LatentNorm.of_latents(reader.group(LATENTS).meta.model)
    mcfg = model.config
    device = next(model.parameters()).device

    captured: list[Tensor] = []
    hook = model.blocks[mcfg.encoder_depth - 1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    hidden: list[Tensor] = []
    proj: list[list[Tensor]] = [[] for _ in teachers]
    target: list[list[Tensor]] = [[] for _ in teachers]
    cos_sum = [0.0 for _ in teachers]
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            data = reader.read(idx, fields=fields)
            mean = torch.from_numpy(np.ascontiguousarray(data["latents/mean"][:, 0])).to(device)  # (B, C, h, w) view 0
            x0 = norm.to_model(mean)
            noise = SampleNoise(seed, idx.tolist(), device)
            eps = noise.randn(tuple(x0.shape[1:])).float()  # (B, C, h, w)
            tt = torch.full((len(idx),), float(t), device=device)
            alpha, sigma, _, _ = path_coefficients(path, tt)  # (B,) each
            x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
            y = torch.from_numpy(data["label"]).to(device)
            batch = StepBatch(x0, y, [_view0(data, f"{teacher_group(n)}/patch", device) for n in teachers],
                              [_view0(data, f"{teacher_group(n)}/cls", device) for n in teachers if "cls" in method.teacher_fields(True)])
            for j, (name, feats) in enumerate(zip(teachers, batch.patch)):
                if feats.shape[1] != mcfg.num_tokens:
                    if not resample:
                        raise UsageError(f"teacher '{name}' has {feats.shape[1]} tokens, the model {mcfg.num_tokens}; "
                                         "the run was trained without --resample-teacher")
                    batch.patch[j] = resample_tokens(feats, mcfg.grid)  # (B, T, Z)
            extras = [alpha.view(-1, 1) * e + sigma.view(-1, 1) * noise.randn(tuple(e.shape[1:])).float() for e in method.extras(batch)]
            captured.clear()
            with autocast(device, precision):
                zs = model(x_t, tt, method.condition(batch), *extras)[1]  # the class, or GMem's condition
            hidden.append(captured[-1].float().mean(dim=1).cpu())  # (B, T, D) -> (B, D) pooled hidden state
            for j, (aim, feats) in enumerate(zip(method.targets(batch).tokens, batch.patch)):
                z = zs[j].float()  # (B, T, Z), aligned to the method's target ``aim`` of the same shape
                cos_sum[j] += float(F.cosine_similarity(z, aim, dim=-1).mean(dim=1).sum())
                proj[j].append(z.mean(dim=1).cpu())  # (B, Z)
                target[j].append(feats.mean(dim=1).cpu())  # (B, Z): the teacher's own patch tokens, pooled
    finally:
        hook.remove()
        model.train(was_training)

    n = len(indices)
    h = torch.cat(hidden)  # (n, D)
    out: dict[str, float] = {"align/num": float(n), "align/t": float(t)}
    for j, name in enumerate(teachers):
        y_pool = torch.cat(target[j])  # (n, Z)
        out[f"align/cos/{name}"] = cos_sum[j] / n
        out[f"align/cknna/{name}"] = cknna(h, y_pool, k)
        out[f"align/cknna_proj/{name}"] = cknna(torch.cat(proj[j]), y_pool, k)
        out[f"align/mutual_knn/{name}"] = mutual_knn(h, y_pool, k)
    return out
