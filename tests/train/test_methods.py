"""Training methods as components (iREPA, REG), alignment schedules and the encoder warm-up:
each objective against a hand computation, REG's joint sampler, reads after an alignment stop,
and a tiny run per method that resumes exactly and samples."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.eval.samplers import SamplerConfig, sample_joint
from repa_cache.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from repa_cache.train.config import METHOD_NAMES, OptimConfig, SamplingDefaults, TrainConfig, TransportConfig
from repa_cache.train.data import CacheBatches, DataConfig
from repa_cache.train.loop import check_resume, plan_run, train
from repa_cache.train.methods import METHODS, StepBatch, make_method, method_from_card
from repa_cache.train.methods.irepa import ConvProjector, spatial_zscore
from repa_cache.train.methods.reg import RegSiT
from repa_cache.train.model import sit_config
from repa_cache.train.schedule import MAIN, MAIN_NO_ALIGN, WARMUP, AlignSchedule, Phases
from repa_cache.train.step import build_trainer, train_step
from repa_cache.train.student import load_student

from ..conftest import HUNG
from ..train.hand import hand_step, kick

CPU = torch.device("cpu")


def _batch(z: int = 6, classes: int = 5, with_cls: bool = False) -> tuple[object, StepBatch]:
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=classes, z_dims=(z,), projector_dim=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.randint(0, classes, (4,), generator=g)
    patch = [3 * torch.randn(4, mcfg.num_tokens, z, generator=g) + 1]
    cls = [torch.randn(4, z, generator=g)] if with_cls else []
    return mcfg, StepBatch(x, y, patch, cls)


def _neg_cos(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(z.double(), y.double(), dim=-1).mean()


def test_the_registry_names_every_method_and_the_cli_list_matches():
    assert tuple(METHODS) == METHOD_NAMES == ("repa", "irepa", "reg", "urepa", "gmem", "haste")
    assert make_method("irepa").proj_coeff == 1.0 and make_method("reg").proj_coeff == 0.5
    m = method_from_card({"name": "reg", "options": {"proj_coeff": 0.25, "cls_coeff": 0.1}})
    assert m.card() == {"name": "reg", "options": {"proj_coeff": 0.25, "cls_coeff": 0.1}}
    # what earlier runs recorded for REPA still reads
    assert method_from_card({"name": "repa", "options": {"proj_coeff": 0.5, "encoder_depth": 4}}).card()["options"] == {"proj_coeff": 0.5}


@pytest.mark.parametrize("name, options, message", [
    ("dino", {}, "unknown method 'dino'; known methods: repa, irepa, reg, urepa, gmem, haste"),
    ("reg", {"alpha": "1"}, "method 'reg' has no option alpha; its options: cls_coeff, proj_coeff"),
    ("irepa", {"kernel_size": "2"}, "irepa kernel_size must be a positive odd number, got 2"),
    ("irepa", {"kernel_size": "x"}, "method 'irepa': option kernel_size takes an integer, got 'x'"),
    ("irepa", {"init": "kaiming"}, "irepa init must be one of xavier, torch, got 'kaiming'"),
    ("repa", {"proj_coeff": "nan"}, "proj_coeff must be a finite number >= 0, got nan"),
])
def test_bad_method_settings_are_one_line_usage_errors(name, options, message):
    with pytest.raises(UsageError) as e:
        make_method(name, options)
    assert str(e.value) == message


# ------------------------------------------------------------------------------------ iREPA


def test_irepa_zscore_against_numpy():
    y = torch.randn(2, 9, 5, dtype=torch.float64) * torch.tensor([1.0, 50.0, 0.1, 3.0, 1000.0], dtype=torch.float64)
    a = y.numpy()
    want = (a - 0.6 * a.mean(axis=1, keepdims=True)) / (a.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(spatial_zscore(y, 0.6, 1e-6).double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_irepa_conv_projector_is_a_3x3_same_padded_convolution_over_the_token_grid():
    proj = ConvProjector(hidden_size=4, z_dim=3, kernel_size=3)
    h = torch.randn(2, 16, 4, dtype=torch.float64)
    proj = proj.double()
    out = proj(h)  # (2, 16, 3)
    W, b = proj.conv.weight, proj.conv.bias  # (3, 4, 3, 3), (3,)
    grid = h.reshape(2, 4, 4, 4)  # (B, row, col, D), tokens row-major
    for n in range(2):
        for r in range(4):
            for c in range(4):
                acc = b.clone()
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < 4 and 0 <= cc < 4:
                            acc = acc + W[:, :, dr + 1, dc + 1] @ grid[n, rr, cc]
                torch.testing.assert_close(out[n, r * 4 + c], acc)


def test_irepa_projector_init_is_xavier_by_default_or_torchs_own_conv_init():
    """``init=xavier`` (the default) draws the projector as a (Z, D*k*k) xavier-uniform linear with
    a zero bias after the SiT's own init; ``init=torch`` keeps the weights nn.Conv2d drew when the
    projector was made, before the SiT (iREPA's latent-diffusion code). Nothing else differs."""
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,))
    builds = {}
    for options in ({}, {"init": "xavier"}, {"init": "torch"}, {"init": "torch", "kernel_size": "1"}):
        torch.manual_seed(0)
        builds[json.dumps(options)] = make_method("irepa", options).build_student(mcfg)
    default, xavier, own, own_k1 = builds.values()
    torch.manual_seed(0)
    drawn = torch.nn.Conv2d(mcfg.hidden_size, 6, 3, padding=1)  # the first draws of the global RNG, as the projector's
    conv = own.projectors[0].conv
    assert torch.equal(conv.weight, drawn.weight) and torch.equal(conv.bias, drawn.bias) and conv.bias.abs().min() > 0
    x = default.projectors[0].conv
    assert torch.equal(x.bias, torch.zeros(6)) and not torch.equal(x.weight, drawn.weight)
    bound = math.sqrt(6 / (mcfg.hidden_size * 9 + 6))  # xavier-uniform of the (Z, D*3*3) view
    assert 0.9 * bound < x.weight.abs().max() <= bound
    for name, value in default.state_dict().items():
        assert torch.equal(value, xavier.state_dict()[name]), name  # the default is init=xavier, draw for draw
        if not name.startswith("projectors."):
            assert torch.equal(value, own.state_dict()[name]), name
    assert own_k1.projectors[0].conv.weight.shape == (6, mcfg.hidden_size, 1, 1)  # iREPA's latent-diffusion default


