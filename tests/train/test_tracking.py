"""What a run records besides checkpoints: metrics rows with time and learning rate, TensorBoard
scalars, a Weights & Biases run (offline), and --sample-every grids that a resume reproduces."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repa_cache.eval.grid import train_run as train  # the loop with the --sample-every grid hook
from repa_cache.train.config import TrainConfig


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", batch_size=8, max_steps=4, ckpt_every=2, log_every=2, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sample_every_grids_are_identical_for_the_same_step_across_a_resume(tiny_cache, tmp_path):
    train(_cfg(tiny_cache, tmp_path / "a", sample_every=2))
    train(_cfg(tiny_cache, tmp_path / "b", sample_every=2, max_steps=2))
    train(_cfg(tiny_cache, tmp_path / "b", sample_every=2))
    a, b = tmp_path / "a" / "samples", tmp_path / "b" / "samples"
    assert sorted(p.name for p in a.iterdir()) == ["step-00000002.png", "step-00000004.png"]
    for name in ("step-00000002.png", "step-00000004.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "step-00000002.png").read_bytes() != (a / "step-00000004.png").read_bytes()  # the model moved
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["lr"] == 1e-4 for r in rows) and 0 < rows[0]["time"] < rows[1]["time"]


def test_tensorboard_and_wandb_offline_get_the_metrics_rows(tiny_cache, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "r"
    train(_cfg(tiny_cache, run, max_steps=2, log_every=1, tensorboard=True, wandb="repa-test", sample_every=2))
    rows = _rows(run)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # the --sample-every grid reaches both, pixel for pixel the PNG in RUN/samples
    grid = np.asarray(Image.open(run / "samples" / "step-00000002.png"))
    (tb_image,) = acc.Images("samples")
    assert tb_image.step == 2 and np.array_equal(np.asarray(Image.open(io.BytesIO(tb_image.encoded_image_string))), grid)
    run_id = (run / "wandb-id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    (wb_image,) = (offline[0] / "files" / "media" / "images").glob("samples_2_*.png")
    assert np.array_equal(np.asarray(Image.open(wb_image)), grid)
    # the run's record log holds every row's values as W&B's history items (JSON-encoded numbers)
    log = next(offline[0].glob("*.wandb")).read_bytes()
    assert all(json.dumps(r["loss"]).encode() in log and json.dumps(r["denoise"]).encode() in log for r in rows)


def test_sample_every_without_the_grid_hook_is_refused_before_the_run_is_written(tiny_cache, tmp_path):
    from repa_cache.cache.errors import UsageError
    from repa_cache.train.loop import train as bare_train

    with pytest.raises(UsageError, match="--sample-every needs the sample grid hook: use repa_cache.train_run"):
        bare_train(_cfg(tiny_cache, tmp_path / "r", sample_every=2))
    assert not (tmp_path / "r").exists()
