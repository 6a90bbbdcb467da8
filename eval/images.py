"""Image files of evaluation: PNGs, ADM-layout ``.npz`` batches (``arr_0`` uint8 N×H×W×3, optional
``arr_1`` labels) read without loading them whole, and labelled grids."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from repa_cache.cache.errors import RepaError, UsageError
from repa_cache.cache.storage import atomic_file, npy_problem, read_npy_header


def write_png(path: Path, image: np.ndarray) -> None:
    """Write one uint8 (H, W, 3) image; it appears whole or not at all."""
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def png_name(index: int) -> str:
    """File name of sample ``index``: ``000123.png`` (6 digits at least, more past a million)."""
    return f"{index:06d}.png"


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write an ADM-readable npz: ``arr_0`` uint8 (N, H, W, 3) (plus ``arr_1`` labels), atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    with atomic_file(path) as f:
        if labels is None:
            np.savez(f, arr_0=images)
        else:
            np.savez(f, arr_0=images, arr_1=np.asarray(labels, np.int64))
    return path


def assemble_npz(images_dir: Path, num: int, out: Path, labels: np.ndarray | None = None) -> Path:
    """Build the npz from PNGs ``0 .. num-1`` without holding them all in memory (a memmap)."""
    paths = [images_dir / png_name(i) for i in range(num)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RepaError(f"{len(missing)} of {num} samples are missing (first: {missing[0]}); "
                        "run the same command again to finish them")
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    tmp_npy = out.with_name(f".{out.stem}.arr_0.npy")
    arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(num, *first.shape))
    try:
        for i, p in enumerate(paths):
            img = np.asarray(Image.open(p).convert("RGB"))
            if img.shape != first.shape:
                raise RepaError(f"{p} is {img.shape[1]}x{img.shape[0]}, the others {first.shape[1]}x{first.shape[0]}")
            arr[i] = img
        arr.flush()
        save_npz(out, arr, labels)
    finally:
        del arr
        tmp_npy.unlink(missing_ok=True)
    return out


#: pixels of a grid's title line and of the label strip under each tile
LABEL_HEIGHT = 12


def make_grid(images: np.ndarray, pad: int = 2, labels: Sequence[str] | None = None, title: str | None = None) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one near-square (rows x cols) image with white gaps.

    With ``labels`` each tile gets its label in a strip below it, and with ``title`` the grid a
    header line; the tiles' pixels are never drawn over."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    strip = LABEL_HEIGHT if labels is not None else 0
    top = LABEL_HEIGHT + pad if title else 0
    cell_h = h + strip + pad
    grid = np.full((top + rows * cell_h + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        y, x = top + pad + r * cell_h, pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    font = ImageFont.load_default()
    if title:
        header = Image.fromarray(grid[:top])
        ImageDraw.Draw(header).text((pad, pad), title, fill=(0, 0, 0), font=font)
        grid[:top] = np.asarray(header)
    for k, label in enumerate(labels or ()):  # each label drawn in its own strip: a long one is cut at the tile's edge
        r, col = divmod(k, cols)
        y, x = top + pad + r * cell_h + h, pad + col * (w + pad)
        cell = Image.new("RGB", (w, strip), (255, 255, 255))
        ImageDraw.Draw(cell).text((0, 0), str(label), fill=(0, 0, 0), font=font)
        grid[y:y + strip, x:x + w] = np.asarray(cell)
    return grid


#: Most bytes one npz array may hold (the 50K-sample ADM batch at 512 px is 39 GB).
MAX_NPZ_ARRAY_BYTES = 2**40
#: Largest image side evaluation reads from an npz (a batch is read whole: its size is bounded).
MAX_IMAGE_SIDE = 4096


def npz_array_info(path: Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an npz, read from its header only.

    Raises:
        UsageError: the header does not fit the member (:func:`cache.storage.npy_problem`: Python
            objects, or a size the member's bytes do not back), or the array is in Fortran order
            (it could not be read a batch of rows at a time).
    """
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = read_npy_header(f)
        problem = npy_problem(shape, dtype, f.tell(), zf.getinfo(f"{key}.npy").file_size, MAX_NPZ_ARRAY_BYTES)
    if problem is None and fortran and len(shape) > 1:
        problem = "it is stored in Fortran order; save it C-ordered (np.ascontiguousarray)"
    if problem:
        raise UsageError(f"{path}: '{key}' cannot be read: {problem}")
    return shape, dtype


def iter_npz_batches(path: Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Rows of one npz array in batches, streamed from the zip member (never all in memory); the
    header is checked first (:func:`npz_array_info`)."""
    shape, dtype = npz_array_info(path, key)
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        read_npy_header(f)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise UsageError(f"{path}: '{key}' ends early (row {start + len(buf) // max(row, 1)} of {shape[0]})")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(n, *shape[1:])  # writable


# --------------------------------------------------------------------------------------------
# the sampling job
