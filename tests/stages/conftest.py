"""Fixtures for the stage-one tests: generated images and a Hugging Face hub that stays offline."""

from __future__ import annotations

import io
import os

# Set before anything imports huggingface_hub, which reads the flag once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every hub lookup fail at once instead of trying the network."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode a PIL image to bytes in the given format."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_rgb(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A noisy RGB image (noise makes resampling differences visible)."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
