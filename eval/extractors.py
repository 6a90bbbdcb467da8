"""The feature networks of ``repa evaluate``: torch-fidelity's port of the ADM suite's TF
Inception-v3 (pool3 features and logits for FID, IS, precision/recall and KID; ``mixed_6/conv``
for sFID) and the CLS token of a DINOv2 teacher (FD-DINOv2). Any callable ``uint8 (B, 3, H, W) ->
(B, D)`` with a ``name`` can stand in for them (tests use small ones)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import FidConfig

logger = logging.getLogger(__name__)

DEFAULT_DINOV2 = FidConfig.dinov2_teacher
INCEPTION_NAME = "inception-v3-compat-pool3"
#: sFID's features: ADM's ``mixed_6/conv`` (the 1x1 branch of Mixed_6d), first 7 of its 192
#: channels on the 17x17 map, flattened channels-last as ADM's evaluator does: 2023 dims
SPATIAL_NAME = "inception-v3-compat-mixed6-conv-7ch"
#: the statistics an ADM reference batch stores for each Inception feature
ADM_STATS = {INCEPTION_NAME: ("mu", "sigma"), SPATIAL_NAME: ("mu_s", "sigma_s")}
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")


class FeatureExtractor(Protocol):
    """Maps uint8 images (B, 3, H, W) to float features (B, D); ``name`` keys cached statistics."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class ClassifierExtractor(FeatureExtractor, Protocol):
    """An extractor that is also a classifier: the Inception Score needs its logits."""

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (features (B, D), logits (B, C)) from one forward pass."""
        ...


class InceptionExtractor:
    """torch-fidelity's port of the TF Inception-v3 of the ADM suite: pool3 features (2048-d) and
    the 1008 logits without bias (``logits_unbiased``, what torch-fidelity's IS uses)."""

    name = INCEPTION_NAME

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net, self.device = net.to(device), device
        self.last_spatial: torch.Tensor | None = None  # sFID's features of the last batch
        branch = net.get_submodule("Mixed_6d.branch1x1")  # ADM's mixed_6/conv
        branch.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # ADM takes mixed_6/conv:0 (after its ReLU) as NHWC, keeps channels [:7] and flattens
        self.last_spatial = output[:, :7].permute(0, 2, 3, 1).reshape(len(output), -1).clone()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(images.to(self.device))  # resizes to 299 itself, like TF
        return features, logits  # (B, 2048), (B, 1008)

    def spatial(self) -> SpatialExtractor:
        """The sFID extractor on this network."""
        return SpatialExtractor(self)


class SpatialExtractor:
    """sFID's features (:data:`SPATIAL_NAME`, 2023-d) from an :class:`InceptionExtractor`'s network."""

    name = SPATIAL_NAME

    def __init__(self, inception: InceptionExtractor) -> None:
        self.inception = inception

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.inception.features_and_logits(images)
        assert self.inception.last_spatial is not None
        return self.inception.last_spatial  # (B, 7 * 17 * 17)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def inception_extractor(weights: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionExtractor:
    """The FID Inception network, from a local weights file or torch-fidelity's own download.

    Raises:
        UsageError: torch-fidelity is not installed, the file is missing, or the weights cannot be
            fetched (no network) — with what to do about it.
    """
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"no Inception weights file at {weights}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UsageError("FID needs torch-fidelity, which is not installed: pip install 'repa-cache[eval]'") from None
    if weights is not None:
        try:  # torch-fidelity unpickles the file freely: admit only a plain state dict
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{weights} is not a plain weights file (state dict of tensors): {_first_line(e)}") from e
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as e:  # offline download, unreadable file: one message
        raise UsageError(
            f"cannot load the FID Inception weights ({_first_line(e)}); without network, fetch {INCEPTION_WEIGHTS_URL} "
            "elsewhere and pass it with --inception-weights FILE") from e
    return InceptionExtractor(net, torch.device(device))


class DinoV2Extractor:
    """CLS token of a registry teacher (DINOv2 ViT-L/14 by default), built for the image size."""

    def __init__(self, teacher: str = DEFAULT_DINOV2, device: torch.device | str = "cpu",
                 checkpoint: str | None = None) -> None:
        from repa_cache.stages.teachers import get_teacher

        self.spec = get_teacher(teacher)
        self.device, self.checkpoint = torch.device(device), checkpoint
        self.name = f"{teacher}-cls"
        self._models: dict[int, torch.nn.Module] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from repa_cache.stages.teachers import encode_images, load_teacher

        h, w = images.shape[-2:]
        if h != w:
            raise UsageError(f"FD-DINOv2 needs square images, got {w}x{h}")
        if h not in self._models:
            self._models[h] = load_teacher(self.spec, h, self.device, pretrained=True, checkpoint=self.checkpoint,
                                           checkpoint_option="--dinov2-checkpoint FILE")
        _, cls = encode_images(self._models[h], self.spec, images, h)
        return cls  # (B, D)


def dinov2_extractor(teacher: str = DEFAULT_DINOV2, device: torch.device | str = "cpu",
                     checkpoint: str | None = None) -> DinoV2Extractor:
    """FD-DINOv2 features: the CLS token of a registry teacher (weights loaded on first use)."""
    return DinoV2Extractor(teacher, device, checkpoint)