def test_irepa_objective_against_a_hand_computation():
    mcfg, batch = _batch()
    method = make_method("irepa")
    tr, zs, denoise = hand_step(method, mcfg, batch)
    assert isinstance(tr.model.projectors[0], ConvProjector)
    target = (batch.patch[0] - 0.6 * batch.patch[0].mean(1, keepdim=True)) / (batch.patch[0].std(1, keepdim=True) + 1e-6)
    want = float(denoise + 1.0 * _neg_cos(zs[0], target))
    torch.manual_seed(7)
    res = train_step(tr, batch, 0)
    assert res.loss.item() == pytest.approx(want, rel=1e-5)
    assert set(res.terms) == {"denoise", "repa"}


# ------------------------------------------------------------------------------------ REG


def test_reg_student_shapes_and_zero_initialised_cls_head():
    mcfg, batch = _batch(with_cls=True)
    model = make_method("reg").build_student(mcfg)
    assert isinstance(model, RegSiT)
    v, zs, cls_v = model(batch.x, torch.rand(4), batch.y, batch.cls[0])
    assert v.shape == batch.x.shape and cls_v.shape == (4, 6) and zs[0].shape == (4, 1 + mcfg.num_tokens, 6)
    assert torch.equal(cls_v, torch.zeros_like(cls_v))
    with pytest.raises(UsageError, match="--method reg needs the CLS token of teacher 'tiny'"):
        make_method("reg").check_cache({"tiny": ["patch"]})


