"""decode_and_crop: one defined outcome for every kind of bad input, and never an exception."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from repa_cache.stages.images import DEFAULT_MAX_PIXELS, DecodeResult, center_crop_adm, decode_and_crop

from ..stages.conftest import encode, random_rgb

RES = 32


def check_skipped(result: DecodeResult, reason: str, width: int = 0, height: int = 0) -> None:
    assert (result.status, result.reason, result.width, result.height) == (
        "skipped",
        reason,
        width,
        height,
    )
    assert result.image is None


def check_image(result: DecodeResult) -> np.ndarray:
    assert result.image is not None
    assert result.image.dtype == np.uint8
    assert result.image.shape == (RES, RES, 3)
    return result.image


def test_default_max_pixels() -> None:
    assert DEFAULT_MAX_PIXELS == 2**28


def test_rgb_png_is_ok(rng: np.random.Generator) -> None:
    image = random_rgb(rng, 70, 45)
    result = decode_and_crop(encode(image, "PNG"), RES)
    assert (result.status, result.reason, result.width, result.height) == ("ok", "", 70, 45)
    np.testing.assert_array_equal(check_image(result), center_crop_adm(image, RES))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_rgb_lossy_formats_are_ok(rng: np.random.Generator, fmt: str) -> None:
    data = encode(random_rgb(rng, 40, 40), fmt)
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason, result.width, result.height) == ("ok", "", 40, 40)
    np.testing.assert_array_equal(
        check_image(result), center_crop_adm(Image.open(io.BytesIO(data)).convert("RGB"), RES)
    )


def test_zero_bytes() -> None:
    check_skipped(decode_and_crop(b"", RES), "empty file")


def test_text_file() -> None:
    check_skipped(decode_and_crop(b"n01440764 tench, Tinca tinca\n" * 4, RES), "not an image")


def test_truncated_jpeg(rng: np.random.Generator) -> None:
    data = encode(random_rgb(rng, 80, 64), "JPEG", quality=95)
    result = decode_and_crop(data[: len(data) // 2], RES)
    assert result.status == "skipped"
    assert result.image is None
    assert result.reason.startswith("corrupt or truncated image: image file is truncated")
    assert (result.width, result.height) == (80, 64)  # the header was intact


def test_truncated_png(rng: np.random.Generator) -> None:
    data = encode(random_rgb(rng, 80, 64), "PNG")
    result = decode_and_crop(data[: len(data) // 2], RES)
    assert result.status == "skipped"
    assert result.reason.startswith("corrupt or truncated image: ")
    assert (result.width, result.height) == (80, 64)


def test_truncation_is_not_padded_globally() -> None:
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_grayscale(rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, (RES, RES), dtype=np.uint8)
    result = decode_and_crop(encode(Image.fromarray(gray, "L"), "PNG"), RES)
    assert (result.status, result.reason) == ("converted", "mode L converted to RGB")
    out = check_image(result)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (RES, RES), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason) == ("converted", "mode CMYK converted to RGB")
    out = check_image(result).astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 3


def test_rgba_transparent_pixels_become_white() -> None:
    array = np.zeros((RES, RES, 4), dtype=np.uint8)
    array[:, : RES // 2] = (0, 0, 0, 0)  # fully transparent black
    array[:, RES // 2 :] = (10, 20, 30, 255)  # opaque
    array[0, -1] = (0, 0, 0, 128)  # half transparent black
    result = decode_and_crop(encode(Image.fromarray(array, "RGBA"), "PNG"), RES)
    assert (result.status, result.reason) == ("converted", "mode RGBA converted to RGB")
    out = check_image(result)
    assert (out[:, : RES // 2] == 255).all()
    assert (out[1:, RES // 2 :] == np.array([10, 20, 30], dtype=np.uint8)).all()
    assert np.abs(out[0, -1].astype(int) - 127).max() <= 1  # 255 * (1 - 128/255)


def test_la_over_white() -> None:
    array = np.zeros((RES, RES, 2), dtype=np.uint8)
    array[..., 0] = 40
    array[: RES // 2, :, 1] = 255
    result = decode_and_crop(encode(Image.fromarray(array, "LA"), "PNG"), RES)
    assert (result.status, result.reason) == ("converted", "mode LA converted to RGB")
    out = check_image(result)
    assert (out[: RES // 2] == 40).all()
    assert (out[RES // 2 :] == 255).all()


def test_palette_png() -> None:
    image = Image.new("P", (RES, RES), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    result = decode_and_crop(encode(image, "PNG"), RES)
    assert (result.status, result.reason) == ("converted", "mode P converted to RGB")
    assert (check_image(result) == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_palette_png_with_transparency_becomes_white() -> None:
    image = Image.new("P", (RES, RES), 0)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, RES // 2, RES))
    data = encode(image, "PNG", transparency=0)
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason) == ("converted", "mode P converted to RGB")
    out = check_image(result)
    assert (out[:, : RES // 2] == np.array([200, 100, 50], dtype=np.uint8)).all()
    assert (out[:, RES // 2 :] == 255).all()


def test_16bit_png_is_scaled_not_clipped() -> None:
    values = np.full((RES, RES), 257 * 100, dtype=np.uint16)  # 100 in 8 bits
    values[0, 0] = 65535
    values[0, 1] = 0
    values[0, 2] = 1000  # would be 255 when clipped, 4 when scaled
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason) == ("converted", "mode I;16 converted to RGB")
    out = check_image(result)
    assert out[5, 5].tolist() == [100, 100, 100]
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [4, 4, 4]


def test_32bit_integer_tiff_is_scaled() -> None:
    values = np.full((RES, RES), 257 * 60, dtype=np.int32)
    data = encode(Image.fromarray(values, "I"), "TIFF")
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason) == ("converted", "mode I converted to RGB")
    assert (check_image(result) == 60).all()


def test_32bit_integer_tiff_outside_16bit_range_is_stretched() -> None:
    values = np.zeros((RES, RES), dtype=np.int32)
    values[:, RES // 2 :] = 1_000_000
    result = decode_and_crop(encode(Image.fromarray(values, "I"), "TIFF"), RES)
    assert result.status == "converted"
    out = check_image(result)
    assert (out[:, : RES // 2] == 0).all()
    assert (out[:, RES // 2 :] == 255).all()


def test_float_tiff_in_unit_range() -> None:
    values = np.full((RES, RES), 0.5, dtype=np.float32)
    result = decode_and_crop(encode(Image.fromarray(values, "F"), "TIFF"), RES)
    assert (result.status, result.reason) == ("converted", "mode F converted to RGB")
    assert (check_image(result) == 128).all()


@pytest.mark.parametrize("mode", ["1", "YCbCr", "PA", "I;16B", "LA", "CMYK"])
def test_other_modes_are_converted(mode: str) -> None:
    data = encode(Image.new(mode, (RES, RES)), "TIFF")
    opened_mode = Image.open(io.BytesIO(data)).mode
    result = decode_and_crop(data, RES)
    assert (result.status, result.reason) == ("converted", f"mode {opened_mode} converted to RGB")
    check_image(result)


def test_small_image_is_upscaled(rng: np.random.Generator) -> None:
    result = decode_and_crop(encode(random_rgb(rng, 20, 10), "PNG"), RES)
    assert (result.status, result.reason, result.width, result.height) == (
        "converted",
        "upscaled from 20x10",
        20,
        10,
    )
    check_image(result)


def test_reasons_are_joined(rng: np.random.Generator) -> None:
    gray = Image.fromarray(rng.integers(0, 256, (10, 20), dtype=np.uint8), "L")
    result = decode_and_crop(encode(gray, "PNG"), RES)
    assert (result.status, result.reason) == (
        "converted",
        "mode L converted to RGB; upscaled from 20x10",
    )


def test_too_large_from_header(rng: np.random.Generator) -> None:
    data = encode(random_rgb(rng, 100, 80), "PNG")
    check_skipped(decode_and_crop(data, RES, max_pixels=7999), "too large: 100x80 pixels", 100, 80)
    assert decode_and_crop(data, RES, max_pixels=8000).status == "ok"


def test_too_large_is_decided_before_decoding(rng: np.random.Generator) -> None:
    """Only the header is needed: a truncated body still reports its size as too large."""
    data = encode(random_rgb(rng, 100, 80), "PNG")
    result = decode_and_crop(data[: len(data) // 3], RES, max_pixels=100)
    check_skipped(result, "too large: 100x80 pixels", 100, 80)


def test_pil_bomb_limit_does_not_preempt(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode(random_rgb(rng, 100, 80), "PNG")  # 8000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would raise at > 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        result = decode_and_crop(data, RES)
        limited = decode_and_crop(data, RES, max_pixels=5000)
    check_skipped(limited, "too large: 100x80 pixels", 100, 80)
    assert result.status == "ok"
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


def test_exif_orientation_is_ignored(rng: np.random.Generator) -> None:
    image = random_rgb(rng, 64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    plain = decode_and_crop(encode(image, "JPEG", quality=90), 16)
    rotated = decode_and_crop(encode(image, "JPEG", quality=90, exif=exif), 16)
    assert (rotated.status, rotated.width, rotated.height) == ("ok", 64, 32)
    assert plain.image is not None and rotated.image is not None
    np.testing.assert_array_equal(rotated.image, plain.image)


def test_corrupt_png_body(rng: np.random.Generator) -> None:
    data = bytearray(encode(random_rgb(rng, 40, 40), "PNG", compress_level=1))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = bytes(40)
    result = decode_and_crop(bytes(data), RES)
    assert result.status == "skipped"
    assert result.reason.startswith("corrupt or truncated image: ")
    assert (result.width, result.height) == (40, 40)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt EXIF
def test_never_raises_on_garbage(rng: np.random.Generator) -> None:
    samples = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (1, 7, 100, 3000)]
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"):
        data = encode(random_rgb(rng, 50, 30), fmt)
        cuts = (1, 8, 16, 40, len(data) // 4, len(data) // 2, len(data) - 1)
        samples += [data[:cut] for cut in cuts]
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), 20):
            flipped[pos] ^= 0xFF
        samples.append(bytes(flipped))
    for sample in samples:
        result = decode_and_crop(sample, RES)
        assert result.status in ("ok", "converted", "skipped")
        if result.status == "skipped":
            assert result.image is None and result.reason
        else:
            check_image(result)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        decode_and_crop(b"x", 0)


def test_pixel_limit_is_restored_after_concurrent_decodes(rng: np.random.Generator) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = encode(random_rgb(rng, 60, 40), "JPEG")
    before = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda _: decode_and_crop(data, RES).status, range(64)))
    assert statuses == ["ok"] * 64
    assert before == Image.MAX_IMAGE_PIXELS


# A 1x100000 PNG is ~470 bytes; the ADM resize would make it 256x25600000 (19.5 GB of RGB).
_THIN_PNG_CODE = """
import io, json
from PIL import Image
from repa_cache.stages.images import decode_and_crop
buf = io.BytesIO()
Image.new("RGB", (1, 100000), (200, 10, 10)).save(buf, format="PNG")
res = decode_and_crop(buf.getvalue(), 256)
print(json.dumps([len(buf.getvalue()), res.status, res.reason, res.width, res.height, res.image is None]))
"""


def test_extreme_aspect_ratio_is_skipped_from_the_header_under_1_gib() -> None:
    """Memory bound: the whole decode runs in a process capped at 1 GiB of address space."""
    import json

    from ..stages.conftest import run_with_memory_limit

    size, status, reason, width, height, no_image = json.loads(run_with_memory_limit(_THIN_PNG_CODE, 1 << 30))
    assert size < 1000
    assert (status, width, height, no_image) == ("skipped", 1, 100000, True)
    assert reason == "extreme aspect ratio: 1x100000 would be resized to 256x25600000 pixels"


def test_resized_pixel_limit_is_exact(rng: np.random.Generator) -> None:
    from repa_cache.stages.images import DEFAULT_MAX_RESIZED_PIXELS, adm_resize_size

    assert DEFAULT_MAX_RESIZED_PIXELS == 2**26
    assert adm_resize_size(1, 100000, 256) == (256, 25600000)
    assert adm_resize_size(600, 300, 64) == (128, 64)  # halved twice to 150x75, then bicubic to 128x64
    data = encode(random_rgb(rng, 40, 10), "PNG")  # resized to 64x16 = 1024 pixels at 16 px
    assert decode_and_crop(data, 16, max_resized_pixels=1024).status == "converted"  # upscaled
    res = decode_and_crop(data, 16, max_resized_pixels=1023)
    assert (res.status, res.reason, res.image) == ("skipped", "extreme aspect ratio: 40x10 would be resized to 64x16 pixels", None)
    with pytest.raises(ValueError, match="max_resized_pixels must be positive"):
        decode_and_crop(data, 16, max_resized_pixels=0)
