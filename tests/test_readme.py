"""The README's commands run as written: its real-data walk-through, in order, through the installed
``repa`` in a clean environment, with each real model, path and size replaced by an offline
stand-in. Every replacement must apply, so a changed README line cannot slip past this test."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .conftest import HUNG
from .test_first_hour import REPA, clean_env

ROOT = Path(__file__).resolve().parents[1]

#: (text in the README, its offline stand-in). Paths become folders of the test; the real models,
#: the tiny presets; sizes and step counts, a few; the CPU is named where a command would pick CUDA.
STAND_INS = [
    ("/data/imagenet/train", "{images}"),
    ("/caches/in1k-256", "{cache}"),
    ("--vae stabilityai/sd-vae-ft-ema", "--vae tiny"),
    ("--teacher dinov2-vit-b", "--teacher tiny"),
    ("--teacher clip-vit-l", "--teacher tiny-reg"),
    ("--resolution 256", "--resolution 64 --device cpu --workers 1"),
    ("--model SiT-XL/2", "--model SiT-tiny/2 --workers 0 --device cpu"),
    ("--encoder-depth 8", "--encoder-depth 1"),
    ("--batch-size 256 --max-steps 4000000", "--batch-size 4 --max-steps 2"),
    ("--align-schedule stop:250000", "--align-schedule stop:1 --batch-size 4 --max-steps 2"),
    ("--num 50000", "--num 4 --steps 2 --batch-size 4 --device cpu"),
    ("VIRTUAL_imagenet256_labeled.npz --fd-dinov2", "{ref} --no-fd-dinov2 --inception-weights {inception} --is-splits 2 --device cpu"),
    ("repa align --ckpt runs/sit-xl2-repa", "repa align --ckpt runs/sit-xl2-repa --num 8 --k 2 --device cpu"),
]


def readme_walkthrough() -> str:
    """The first bash block after the README's "Using it on real data" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it on real data"):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S)[1]  # type: ignore[index]


def offline(block: str, **paths: str) -> list[list[str]]:
    """The block's commands with every stand-in applied, as argument lists (comments dropped,
    continued lines joined)."""
    for real, stand_in in STAND_INS:
        assert real in block, f"the README no longer has {real!r}: update STAND_INS"
        block = block.replace(real, stand_in.format(**paths))
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        args = shlex.split(line, comments=True)
        if args:
            commands.append(args)
    return commands


@pytest.mark.slow
def test_the_readme_walkthrough_runs_in_order(tmp_path, monkeypatch):
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import torch

    from repa_cache.eval.images import save_npz
    from repa_cache.pipeline.demo import make_demo_images

    images = make_demo_images(tmp_path / "images", per_class=2, bad_inputs=False)
    rng = np.random.default_rng(0)
    ref = save_npz(tmp_path / "ref.npz", rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    with monkeypatch.context() as m:  # random Inception weights of the right shapes (the real ones are a download)
        m.setattr(tfe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.save(tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "inception.pth")

    commands = offline(readme_walkthrough(), images=str(images), cache=str(tmp_path / "cache"), ref=str(ref),
                       inception=str(tmp_path / "inception.pth"))
    assert [c[:2] for c in commands] == [["repa", "precompute"], ["repa", "stats"], ["repa", "verify"], ["repa", "precompute"],
                                          ["repa", "precompute"], ["repa", "train"], ["repa", "train"], ["repa", "sample"],
                                          ["repa", "evaluate"], ["repa", "align"]]
    for args in commands:
        res = subprocess.run([str(REPA), *args[1:]], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True,
                             timeout=HUNG)
        assert res.returncode == 0, f"{shlex.join(args)}\n{res.stderr[-3000:]}"
    assert (tmp_path / "in1k.png").is_file()
    assert sorted(p.name for p in (tmp_path / "samples" / "xl" / "images").iterdir()) == [f"00000{i}.png" for i in range(4)]