def test_reg_objective_has_three_terms_against_a_hand_computation():
    mcfg, batch = _batch(with_cls=True)
    method = make_method("reg")
    tr = build_trainer(mcfg, CPU, method=method, transport=TransportConfig(label_dropout=0.5), seed=2)
    kick(tr.model)
    model = copy.deepcopy(tr.model)
    torch.manual_seed(9)
    # the order of draws: times, latent noise, label dropout, then the CLS token's own noise
    t = torch.rand(4)
    eps = torch.randn_like(batch.x)
    drop = torch.rand(4) < 0.5
    eps_cls = torch.randn_like(batch.cls[0])
    tb, tc = t.view(-1, 1, 1, 1), t.view(-1, 1)
    y = torch.where(drop, torch.full_like(batch.y, 5), batch.y)
    v_hat, zs, cls_hat = model((1 - tb) * batch.x + tb * eps, t, y, (1 - tc) * batch.cls[0] + tc * eps_cls)
    denoise = (v_hat.double() - (eps - batch.x).double()).pow(2).mean()
    denoise_cls = (cls_hat.double() - (eps_cls - batch.cls[0]).double()).pow(2).mean()
    repa = _neg_cos(zs[0], torch.cat([batch.cls[0].unsqueeze(1), batch.patch[0]], dim=1))
    torch.manual_seed(9)
    res = train_step(tr, batch, 0)
    denoise, denoise_cls, repa = denoise.detach(), denoise_cls.detach(), repa.detach()
    assert res.terms["denoise"].item() == pytest.approx(float(denoise), rel=1e-5)
    assert res.terms["denoise_cls"].item() == pytest.approx(float(denoise_cls), rel=1e-5)
    assert res.terms["repa"].item() == pytest.approx(float(repa), rel=1e-5, abs=1e-6)
    assert res.loss.item() == pytest.approx(float(denoise + 0.5 * repa + 0.03 * denoise_cls), rel=1e-5)
    assert tr.model.cls_out.weight.grad is not None and tr.model.cls_out.weight.grad.abs().sum() > 0


def _euler_joint(model, x, c, y, steps):
    """The unguided joint probability-flow ODE, Euler, written out."""
    x, c = x.double(), c.double()
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in itertools.pairwise(times):
        tt = torch.full((x.shape[0],), t)
        v, _, cv = model(x.float(), tt, y, c.float())
        x, c = x + (t_next - t) * v.double(), c + (t_next - t) * cv.double()
    return x.float(), c.float()


def test_reg_sampling_without_guidance_is_the_unguided_joint_ode():
    mcfg, batch = _batch(with_cls=True)
    model = make_method("reg").build_student(mcfg).eval()
    kick(model)
    g = torch.Generator().manual_seed(3)
    x1, c1 = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 6, generator=g)
    want_x, want_c = _euler_joint(model, x1, c1, batch.y, 5)
    cfg = SamplerConfig(sampler="ode", steps=5, heun=False, cfg_scale=1.0)
    x, c = sample_joint(model, [x1, c1], batch.y, cfg, 5, [1.0, 1.0])
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(c).all() and c.shape == (4, 6)
    # guidance on the CLS token alone changes the CLS token and, through attention, the latent
    guided = SamplerConfig(sampler="ode", steps=5, heun=False, cfg_scale=1.5, guidance_interval=(0.0, 1.0))
    gx, gc = sample_joint(model, [x1, c1], batch.y, guided, 5, [1.0, 3.0])
    assert not torch.allclose(gc, c) and not torch.allclose(gx, x)


# ------------------------------------------------------------------------------------ schedules


