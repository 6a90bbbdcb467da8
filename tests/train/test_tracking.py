"""What a run records besides checkpoints: metrics rows with time and learning rate, TensorBoard
scalars, a Weights & Biases run (offline), and --sample-every grids that a resume reproduces."""

from __future__ import annotations

import io
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repa_cache.eval.grid import train_run as train  # the loop with the --sample-every grid hook
from repa_cache.train.config import TrainConfig
from repa_cache.train.tracking import Trackers


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
    # read as soon as train returns: the run's record holds every row, value for value, as W&B's history
    history = _wandb_history(next(offline[0].glob("*.wandb")))
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [1, 2]
    for h, r in zip(history, rows):
        assert {k: h[k] for k in r if k != "step"} == {k: v for k, v in r.items() if k != "step"}


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run record (``run-*.wandb``): a 7-byte file header, then
    LevelDB-log blocks of 32 KiB holding protobuf ``Record``s, each in one FULL fragment or in
    FIRST, MIDDLE..., LAST fragments, each fragment behind a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts, rows = 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record.FromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item})
    assert pos == len(data) and not parts, "the record ends in the middle of a record"
    return rows


def test_closing_the_trackers_waits_for_wandbs_service(tmp_path, monkeypatch):
    """W&B writes a run's last records after finish() returns, in its service process; closing the
    trackers shuts that down (which waits for its files), unless another W&B run still uses it."""
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.run = None
    fake.init = lambda **kw: calls.append("init") or Run()
    fake.teardown = lambda: calls.append("teardown")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trackers = Trackers(tmp_path, {}, wandb_project="p")
    trackers.log({"loss": 1.0}, 1)
    trackers.close()
    assert calls == ["init", ("log", 1), "finish", "teardown"]
    calls.clear()
    fake.run = Run()  # the caller's own W&B run is still active: its service stays
    trackers = Trackers(tmp_path, {}, wandb_project="p")
    trackers.close()
    trackers.close()  # twice: nothing more
    assert calls == ["init", "finish"]


def test_sample_every_without_the_grid_hook_is_refused_before_the_run_is_written(tiny_cache, tmp_path):
    from repa_cache.cache.errors import UsageError
    from repa_cache.train.loop import train as bare_train

    with pytest.raises(UsageError, match="--sample-every needs the sample grid hook: use repa_cache.train_run"):
        bare_train(_cfg(tiny_cache, tmp_path / "r", sample_every=2))
    assert not (tmp_path / "r").exists()
