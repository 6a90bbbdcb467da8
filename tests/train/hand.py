"""What the method tests share: a student moved off its zero init, and the linear-path flow-matching
step written out by hand for it (no label dropout), to compare a method's objective against."""

from __future__ import annotations

import torch

from repa_cache.train.config import TransportConfig
from repa_cache.train.methods import Method, StepBatch
from repa_cache.train.model import SiTConfig
from repa_cache.train.step import Trainer, build_trainer


def kick(model: torch.nn.Module) -> None:
    """Move off the zero init so that every output depends on the inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def hand_step(method: Method, mcfg: SiTConfig, batch: StepBatch, seed: int = 7
              ) -> tuple[Trainer, list[torch.Tensor], torch.Tensor]:
    """A trainer for ``method`` holding a kicked student, and by hand for the draws of ``seed``:
    t ~ U[0, 1), eps, x_t = (1 - t) x + t eps, the projected tokens and the float64 mse to
    v = eps - x. Seed torch with ``seed`` before ``train_step`` to get the same draws."""
    torch.manual_seed(5)
    model = method.build_student(mcfg)
    kick(model)
    tr = build_trainer(mcfg, torch.device("cpu"), method=method, transport=TransportConfig(label_dropout=0.0), seed=5)
    tr.model.load_state_dict(model.state_dict())
    torch.manual_seed(seed)
    t = torch.rand(batch.x.shape[0])
    eps = torch.randn_like(batch.x)
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch.x + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v_hat, zs = model(x_t, t, batch.y)
    return tr, zs, (v_hat.double() - (eps - batch.x).double()).pow(2).mean()
