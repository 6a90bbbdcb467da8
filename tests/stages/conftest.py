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


def run_with_memory_limit(code: str, limit_bytes: int, timeout: float = 120) -> str:
    """Run ``code`` in a fresh Python whose address space is capped at ``limit_bytes``
    (``RLIMIT_AS``: every allocation beyond it fails) and return its stdout. The caller proves a
    memory bound by asserting on that output: had the code needed more, it would have failed.

    Raises:
        AssertionError: the process exited non-zero (its stderr is in the message).
    """
    import resource
    import subprocess
    import sys

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], preexec_fn=cap, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
