"""Status lines of ``repa align`` and ``repa sample`` when stderr is not a terminal, and quiet."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from repa_cache.eval.align import align
from repa_cache.eval.config import AlignConfig
from repa_cache.eval.sample import sample

from ..eval.test_sample_job import QUICK
from ..eval.test_sample_job import run as run  # the tiny run folder fixture


def _counts(err: str) -> list[str]:
    return [line.split(",")[0] for line in err.splitlines()]


def test_align_counts_samples(run: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    align(run.dir, AlignConfig(num=9, k=3, batch_size=4, device="cpu"))
    # Batches of 4, 4 and 1: a line at each new tenth reached, then the last one.
    assert _counts(capsys.readouterr().err) == ["align: 4/9 samples (44%)", "align: 8/9 samples (89%)", "align: 9/9 samples (100%)"]
    align(run.dir, AlignConfig(num=9, k=3, batch_size=4, device="cpu"), quiet=True)
    assert capsys.readouterr().err == ""


def test_sample_counts_images(run: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample(run.dir, tmp_path / "s", dataclasses.replace(QUICK, num=4, batch_size=2, quiet=False))
    err = capsys.readouterr().err  # the fixture saved step 10
    assert err.startswith(f"sample: 4 img to write in batches of 2, {QUICK.steps} {QUICK.sampler} steps each, from step 10 on cpu\n")
    assert _counts(err)[1:] == ["sample: 2/4 img (50%)", "sample: 4/4 img (100%)"]
    sample(run.dir, tmp_path / "q", dataclasses.replace(QUICK, num=4, batch_size=2))
    assert capsys.readouterr().err == ""
