"""``repa train --init-from``: a new run starts from another checkpoint's weights (fine-tuning, or a
run imported from REPA's code) with a fresh optimiser, step and data order."""

from __future__ import annotations

from pathlib import Path

import pytest

from repa_cache.cache.errors import UsageError
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import train


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", batch_size=8, max_steps=3, ckpt_every=3, log_every=3, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def test_a_new_run_starts_from_the_given_weights(tiny_cache, tmp_path):
    train(_cfg(tiny_cache, tmp_path / "a"))
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    res = train(_cfg(tiny_cache, tmp_path / "b", max_steps=1, ckpt_every=1, init_from=str(tmp_path / "a")))
    assert res.step == 1 and res.resumed_from is None
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    # one AdamW step moves no weight by more than the learning rate (1e-4): B is A plus one step
    moved = max((b.model[k] - v).abs().max().item() for k, v in a.model.items())
    assert 0 < moved <= 1e-4 * (1 + 1e-3)
    assert max((b.ema[k] - v).abs().max().item() for k, v in a.ema.items()) <= 1e-4
    # a fresh run of the same seed (A's own start) is two steps further from A than that bound
    train(_cfg(tiny_cache, tmp_path / "c", max_steps=1, ckpt_every=1))
    c = load_checkpoint(latest_checkpoint(tmp_path / "c"))
    assert max((c.model[k] - v).abs().max().item() for k, v in a.model.items()) > 1.5e-4
    assert all(s["step"] == 1 for s in b.optimizer["state"].values())  # the optimiser started fresh
    # a rerun of B resumes B (the weights it started from no longer matter)
    again = train(_cfg(tiny_cache, tmp_path / "b", max_steps=2, ckpt_every=1, init_from=str(tmp_path / "a")))
    assert again.resumed_from == 1 and again.step == 2


def test_init_from_another_model_or_method_is_refused(tiny_cache, tmp_path):
    train(_cfg(tiny_cache, tmp_path / "a", max_steps=1, ckpt_every=1))
    with pytest.raises(UsageError, match=r"has another model than this run \(encoder_depth 2 vs 3\)"):
        train(_cfg(tiny_cache, tmp_path / "b", encoder_depth=3, init_from=str(tmp_path / "a")))
    with pytest.raises(UsageError, match="was trained with --method repa, this run uses irepa"):
        train(_cfg(tiny_cache, tmp_path / "c", method="irepa", init_from=str(tmp_path / "a")))
