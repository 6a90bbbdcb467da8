"""U-REPA: the U-shaped student (stage layout, skips, aligned tokens on the teacher grid), the
manifold loss and the objective against hand computations, and a tiny run that resumes exactly
and samples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import train
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.methods.urepa import manifold_loss
from repa_cache.train.model import SiTConfig, count_parameters, sit_config
from repa_cache.train.step import train_step
from repa_cache.train.student import load_student
from repa_cache.train.usit import USiT, build_student_model

from ..train.hand import hand_step, kick

CPU = torch.device("cpu")


def _config(z: int = 6, classes: int = 5) -> SiTConfig:
    """USiT-tiny/2 on 8x8 latents: a 4x4 token grid, a 2x2 middle stage, blocks 1 | 2-3 | 4."""
    return sit_config("USiT-tiny/2", input_size=8, num_classes=classes, z_dims=(z,), projector_dim=16)


def _inputs(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g), torch.randint(0, 5, (b,), generator=g)


def test_usit_predicts_zero_at_init_and_aligns_middle_tokens_upsampled_to_the_full_grid():
    torch.manual_seed(0)
    model = build_student_model(_config())
    assert isinstance(model, USiT) and model.config.layout == "u" and len(model.blocks) == 4
    x, t, y = _inputs()
    v, zs = model(x, t, y)
    assert v is not None and v.shape == (3, 4, 8, 8) and torch.equal(v, torch.zeros_like(v))  # adaLN-Zero
    assert len(zs) == 1 and zs[0].shape == (3, 16, 6)  # the teacher's 4x4 grid, not the middle 2x2
    kick(model)
    with torch.no_grad():
        _, zs = model(x, t, y)
        none, enc = model(x, t, y, encoder_only=True)
        # by hand: stage 1, merge, middle stage, projector, then bilinear 2x2 -> 4x4 (pixel centres)
        c = model.condition(t, y)
        h = model.blocks[0](model.embed(x), c)  # (B, 16, D)
        h = model.merge(h, 4)  # (B, 4, D)
        for block in model.blocks[1:3]:
            h = block(h, c)
        p = model.projectors[0](h)  # (B, 4, Z), the 2x2 grid row by row
    u = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # 1-D weights, 2 -> 4
    want = torch.einsum("pq,bqz->bpz", torch.kron(u, u), p)  # (B, 16, Z)
    torch.testing.assert_close(zs[0], want)
    assert none is None and torch.equal(enc[0], zs[0])


def test_token_merge_takes_each_2x2_cell_and_split_puts_it_back():
    model = build_student_model(_config())
    D = model.config.hidden_size
    h = torch.randn(2, 16, D)  # (B, 4x4 grid, D)
    eye = torch.eye(D)
    with torch.no_grad():
        model.merge.linear.weight.copy_(torch.cat([eye, 2 * eye, 3 * eye, 4 * eye], dim=1))  # cell order TL, TR, BL, BR
        model.merge.linear.bias.zero_()
        model.split.linear.weight.copy_(torch.cat([eye, eye, eye, eye], dim=0))  # copy to all four
        model.split.linear.bias.zero_()
    grid = h.reshape(2, 4, 4, D)
    want = grid[:, 0::2, 0::2] + 2 * grid[:, 0::2, 1::2] + 3 * grid[:, 1::2, 0::2] + 4 * grid[:, 1::2, 1::2]  # (B, 2, 2, D)
    merged = model.merge(h, 4)
    torch.testing.assert_close(merged, want.reshape(2, 4, D))
    back = model.split(merged, 4).reshape(2, 4, 4, D)
    torch.testing.assert_close(back, want.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))


def test_skip_connections_carry_the_first_stage_into_the_last():
    torch.manual_seed(0)
    model = build_student_model(_config())
    kick(model)
    x, t, y = _inputs()
    D = model.config.hidden_size
    with torch.no_grad():
        v, _ = model(x, t, y)
        model.skips[0].weight[:, D:] = 0  # cut the skip half of the concat
        v_cut, _ = model(x, t, y)
    assert v is not None and v_cut is not None
    assert (v - v_cut).abs().max() > 1e-3


def test_warmup_trains_stage_one_merge_middle_and_projectors_only():
    model = build_student_model(_config())
    warm = {id(p) for p in model.warmup_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in warm}
    assert any(n.startswith("merge.") for n in names) and any(n.startswith("projectors.") for n in names)
    assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == {"0", "1", "2"}
    assert not any(n.startswith(("blocks.3.", "split.", "skips.", "final_layer.")) for n in names)


def test_u_layout_config_checks_and_old_cards_still_load():
    flat = sit_config("SiT-tiny/2")
    d = dataclasses.asdict(flat)
    assert d.pop("layout") == "flat" and SiTConfig(**d) == flat  # a card written before the field
    with pytest.raises(UsageError) as e:
        sit_config("USiT-tiny/2", encoder_depth=2)
    assert str(e.value) == ("a U-shaped model needs depth/2 < --encoder-depth < depth (the middle stage ends at block "
                            "encoder_depth), got depth 4, encoder depth 2")
    with pytest.raises(UsageError, match="halves the token grid, but 3 tokens per side is odd$"):
        sit_config("USiT-tiny/2", input_size=6)
    with pytest.raises(UsageError, match="^unknown model layout 'v'; known: flat, u$"):
        sit_config("SiT-tiny/2", layout="v")


def test_urepa_refuses_a_flat_model_and_reg_refuses_a_u_one():
    with pytest.raises(UsageError) as e:
        make_method("urepa").build_student(sit_config("SiT-tiny/2"))
    assert str(e.value) == "--method urepa needs a U-shaped model (USiT-B/2, USiT-L/2, USiT-XL/2, USiT-tiny/2)"
    with pytest.raises(UsageError, match="^RegSiT cannot be built with layout 'u' "):
        make_method("reg").build_student(_config())
    assert isinstance(make_method("repa").build_student(_config()), USiT)  # plain REPA on the middle stage
    with pytest.raises(UsageError, match="urepa manifold_weight must be a finite number >= 0, got -1.0"):
        make_method("urepa", {"manifold_weight": "-1"})


def test_parameter_counts_against_sit_of_the_same_width():
    with torch.device("meta"):
        flat, u = build_student_model(sit_config("SiT-XL/2")), build_student_model(sit_config("USiT-XL/2"))
    D, outer = 1152, 8
    extra = (4 * D * D + D) + (D * 4 * D + 4 * D) + outer * (2 * D * D + D)  # merge, split, skips
    assert count_parameters(u) == count_parameters(flat) + extra


def test_manifold_loss_against_a_float64_hand_computation():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(3, 2, 5, generator=g), 2 * torch.randn(3, 2, 5, generator=g) + 1
    total = 0.0
    for t in range(2):
        for i in range(3):
            for j in range(3):
                sz = float(F.cosine_similarity(z[i, t].double(), z[j, t].double(), dim=0))
                sy = float(F.cosine_similarity(y[i, t].double(), y[j, t].double(), dim=0))
                total += (sz - sy) ** 2
    assert manifold_loss(z, y).item() == pytest.approx(total / (2 * 3 * 3), rel=1e-5)
    assert manifold_loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert manifold_loss(3 * y, y).item() == pytest.approx(0.0, abs=1e-6)  # scale-free, like REPA's cosine


def test_urepa_objective_against_a_hand_computation():
    mcfg = _config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    batch = StepBatch(x, y, [3 * torch.randn(4, mcfg.num_tokens, 6, generator=g) + 1])
    tr, zs, denoise = hand_step(make_method("urepa"), mcfg, batch)
    z, target = zs[0].double(), batch.patch[0].double()
    align = -F.cosine_similarity(z, target, dim=-1).mean()
    zn, yn = F.normalize(z, dim=-1), F.normalize(target, dim=-1)
    manifold = (torch.einsum("itz,jtz->tij", zn, zn) - torch.einsum("itz,jtz->tij", yn, yn)).pow(2).mean()
    want = float(denoise + 0.5 * (align + 3.0 * manifold))
    torch.manual_seed(7)
    res = train_step(tr, batch, 0)
    assert res.loss.item() == pytest.approx(want, rel=1e-5)
    assert set(res.terms) == {"denoise", "repa", "manifold"}
    assert res.terms["manifold"].item() == pytest.approx(float(manifold), rel=1e-5)
    assert res.terms["repa"].item() == pytest.approx(float(align + 3.0 * manifold), rel=1e-5)


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="USiT-tiny/2", method="urepa", batch_size=8, max_steps=6, ckpt_every=3, log_every=3,
                num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def test_urepa_trains_resumes_exactly_and_samples(tiny_cache, tmp_path):
    full = train(_cfg(tiny_cache, tmp_path / "a"))
    train(_cfg(tiny_cache, tmp_path / "b", max_steps=3))
    resumed = train(_cfg(tiny_cache, tmp_path / "b"))
    assert full.step == resumed.step == 6 and resumed.resumed_from == 3
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    assert a.card.method == {"name": "urepa", "options": {"proj_coeff": 0.5, "manifold_weight": 3.0}}
    assert a.card.model["layout"] == "u"
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "denoise", "repa", "manifold"} <= set(r) for r in rows)
    assert type(load_student(tmp_path / "a").model) is USiT
    res = sample(tmp_path / "a", tmp_path / "s", SampleConfig(num=2, steps=2, sampler="ode", device="cpu", grid=0, quiet=True))
    assert res.written == 2
    with pytest.raises(UsageError, match=r"^--method urepa needs a U-shaped model"):
        train(_cfg(tiny_cache, tmp_path / "c", model="SiT-tiny/2"))
