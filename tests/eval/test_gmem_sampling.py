"""Sampling a GMem model: guidance against the null condition, bank entries drawn per sample from
its seed, and the sampling job with a bank (a cache or a bank file), without one, and refusals.

A GMem student with perturbed weights is saved by the trainer's checkpoint code with the model
card of a GMem run planned on the shared tiny cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import open_sampling_bank, sample, sample_batch
from repa_cache.eval.samplers import SamplerConfig, bank_choices, sample_joint
from repa_cache.train.checkpoint import save_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import plan_run
from repa_cache.train.methods import make_method
from repa_cache.train.methods.gmem import GMemSiT, export_bank, open_bank
from repa_cache.train.model import SiT, sit_config

from ..train.hand import kick

QUICK = SampleConfig(steps=2, sampler="ode", device="cpu", grid=0, quiet=True)


class Recording(torch.nn.Module):
    """A model that records the conditions it is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.ys = model, []

    def forward(self, x, t, y, *extras, **kw):
        self.ys.append(y.clone())
        return self.model(x, t, y, *extras, **kw)


@pytest.fixture(scope="module")
def runs(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("gmem-sampling")
    out = {}
    for name in ("gmem", "repa"):
        setup = plan_run(TrainConfig(cache=str(tiny_cache), out=str(root / name), model="SiT-tiny/2", method=name))
        torch.manual_seed(0)
        model, ema = setup.method.build_student(setup.model_config), setup.method.build_student(setup.model_config)
        kick(model)
        kick(ema)
        ema.eval()
        save_checkpoint(root / name, 4, model, ema, torch.optim.AdamW(model.parameters()), setup.card)
        out[name] = SimpleNamespace(dir=root / name, ema=ema, setup=setup)
    bank, _, _ = export_bank(tiny_cache, root / "bank.npy")
    return SimpleNamespace(root=root, cache=tiny_cache, bank=bank, **out)


def test_guidance_against_the_null_condition_by_hand():
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,), projector_dim=16)
    model = GMemSiT(mcfg, 6).eval()
    kick(model)
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(3, 4, 8, 8, generator=g)
    c = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=-1)
    cfg = SamplerConfig(sampler="ode", steps=1, heun=False, cfg_scale=3.0, guidance_interval=(0.0, 1.0))
    got = sample_joint(model, [x1], c, cfg, 5, [3.0], null_y=torch.zeros_like(c))[0]
    with torch.no_grad():
        one = torch.ones(3)
        v_c, v_0 = model(x1, one, c)[0].double(), model(x1, one, torch.zeros_like(c))[0].double()
    want = (x1.double() - (v_0 + 3.0 * (v_c - v_0))).float()  # one Euler step from t = 1 to 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="null condition of shape"):
        sample_joint(model, [x1], c, cfg, 5, [3.0], null_y=torch.zeros(3, 5))

    # a class-conditioned model: the method's null condition is the null class, as before
    sit = SiT(mcfg).eval()
    kick(sit)
    y = torch.tensor([0, 3, 1])
    null = make_method("repa").null_condition(y, 5)
    assert torch.equal(null, torch.full((3,), 5))
    assert torch.equal(sample_joint(sit, [x1], y, cfg, 5, [3.0])[0], sample_joint(sit, [x1], y, cfg, 5, [3.0], null_y=null)[0])


def test_bank_entries_are_drawn_per_sample_from_its_seed():
    every = bank_choices(0, range(40), 7)
    assert every == [bank_choices(0, [i], 7)[0] for i in range(40)]  # a sample's entry depends on (seed, i) only
    assert bank_choices(0, [39, 3], 7) == [every[39], every[3]]
    assert set(every) == set(range(7))  # 40 draws over 7 entries reach every one here
    assert bank_choices(1, range(40), 7) != every
    with pytest.raises(UsageError, match="the memory bank is empty"):
        bank_choices(0, [0], 0)