def test_schedules_parse_and_give_their_coefficient_at_chosen_steps():
    assert AlignSchedule.parse("const").coeff(10**6, 0.5) == 0.5
    stop = AlignSchedule.parse("stop:100")
    assert (stop.coeff(99, 0.5), stop.coeff(100, 0.5), stop.coeff(10**6, 0.5)) == (0.5, 0.0, 0.0)
    ed = AlignSchedule.parse("exp-decay:6,50000")
    assert ed.coeff(0, 0.5) == 6.0 and ed.coeff(50000, 0.5) == 3.0 and ed.coeff(125000, 0.5) == pytest.approx(6 * 2 ** -2.5)
    ph = Phases(ed, warmup_steps=10)  # the decay counts from the end of the warm-up, as ERW does
    assert ph.coeff(5, 0.5) == 0.5 and ph.coeff(10, 0.5) == 6.0 and ph.coeff(50010, 0.5) == 3.0
    ph = Phases(AlignSchedule.parse("stop:4"), warmup_steps=2)
    assert [ph.phase(s) for s in range(8)] == [WARMUP] * 2 + [MAIN] * 4 + [MAIN_NO_ALIGN] * 2
    assert ph.boundaries() == [(0, WARMUP), (2, MAIN), (6, MAIN_NO_ALIGN)]
    assert Phases(AlignSchedule.parse("stop:0")).boundaries() == [(0, MAIN_NO_ALIGN)]
    for bad in ("stop", "stop:x", "stop:-1", "exp-decay:1", "exp-decay:1,0", "linear"):
        with pytest.raises(UsageError, match="--align-schedule"):
            AlignSchedule.parse(bad)


def test_after_a_stop_the_step_has_no_alignment_term_and_projectors_are_frozen():
    mcfg, batch = _batch()
    tr = build_trainer(mcfg, CPU, phases=Phases(AlignSchedule.parse("stop:1")), seed=0)
    before = copy.deepcopy(tr.model.projectors.state_dict())
    train_step(tr, batch, 0)
    res = train_step(tr, StepBatch(batch.x, batch.y), 1)  # no teacher tokens at all
    assert set(res.terms) == {"denoise"} and res.cos == [] and torch.equal(res.loss, res.terms["denoise"])
    assert tr.phase == MAIN_NO_ALIGN and not any(p.requires_grad for p in tr.model.projectors.parameters())
    after_first = copy.deepcopy(tr.model.projectors.state_dict())
    assert any(not torch.equal(before[k], after_first[k]) for k in before)  # step 0 trained them
    train_step(tr, StepBatch(batch.x, batch.y), 2)
    assert all(torch.equal(after_first[k], v) for k, v in tr.model.projectors.state_dict().items())


def test_warmup_is_alignment_alone_at_t0_and_trains_only_the_encoder():
    mcfg, batch = _batch()
    tr = build_trainer(mcfg, CPU, optim=OptimConfig(lr=1e-2), phases=Phases(warmup_steps=1),
                       transport=TransportConfig(label_dropout=0.0), seed=0)
    kick(tr.model)
    model = copy.deepcopy(tr.model)
    seen: list[torch.Tensor] = []
    tr.model.t_embedder.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    torch.manual_seed(0)
    res = train_step(tr, batch, 0)
    assert len(seen) == 1 and torch.equal(seen[0], torch.zeros(4))
    with torch.no_grad():
        _, zs = model(batch.x, torch.zeros(4), batch.y, encoder_only=True)
    # every sample of the batch counts (not only the last one)
    assert res.loss.item() == pytest.approx(0.5 * float(_neg_cos(zs[0], batch.patch[0])), rel=1e-5)
    assert set(res.terms) == {"repa"}
    late = [f"blocks.{i}." for i in range(mcfg.encoder_depth, mcfg.depth)] + ["final_layer."]
    new, old = tr.model.state_dict(), model.state_dict()
    for k in new:
        frozen = any(k.startswith(p) for p in late)
        assert torch.equal(new[k], old[k]) == (frozen or k == "pos_embed"), k
    train_step(tr, batch, 1)  # the main phase trains everything
    assert tr.phase == MAIN and all(p.requires_grad for p in tr.model.parameters())
    assert not torch.equal(tr.model.final_layer.linear.weight, model.final_layer.linear.weight)


