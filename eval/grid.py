"""The sample grid of a training run: ``repa train --sample-every N`` draws one from the EMA
weights every N steps into ``RUN/samples/step-XXXXXXXX.png`` and sends it to the run's trackers.
It is a hook of the training loop (:mod:`train.hooks`) that the caller passes in
(:func:`sample_grid`), so that training itself imports nothing from evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from repa_cache.eval.images import make_grid, write_png
from repa_cache.eval.sample import LatentDecoder, grid_title, load_decoder, open_sampling_bank, sample_batch
from repa_cache.eval.samplers import SamplerConfig, sample_labels
from repa_cache.train.checkpoint import ModelCard
from repa_cache.train.config import TrainConfig
from repa_cache.train.hooks import HookFactory, RunContext, StepInfo
from repa_cache.train.loop import TrainResult, train
from repa_cache.train.methods import Method
from repa_cache.train.methods.gmem import MemoryBank
from repa_cache.train.model import SiTConfig

#: what ``repa train --sample-every`` draws: REPA's training-time grid (Euler ODE, 50 steps, cfg 4)
TRAINING_GRID = SamplerConfig(sampler="ode", steps=50, heun=False, cfg_scale=4.0, guidance_interval=(0.0, 1.0))


class TrainingGrid:
    """The grid ``repa train --sample-every N`` writes to ``RUN/samples/step-XXXXXXX.png``: the EMA
    weights, the same noise and classes every time (samples 0..num-1 of the run's seed), so grids
    of the same step are identical across a resume and successive grids show the same samples. A
    GMem run draws its conditions from the training cache's bank (the run's first teacher)."""

    def __init__(self, card: ModelCard, method: Method, config: SiTConfig, seed: int, device: torch.device,
                 precision: str, num: int = 16) -> None:
        self.card, self.method, self.config, self.seed = card, method, config, seed
        self.device, self.precision, self.num = device, precision, num
        self.decoder: LatentDecoder | None = None  # loaded at the first grid
        self.bank: MemoryBank | None = None  # GMem: the training cache's bank, opened at the first grid

    def write(self, ema: torch.nn.Module, run: Path, step: int) -> tuple[Path, np.ndarray]:
        """Sample the grid from ``ema`` and write it to the run's samples folder; the file and its pixels."""
        if self.decoder is None:
            self.decoder = load_decoder(self.card, self.device)
            if self.method.samples_from_bank():
                self.bank = open_sampling_bank(self.card, self.method, self.config, self.card.train.get("cache"))
        scfg = dataclasses.replace(TRAINING_GRID, path=self.card.path)
        was_training = ema.training
        ema.eval()
        try:
            z = sample_batch(ema, self.method, self.config, scfg, self.seed, list(range(self.num)), device=self.device,
                             precision=self.precision, bank=self.bank)
        finally:
            ema.train(was_training)
        labels = None if self.bank is not None else sample_labels(self.seed, range(self.num), self.config.num_classes).tolist()
        grid = make_grid(self.decoder(z), labels=None if labels is None else [f"class {c}" for c in labels], title=grid_title(step, scfg))
        path = run / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, grid)
        return path, grid


class SampleGrid:
    """The hook: every ``--sample-every`` steps a grid, written and sent to the trackers."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        setup = ctx.setup
        self.grid = TrainingGrid(setup.card, setup.method, setup.model_config, ctx.cfg.seed, ctx.device, ctx.precision)

    def after_step(self, info: StepInfo) -> None:
        if info.step % self.ctx.cfg.sample_every:
            return
        _, image = self.grid.write(self.ctx.trainer.ema, self.ctx.run, info.step)
        if self.ctx.trackers is not None:
            self.ctx.trackers.log_image("samples", image, info.step)

    def finish(self, step: int) -> None:
        pass


def sample_grid(ctx: RunContext) -> SampleGrid | None:
    """The hook factory for :func:`train.loop.train`: a grid hook on the main rank when the run
    asks for grids, else None."""
    return SampleGrid(ctx) if ctx.cfg.sample_every and ctx.di.is_main else None


def train_run(cfg: TrainConfig, hooks: tuple[HookFactory, ...] = ()) -> TrainResult:
    """Train (or resume) a run as ``repa train`` does: :func:`train.loop.train` with the sample grid
    (and any further ``hooks``). ``repa_cache.train_run`` is this function."""
    return train(cfg, hooks=(sample_grid, *hooks))
