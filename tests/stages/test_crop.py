"""center_crop_adm against the ADM / guided-diffusion crop written out independently."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from repa_cache.stages.images import center_crop_adm

from ..stages.conftest import random_rgb


def adm_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """``center_crop_arr`` of openai/guided-diffusion (also used by DiT, SiT and REPA)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize(
    ("width", "height", "resolution"),
    [
        (64, 64, 64),  # exact size
        (97, 64, 64),  # wide, odd crop offset
        (64, 131, 64),  # tall, odd crop offset
        (300, 700, 64),  # tall, two BOX halvings (700x300 -> 350x150 -> 175x75)
        (700, 300, 64),  # wide, two BOX halvings
        (129, 129, 64),  # square, one halving with odd sides
        (256, 255, 64),  # just below two halvings on one side
        (40, 25, 64),  # smaller than the resolution: bicubic upsampling
        (1000, 17, 32),  # extreme aspect ratio, upsampled short side
        (513, 389, 96),  # resolution not a power of two
    ],
)
def test_crop_matches_adm_reference(
    rng: np.random.Generator, width: int, height: int, resolution: int
) -> None:
    image = random_rgb(rng, width, height)
    out = center_crop_adm(image, resolution)
    expected = adm_reference(image, resolution)
    assert out.dtype == np.uint8
    assert out.shape == (resolution, resolution, 3)
    np.testing.assert_array_equal(out, expected)


def test_exact_size_is_identity(rng: np.random.Generator) -> None:
    image = random_rgb(rng, 48, 48)
    np.testing.assert_array_equal(center_crop_adm(image, 48), np.asarray(image))


def test_box_halving_is_not_skipped(rng: np.random.Generator) -> None:
    """A crop resized straight down with bicubic differs from the ADM result."""
    image = random_rgb(rng, 300, 260)
    direct = image.resize((74, 64), resample=Image.BICUBIC)
    direct_crop = np.asarray(direct)[:, 5:69]
    assert not np.array_equal(center_crop_adm(image, 64), direct_crop)


def test_center_is_taken(rng: np.random.Generator) -> None:
    """A wide image whose columns are labelled keeps its central columns."""
    columns = np.arange(96, dtype=np.uint8)
    array = np.broadcast_to(columns[None, :, None], (32, 96, 3)).copy()
    out = center_crop_adm(Image.fromarray(array), 32)
    np.testing.assert_array_equal(out[0, :, 0], columns[32:64])


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        center_crop_adm(Image.new("L", (32, 32)), 32)