def test_sample_batch_from_a_bank_is_seeded_and_independent_of_the_batch(runs):
    setup, ema = runs.gmem.setup, runs.gmem.ema
    mcfg, method = setup.model_config, setup.method
    bank = open_sampling_bank(setup.card, method, mcfg, str(runs.cache))
    scfg = SamplerConfig(sampler="sde", steps=3, cfg_scale=2.0, guidance_interval=(0.0, 1.0))
    rec = Recording(ema)
    whole = sample_batch(rec, method, mcfg, scfg, 5, [0, 1, 2, 3], bank=bank)
    # the first call: the bank entries of (5, i), then their null conditions
    want = bank.entries(bank_choices(5, [0, 1, 2, 3], bank.size))
    assert torch.equal(rec.ys[0], torch.cat([want, torch.zeros_like(want)]))
    assert len(rec.ys) == 3 and all(torch.equal(y, rec.ys[0]) for y in rec.ys)
    assert torch.equal(whole, sample_batch(ema, method, mcfg, scfg, 5, [0, 1, 2, 3], bank=bank))  # same seed: same samples
    other = sample_batch(ema, method, mcfg, scfg, 6, [0, 1, 2, 3], bank=bank)
    assert not torch.allclose(other, whole)
    split = torch.cat([sample_batch(ema, method, mcfg, scfg, 5, [0, 1], bank=bank),
                       sample_batch(ema, method, mcfg, scfg, 5, [2], bank=bank),
                       sample_batch(ema, method, mcfg, scfg, 5, [3], bank=bank)])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)
    # without guidance only the bank entries are passed
    rec.ys.clear()
    sample_batch(rec, method, mcfg, dataclasses.replace(scfg, cfg_scale=1.0), 5, [2, 0], bank=bank)
    assert torch.equal(rec.ys[0], want[[2, 0]])
    with pytest.raises(UsageError, match="pass --bank"):
        sample_batch(ema, method, mcfg, scfg, 5, [0])


def test_the_sampling_job_with_a_cache_or_a_bank_file(runs, tmp_path):
    cfg = dataclasses.replace(QUICK, num=3, batch_size=2, cfg_scale=1.5, guidance_interval=(0.0, 1.0))
    a = sample(runs.gmem.dir, tmp_path / "a", dataclasses.replace(cfg, bank=str(runs.cache)))
    b = sample(runs.gmem.dir, tmp_path / "b", dataclasses.replace(cfg, bank=str(runs.bank)))
    assert a.written == b.written == 3 and a.npz is not None
    with np.load(a.npz) as fa, np.load(b.npz) as fb:
        assert fa.files == ["arr_0"] and fa["arr_0"].shape == (3, 256, 256, 3)
        diff = np.abs(fa["arr_0"].astype(np.int16) - fb["arr_0"].astype(np.int16))
        assert diff.max() <= 1  # the same entries, normalised once more from the file
        assert not np.array_equal(fa["arr_0"][0], fa["arr_0"][1])
    job = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert job["bank"] == str(Path(runs.cache).resolve()) and job["conditioning"] == "bank"
    assert sample(runs.gmem.dir, tmp_path / "a", dataclasses.replace(cfg, bank=str(runs.cache))).written == 0  # resumes
    with pytest.raises(UsageError, match=r"other settings \(bank: "):
        sample(runs.gmem.dir, tmp_path / "a", dataclasses.replace(cfg, bank=str(runs.bank)))

    def refused(ckpt: Path, job: SampleConfig) -> str:
        with pytest.raises(UsageError) as e:
            sample(ckpt, tmp_path / "x", job)
        return str(e.value)

    assert refused(runs.gmem.dir, cfg).startswith("this model (--method gmem) is conditioned on memory-bank entries")
    assert refused(runs.gmem.dir, dataclasses.replace(cfg, bank=str(runs.cache), classes=(1,))) == (
        "--class does not apply to a --method gmem model: each sample's condition is a --bank entry")
    assert refused(runs.repa.dir, dataclasses.replace(cfg, bank=str(runs.bank))) == (
        "--bank applies to models trained with --method gmem; this one was trained with --method repa")
    assert refused(runs.gmem.dir, dataclasses.replace(cfg, bank=str(tmp_path / "nowhere"))) == (
        f"--bank {tmp_path / 'nowhere'}: no such cache or bank file")
    assert not (tmp_path / "x" / "sample.json").exists()
    # the class-conditioned model samples as before, labels in the npz
    r = sample(runs.repa.dir, tmp_path / "r", cfg)
    with np.load(r.npz) as f:
        assert f.files == ["arr_0", "arr_1"]


def test_a_bank_of_another_teacher_is_refused(runs):
    setup = runs.gmem.setup
    card = dataclasses.replace(setup.card, cache={**setup.card.cache, "weights": {"teachers/tiny": "0" * 64}})
    with pytest.raises(UsageError) as e:
        open_sampling_bank(card, setup.method, setup.model_config, str(runs.cache))
    assert str(e.value) == (f"--bank {runs.cache}: teacher 'tiny' there has other weights than the one the model was "
                            "trained with")
    assert open_bank(runs.bank, "tiny", setup.model_config.z_dims[0]).size == open_bank(runs.cache, "tiny", 32).size