# ------------------------------------------------------------------------------------ runs on the tiny cache


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", batch_size=8, max_steps=6, ckpt_every=3, log_every=3, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def test_after_stop_no_teacher_field_is_read(tiny_cache, monkeypatch):
    from repa_cache.cache.reader import CacheReader

    setup = plan_run(_cfg(tiny_cache, Path("unused"), align_schedule="stop:2"))
    fields: list[list[str]] = []
    real = CacheReader.read_views

    def counting(self, indices, views, groups=None, **kw):
        fields.append(list(kw.get("fields") or []))
        return real(self, indices, views, groups, **kw)

    monkeypatch.setattr(CacheReader, "read_views", counting)
    ds = CacheBatches(DataConfig(str(tiny_cache), setup.teachers, 8, teacher_fields=setup.data_fields(), num_workers=0))
    items = [ds[s] for s in range(4)]
    assert [any(f.startswith("teachers/") for f in fs) for fs in fields] == [True, True, False, False]
    assert "teachers/tiny/patch" in items[1] and not any(k.startswith("teachers/") for k in items[2])
    reg = plan_run(_cfg(tiny_cache, Path("unused"), method="reg", align_schedule="stop:1"))
    assert reg.data_fields() == ((0, ("cls", "patch")), (1, ("cls",)))  # REG still denoises the CLS token


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("irepa", {}),
    ("reg", {}),
    ("repa", {"align_schedule": "stop:1", "warmup_steps": 2}),  # steps 0-1 warm-up, 2 main, 3-5 no alignment
    ("repa", {"align_schedule": "exp-decay:1,3"}),
])
def test_each_method_trains_resumes_exactly_and_samples(tiny_cache, tmp_path, method, extra):
    full = train(_cfg(tiny_cache, tmp_path / "a", method=method, **extra))
    train(_cfg(tiny_cache, tmp_path / "b", method=method, max_steps=3, **extra))
    resumed = train(_cfg(tiny_cache, tmp_path / "b", method=method, **extra))
    assert full.step == resumed.step == 6 and resumed.resumed_from == 3
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    assert a.card.method["name"] == method
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "denoise", "time", "lr", "align_coeff"} <= set(r) for r in rows)
    if method == "reg":
        assert all("denoise_cls" in r for r in rows)
    if extra.get("align_schedule") == "stop:1":
        assert "repa" not in rows[-1] and rows[-1]["align_coeff"] == 0.0
    if extra.get("align_schedule", "").startswith("exp-decay"):
        assert rows[-1]["align_coeff"] == pytest.approx(2 ** (-5 / 3))  # coefficient of the row's last step, 5
    loaded = load_student(tmp_path / "a")
    assert type(loaded.model).__name__ == ("RegSiT" if method == "reg" else "SiT")
    res = sample(tmp_path / "a", tmp_path / "s", SampleConfig(num=2, steps=2, sampler="ode", device="cpu", grid=0, quiet=True))
    assert res.written == 2
    with pytest.raises(UsageError, match="the config changed"):
        train(_cfg(tiny_cache, tmp_path / "a", method="repa" if method != "repa" else "irepa", max_steps=8))


def test_a_method_the_cache_cannot_feed_is_refused(tiny_cache, tmp_path):
    with pytest.raises(UsageError, match="unknown method 'rpa'"):
        plan_run(_cfg(tiny_cache, tmp_path / "r", method="rpa"))
    with pytest.raises(UsageError, match="method 'irepa' has no option cls_coeff"):
        plan_run(_cfg(tiny_cache, tmp_path / "r", method="irepa", method_options={"cls_coeff": "1"}))
    setup = plan_run(_cfg(tiny_cache, tmp_path / "r", method="irepa", proj_coeff=0.25))
    assert setup.card.method == {"name": "irepa", "options": {"proj_coeff": 0.25, "alpha": 0.6, "eps": 1e-6, "kernel_size": 3,
                                                              "init": "xavier"}}
    assert dataclasses.asdict(setup.cfg)["proj_coeff"] == 0.25
    assert math.isclose(plan_run(_cfg(tiny_cache, tmp_path / "r")).cfg.proj_coeff, 0.5)


