"""The one training step that ``repa train`` and ``bench/train_step.py`` both run."""

from __future__ import annotations

import copy

import torch

from repa_cache.train.config import OptimConfig, TransportConfig
from repa_cache.train.loss import repa_loss
from repa_cache.train.methods import StepBatch
from repa_cache.train.model import sit_config
from repa_cache.train.step import build_trainer, train_step


def _setup():
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,), projector_dim=16)
    tr = build_trainer(mcfg, torch.device("cpu"), optim=OptimConfig(lr=1e-3, ema_decay=0.9), precision="fp32", seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    feats = [torch.randn(4, mcfg.num_tokens, 6, generator=g)]
    return tr, x, y, feats


def test_step_is_denoise_plus_weighted_repa_then_adamw_clip_and_ema():
    tr, x, y, feats = _setup()
    # The same step by hand, on copies.
    model = copy.deepcopy(tr.model)
    ema = copy.deepcopy(tr.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    torch.manual_seed(11)
    # REPA's objective written out: t ~ U[0, 1), noise, x_t = (1 - t) x + t eps, v = eps - x, label
    # dropout 0.1 to the null class, then mse + 0.5 * mean negative cosine.
    t = torch.rand(4)
    eps = torch.randn_like(x)
    tb = t.view(-1, 1, 1, 1)
    x_t, v = (1 - tb) * x + tb * eps, -1 * x + 1 * eps
    y_used = torch.where(torch.rand(4) < 0.1, torch.full_like(y, 5), y)
    v_hat, zs = model(x_t, t, y_used)
    repa, _ = repa_loss(zs, feats)
    want_loss = (v_hat.float() - v.float()).pow(2).mean() + 0.5 * repa
    want_loss.backward()
    want_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.copy_(e + 0.1 * (p - e))

    torch.manual_seed(11)
    res = train_step(tr, StepBatch(x, y, feats), 0)
    assert torch.equal(res.loss, want_loss.detach())
    assert torch.equal(res.terms["denoise"] + 0.5 * res.terms["repa"], res.loss)
    assert torch.equal(res.grad_norm, want_norm)
    for (name, a), b in zip(tr.model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(tr.ema.named_parameters(), ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert res.cos[0].item() == -res.terms["repa"].item()  # one teacher: the loss is minus its mean cosine


def test_null_class_is_the_row_after_the_real_classes():
    tr, *_ = _setup()
    assert tr.transport.config.null_class == 5 == tr.model.config.num_classes
    tr2 = build_trainer(tr.model.config, torch.device("cpu"), transport=TransportConfig(label_dropout=0.0, null_class=1000))
    assert tr2.transport.config.null_class == 5 and tr2.transport.config.label_dropout == 0.0


def test_same_seed_same_initial_weights():
    a, *_ = _setup()
    b, *_ = _setup()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


def test_the_optimiser_settings_reach_adamw_clipping_and_the_ema():
    """--adam-betas, --weight-decay, --grad-clip (0: the norm is measured, nothing clipped) and
    --ema-decay change the step exactly as AdamW, clip_grad_norm_ and the EMA update by hand do."""
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,), projector_dim=16)
    optim = OptimConfig(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05, grad_clip=0.0, ema_decay=0.5)
    tr = build_trainer(mcfg, torch.device("cpu"), optim=optim, precision="fp32", seed=3)
    model, ema = copy.deepcopy(tr.model), copy.deepcopy(tr.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = 20 * torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)  # large: gradient norms above 1
    feats = [torch.randn(4, mcfg.num_tokens, 6, generator=g)]
    for step in range(2):
        torch.manual_seed(step)
        t = torch.rand(4)
        eps = torch.randn_like(x)
        tb = t.view(-1, 1, 1, 1)
        y_used = torch.where(torch.rand(4) < 0.1, torch.full_like(y, 5), y)
        v_hat, zs = model((1 - tb) * x + tb * eps, t, y_used)
        loss = (v_hat - (eps - x)).pow(2).mean() + 0.5 * repa_loss(zs, feats)[0]
        opt.zero_grad()
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.copy_(e + 0.5 * (p - e))
        torch.manual_seed(step)
        res = train_step(tr, StepBatch(x, y, feats), step)
        torch.testing.assert_close(res.grad_norm, norm, rtol=1e-6, atol=0)
        assert res.grad_norm > 1.0  # so that a clip to 1 would have changed the step
    for (name, a), b in zip(tr.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(tr.ema.named_parameters(), ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_ema_warmup_follows_latent_diffusions_schedule_and_is_off_by_default():
    """Off (REPA): every update uses --ema-decay. On: the update after n steps uses
    min(decay, (1 + n) / (10 + n)), checked on the weights after two steps by hand."""
    assert [OptimConfig().ema_decay_at(s) for s in (0, 7, 10**6)] == [0.9999] * 3
    warm = OptimConfig(ema_decay=0.9999, ema_warmup=True)
    assert [warm.ema_decay_at(s) for s in (0, 7, 79, 889)] == [2 / 11, 0.5, 0.9, 0.99]
    assert warm.ema_decay_at(10**6) == 0.9999

    tr, x, y, feats = _setup()
    tr.optim = OptimConfig(lr=1e-3, ema_decay=0.9, ema_warmup=True)
    want = [p.detach().clone() for p in tr.ema.parameters()]
    for step in range(2):
        train_step(tr, StepBatch(x, y, feats), step)
        d = min(0.9, (2 + step) / (11 + step))  # n = step + 1 updates so far
        want = [e + (1 - d) * (p.detach() - e) for e, p in zip(want, tr.model.parameters())]
    for (name, a), b in zip(tr.ema.named_parameters(), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
