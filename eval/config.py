"""Typed settings of the evaluation jobs, with REPA's defaults: sampling, FID and alignment.

``repa sample``, ``repa fid`` and ``repa align`` take their option defaults from these classes,
so every default is written once, here. Values fixed by the checkpoint (model shape, interpolant,
teachers, latent normalisation, VAE) are not settings: they are read from its model card; so are
the sampling settings a job leaves unset (None), which are the method's
(:class:`~repa_cache.train.config.SamplingDefaults`, recorded in the card). This module imports no
torch, so the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import SamplingDefaults

#: Which weights of a checkpoint sampling and alignment use.
WEIGHTS: tuple[str, ...] = ("ema", "raw")


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHTS)}, not '{weights}'")


@dataclass(frozen=True)
class SampleConfig:
    """A sampling job (``repa sample``).

    The sampler settings (``cfg_scale``, ``guidance_interval``, ``sampler``, ``steps``, ``heun``,
    ``cls_cfg_scale``) left None are the ones the checkpoint's method is evaluated with (its model
    card's record, :meth:`resolve`; REPA's for a card without one).

    Attributes:
        num: number of samples (50 000 for FID). A rerun may raise it; samples already made are kept.
        cfg_scale: classifier-free guidance scale (1: none).
        guidance_interval: ``(low, high)`` within [0, 1]: guidance applies to steps starting at
            ``low <= t <= high``.
        sampler: ``"sde"`` (Euler–Maruyama, as REPA) or ``"ode"``.
        steps: model evaluations per sample.
        heun: Heun steps (ODE only).
        classes: class ids to cycle through; empty: a random class per sample from its seed.
        cls_cfg_scale: guidance scale of the CLS token a REG model denoises with the latent; unset,
            ``cfg_scale`` when that is set, else the method's. 0 takes the conditional CLS drift
            alone, as REG's sampler does. Models without extra state ignore it.
        bank: the memory bank a GMem model samples from (required for it, refused for others): a
            cache holding the CLS tokens of the run's first teacher, or a ``.npy`` written by
            ``repa gmem-bank``. Sample ``i`` is conditioned on the entry drawn from ``(seed, i)``.
        seed: job seed; sample ``i`` uses ``(seed, i)``.
        batch_size: samples per forward pass on each rank.
        vae: a local folder holding the checkpoint's VAE (it must have the same weights); default:
            the VAE named in the checkpoint.
        device: ``"auto"`` (cuda:LOCAL_RANK, else the CPU), ``"cpu"``, ``"cuda"``...
        precision: ``"auto"`` (bf16 autocast on CUDA), ``"bf16"`` or ``"fp32"`` for the model; the
            VAE decodes in fp32.
        grid: number of samples tiled into ``grid.png`` (0: no grid).
        weights: ``"ema"`` (the EMA weights, as REPA samples) or ``"raw"`` (the trained weights:
            after a short run the EMA at decay 0.9999 has barely moved from the initialisation).
        quiet: no progress bar.
    """

    num: int = 50_000
    cfg_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    sampler: str | None = None
    steps: int | None = None
    heun: bool | None = None
    classes: tuple[int, ...] = ()
    seed: int = 0
    cls_cfg_scale: float | None = None
    bank: str | None = None
    batch_size: int = 64
    vae: str | None = None
    device: str = "auto"
    precision: str = "auto"
    grid: int = 64
    weights: str = "ema"
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        check_weights(self.weights)

    def resolve(self, method: SamplingDefaults) -> SampleConfig:
        """This job with each unset sampler setting taken from ``method`` (the checkpoint's). An
        unset ``cls_cfg_scale`` follows ``cfg_scale`` when that is set (it stays None), else it is
        the method's."""
        fill = {k: getattr(method, k) for k in ("cfg_scale", "guidance_interval", "sampler", "steps", "heun")
                if getattr(self, k) is None}
        if self.cls_cfg_scale is None and self.cfg_scale is None:
            fill["cls_cfg_scale"] = method.cls_cfg_scale
        return dataclasses.replace(self, **fill)


@dataclass(frozen=True)
class AlignConfig:
    """An alignment measurement (``repa align``) on cached teacher features.

    Attributes:
        cache: the cache to read latents and teacher features from; default: the training cache
            named in the checkpoint. Its groups must be the ones the model was trained on.
        num: number of samples: the last ``num`` valid indices of the cache.
        t: the time of the noisy input, in (0, 1].
        k: nearest neighbours for CKNNA and mutual kNN.
        batch_size: samples per forward pass.
        seed: seed of the per-sample noise.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        precision: ``"auto"`` (bf16 autocast on CUDA), ``"bf16"`` or ``"fp32"``.
        weights: ``"ema"`` or ``"raw"`` (see :class:`SampleConfig`).
    """

    cache: str | None = None
    num: int = 1024
    t: float = 0.5
    k: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    weights: str = "ema"

    def __post_init__(self) -> None:
        check_weights(self.weights)


@dataclass(frozen=True)
class FidConfig:
    """An evaluation job (``repa evaluate``, also ``repa fid``): distances and scores of samples.

    The Inception network gives FID, IS, precision/recall and KID (each with the protocol of
    torch-fidelity and the ADM suite); a DINOv2 teacher gives FD-DINOv2.

    Attributes:
        sfid: also compute sFID (ADM's spatial FID; a second Inception pass over the samples).
        fd_dinov2: also compute FD-DINOv2.
        inception_score: also compute the Inception Score of the samples.
        precision_recall: also compute precision and recall (Kynkäänniemi et al. 2019) against the
            reference images.
        kid: also compute the Kernel Inception Distance against the reference images.
        is_splits: the samples are split into this many parts; IS is the mean over them.
        pr_k: the k of the k-nearest-neighbour balls of precision and recall.
        kid_subsets: number of random subsets KID averages over.
        kid_subset_size: images per KID subset (lowered to the smaller set's size if needed).
        max_ref_images: at most this many reference images (the first ones) give the reference
            features of precision/recall and KID, which are held in memory.
        seed: seed of the IS shuffle and of the KID subsets (torch-fidelity's default).
        inception_weights: local Inception weights file; default: torch-fidelity's download.
        dinov2_teacher: registry name of the FD-DINOv2 network.
        dinov2_checkpoint: local weights file for it.
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        stats_dir: where reference statistics and features are cached (default
            ``~/.cache/repa-cache/fid-stats``).
        quiet: no progress bars.
    """

    sfid: bool = True
    fd_dinov2: bool = False
    inception_score: bool = True
    precision_recall: bool = True
    kid: bool = True
    is_splits: int = 10
    pr_k: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    max_ref_images: int = 50_000
    seed: int = 2020
    inception_weights: str | None = None
    dinov2_teacher: str = "dinov2-vit-l"
    dinov2_checkpoint: str | None = None
    batch_size: int = 50
    device: str = "auto"
    stats_dir: str | None = None
    quiet: bool = False


@dataclass(frozen=True)
class DemoConfig:
    """``repa demo``: where it writes, how many images per class (4 classes), how long it trains."""

    out: str = "demo-out"
    per_class: int = 12
    train_steps: int = 200
    quiet: bool = False