def test_irepa_options_travel_through_the_command_line_and_config_files(tiny_cache, tmp_path, run_cli):
    args = ["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2", "--method", "irepa",
            "--dry-run"]
    code, out, err = run_cli([*args, "-O", "init=torch", "-O", "kernel_size=1"])
    assert code == 0, err
    assert json.loads(out)["method"]["options"] == {"proj_coeff": 1.0, "alpha": 0.6, "eps": 1e-6, "kernel_size": 1, "init": "torch"}
    (tmp_path / "c.toml").write_text('[method_options]\ninit = "torch"\n')
    code, out, err = run_cli([*args, "--config", str(tmp_path / "c.toml")])
    assert code == 0, err
    assert json.loads(out)["method"]["options"]["init"] == "torch"
    code, out, err = run_cli([*args, "-O", "init=normal"])
    assert code == 2 and err.strip() == "error: irepa init must be one of xavier, torch, got 'normal'"


def test_a_resume_takes_an_option_the_run_did_not_record_at_its_default(tiny_cache, tmp_path):
    """A run recorded before an option existed had that option's default: resuming it with the
    default is the same run; with another value it is refused."""
    setup = plan_run(_cfg(tiny_cache, tmp_path / "r", method="irepa"))
    recorded = {**setup.card.train, "method_options": {k: v for k, v in setup.card.train["method_options"].items() if k != "init"}}
    old = Checkpoint(tmp_path / "step.pt", "train", 3, dataclasses.replace(setup.card, train=recorded), {})
    check_resume(old, setup.cfg, setup)  # no error: init was xavier then
    other = plan_run(_cfg(tiny_cache, tmp_path / "r", method="irepa", method_options={"init": "torch"}))
    with pytest.raises(UsageError, match=r"the config changed \(method_options: .*'init': 'xavier'.* -> .*'init': 'torch'"):
        check_resume(old, other.cfg, other)


def test_every_checkpoint_records_its_methods_sampling_settings(tiny_cache, tmp_path, run_cli):
    reg = plan_run(_cfg(tiny_cache, tmp_path / "r", method="reg"))
    assert reg.card.sampling == {"sampler": "sde", "steps": 250, "heun": False, "cfg_scale": 2.3, "guidance_interval": [0.0, 0.85],
                                 "cls_cfg_scale": 2.3}
    assert reg.card.sampling_defaults == METHODS["reg"].sampling
    assert METHODS["repa"].sampling == SamplingDefaults()  # REPA samples as repa sample always has
    assert METHODS["haste"].sampling == SamplingDefaults(cfg_scale=1.65, guidance_interval=(0.0, 0.72))
    code, out, _ = run_cli(["methods"])
    assert code == 0
    lines = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert set(lines) == set(METHOD_NAMES)
    sampling = [line.strip() for line in out.splitlines() if line.startswith("  sampling: ")]
    assert len(sampling) == len(METHOD_NAMES)
    assert sampling[0].startswith("sampling: SDE, 250 steps, no guidance (cfg 1) (")  # repa
    assert sampling[2].startswith("sampling: SDE, 250 steps, cfg 2.3 on t in [0, 0.85], CLS cfg 2.3 (REG's eval.sh")  # reg


@pytest.mark.slow
def test_phase_changes_under_torchrun(tiny_cache, tmp_path):
    """Warm-up, main and no-alignment phases under DDP (2 gloo ranks): the wrapper is rebuilt at each
    change, so no rank waits for gradients of frozen or unused parameters."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run(
        torchrun + ["-m", "repa_cache.cli", "train", "--cache", str(tiny_cache), "--out", str(run), "--model", "SiT-tiny/2",
                    "--method", "reg", "--warmup-steps", "1", "--align-schedule", "stop:1", "--batch-size", "8", "--max-steps", "3",
                    "--ckpt-every", "3", "--log-every", "1", "--workers", "0", "--device", "cpu", "-q"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=HUNG,
    )
    assert res.returncode == 0, res.stderr[:3000] + "\n...\n" + res.stderr[-2000:]  # a rank's own error comes first
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k in ("repa", "denoise", "denoise_cls")) for r in rows] == [
        ["repa"], ["denoise", "denoise_cls", "repa"], ["denoise", "denoise_cls"]]
    assert load_checkpoint(latest_checkpoint(run)).step == 3
