"""The built-in demo's images: a small labelled image folder drawn on the fly (the demo itself,
images to cache to run to samples, is :mod:`repa_cache.eval.demo`).

The images are procedurally drawn (one visual motif per class, random colours, sizes and aspect
ratios, JPEG and PNG), plus two deliberately bad inputs (a grayscale image that is converted and a
truncated JPEG that is skipped) so the demo shows the manifest's outcomes too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circles", "stripes", "checkers", "gradient")


def _draw(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    if kind == "circles":
        for _ in range(int(rng.integers(3, 9))):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, max(11, min(w, h) // 3)))
            d.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    elif kind == "stripes":
        step = int(rng.integers(8, 40))
        for x in range(0, w + h, 2 * step):
            d.polygon([(x, 0), (x + step, 0), (x + step - h, h), (x - h, h)], fill=fg)
    elif kind == "checkers":
        step = int(rng.integers(12, 48))
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=fg)
    else:
        t = np.linspace(0, 1, w)[None, :, None]
        arr = (1 - t) * np.array(bg) + t * np.array(fg)
        arr = np.broadcast_to(arr, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def make_demo_images(root: str | Path, per_class: int = 12, seed: int = 0, bad_inputs: bool = True) -> Path:
    """Write ``len(DEMO_CLASSES) * per_class`` images (plus two bad ones) under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in DEMO_CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(240, 560)), int(rng.integers(256, 560))
            img = _draw(kind, w, h, rng)
            if i % 2:
                img.save(root / kind / f"{kind}_{i:03d}.jpg", quality=92)
            else:
                img.save(root / kind / f"{kind}_{i:03d}.png")
    if bad_inputs:
        _draw("circles", 300, 260, rng).convert("L").save(root / "circles" / "grayscale_extra.png")
        buf = io.BytesIO()
        _draw("stripes", 320, 300, rng).save(buf, format="JPEG")
        (root / "stripes" / "truncated_extra.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return root

