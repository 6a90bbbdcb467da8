"""Checkpoints: one owner of the format, no code runs on load, damaged files get one line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.train import checkpoint as ck
from repa_cache.train.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    ModelCard,
    checkpoint_path,
    ema_path,
    latest_checkpoint,
    load_checkpoint,
    load_latest_training,
    resolve_checkpoint,
    save_checkpoint,
)


def _card() -> ModelCard:
    return ModelCard(model={"depth": 1}, teachers=("t",), latent_norm={"scale": [0.5], "shift": [0.0]},
                     vae={"id": "tiny", "revision": None, "tiny": True, "weights_sha256": "ab"}, class_names=("a", "b"),
                     method={"name": "repa", "options": {}}, train={"cache": "/c"}, cache={"groups": {}})


def _save(run: Path, step: int, keep: int = 2) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(step))
    ema = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run, step, model, ema, opt, _card(), keep=keep)
    return model


def test_round_trip_names_and_pruning(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / ck.CKPT_DIR).iterdir() if p.suffix == ".pt") == [
        "ema-step-00000001.pt", "ema-step-00000002.pt", "ema-step-00000003.pt", "step-00000002.pt", "step-00000003.pt"]
    assert sorted(p.name for p in (tmp_path / ck.CKPT_DIR).iterdir() if p.suffix == ".sha256") == [
        f"{n}.sha256" for n in ("ema-step-00000001.pt", "ema-step-00000002.pt", "ema-step-00000003.pt", "step-00000002.pt", "step-00000003.pt")]
    got = load_checkpoint(checkpoint_path(tmp_path, 3))
    assert got.kind == "train" and got.step == 3 and got.card == _card()
    assert torch.equal(got.model["weight"], torch.full((2, 3), 3.0))
    assert resolve_checkpoint(tmp_path) == ema_path(tmp_path, 3)  # at equal steps the small EMA file
    ema_only = load_checkpoint(ema_path(tmp_path, 3))
    assert ema_only.kind == "ema" and ema_only.model is None and ema_only.card.teachers == ("t",)
    with pytest.raises(UsageError, match="is a 'ema' checkpoint; expected 'train'"):
        load_checkpoint(ema_path(tmp_path, 3), kinds=("train",))


def test_a_planted_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = checkpoint_path(tmp_path, 5)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "version": FORMAT_VERSION, "x": Payload()}, f)
    ck.checksum_path(path).write_text(json.dumps(ck._file_digest(path)))  # even with a valid record
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(e.value).startswith(f"{path} is not a readable checkpoint of this tool (") and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no checkpoint of .* can be read"):
        load_latest_training(tmp_path)  # the run's only checkpoint: nothing to fall back to
    assert not marker.exists()


def test_unknown_version_is_refused_in_one_line(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": FORMAT, "version": 99, "kind": "ema", "step": 1, "card": _card().to_json(), "ema": {}}, path)
    with pytest.raises(UsageError, match=r"^\S*x\.pt has checkpoint format version 99; this version reads version 2$"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "unfinished"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, caplog, damage):
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    newest = checkpoint_path(tmp_path, 8)
    raw = bytearray(newest.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one bit of tensor data: torch.load alone would not notice
    elif damage == "empty":
        raw = bytearray()
    if damage == "unfinished":  # killed after the file, before its checksum record
        ck.checksum_path(newest).unlink()
    else:
        newest.write_bytes(bytes(raw))
    reason = {"truncate": "bytes, .* were written", "flip": "fails its checksum", "empty": "0 bytes", "unfinished": "has no checksum record"}
    with caplog.at_level("WARNING"):
        got = load_latest_training(tmp_path)
    assert got is not None and got.step == 4
    assert any(re.search(reason[damage], r.message) and str(newest) in r.message and "falling back to step-00000004.pt" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    with pytest.raises(UsageError, match=reason[damage]):
        load_checkpoint(newest, checksum_required=True)


def test_a_full_disk_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 4)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 1000)  # part of the data made it, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 8)
    monkeypatch.setattr(torch, "save", real_save)
    names = sorted(p.name for p in (tmp_path / ck.CKPT_DIR).iterdir())
    assert names == ["ema-step-00000004.pt", "ema-step-00000004.pt.sha256", "step-00000004.pt",
                     "step-00000004.pt.sha256"]  # no step-8, no .tmp left behind
    assert load_latest_training(tmp_path).step == 4
