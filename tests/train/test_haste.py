"""HASTE: hidden teacher tokens in the cache (``--teacher-layers``), the teacher's remaining blocks
run on them, the attention cross-entropy and the whole objective against hand computations, no
teacher work after the stop step, refusals, and a tiny run that resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_cache.cache.errors import FingerprintMismatch, UsageError
from repa_cache.cache.reader import CacheReader
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages import teachers as teachers_mod
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.teachers import TeacherTail, get_teacher, load_teacher, teacher_metadata
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import plan_run, train
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.methods.haste import HasteSiT, attention_loss
from repa_cache.train.model import sit_config
from repa_cache.train.step import train_step

from ..conftest import tiny_config
from ..train.hand import hand_step


@pytest.fixture(scope="module")
def hidden_cache(demo_images, tmp_path_factory) -> Path:
    """float32 cache with hidden tokens: tiny entering block 2 (of 2), tiny-reg entering block 1 (blocks 1-2)."""
    out = tmp_path_factory.mktemp("haste") / "c"
    precompute(tiny_config(demo_images, out, teachers=("tiny", "tiny-reg"), feature_dtype="float32",
                           teacher_layers={"tiny": "2", "tiny-reg": "1-2"}))
    return out


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", teachers=("tiny",), method="haste", batch_size=8, max_steps=6, ckpt_every=3,
                log_every=3, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def _hand_logits(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(d) of a timm block written out: LayerNorm, the qkv linear, heads split."""
    attn = block.attn
    xn = F.layer_norm(h, (h.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = xn @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 3D)
    B, N, _ = h.shape
    q, k, _v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, N, N)


def test_hidden_tokens_through_the_remaining_blocks_equal_the_full_forward(hidden_cache):
    reader = CacheReader(hidden_cache)
    idx = reader.valid_indices()[:4]
    for name, first, prefix in (("tiny", 2, 1), ("tiny-reg", 1, 5)):
        group = f"teachers/{name}"
        meta = reader.group(group).meta.model
        assert meta["hidden"]["first_block"] == first and meta["hidden"]["num_tokens"] == prefix + 256
        assert reader.array_names(group) == ["patch", "cls", "hidden"]
        for view in (0, 1):
            data = reader.read_views(idx, np.full(len(idx), view), fields=[f"{group}/hidden", f"{group}/patch", f"{group}/cls"])
            model = load_teacher(get_teacher(name), 256)
            h = torch.from_numpy(data[f"{group}/hidden"])  # (B, P + T, D)
            out = model.norm(model.blocks[first - 1:](h))  # the rest of forward_features
            assert torch.equal(out[:, prefix:], torch.from_numpy(data[f"{group}/patch"]))  # bit for bit in float32
            assert torch.equal(out[:, 0], torch.from_numpy(data[f"{group}/cls"]))


def test_teacher_tail_gives_patch_to_patch_logits_of_each_block(hidden_cache):
    reader = CacheReader(hidden_cache)
    idx = reader.valid_indices()[:3]
    h = torch.from_numpy(reader.read(idx, fields=["teachers/tiny-reg/hidden"])["teachers/tiny-reg/hidden"][:, 0])
    model = load_teacher(get_teacher("tiny-reg"), 256)
    tail = TeacherTail(model, 1, 2)
    logits = tail(h)
    assert [tuple(a.shape) for a in logits] == [(3, 2, 256, 256)] * 2
    want1 = _hand_logits(model.blocks[0], h)[:, :, 5:, 5:]  # CLS and 4 registers removed
    want2 = _hand_logits(model.blocks[1], model.blocks[0](h))[:, :, 5:, 5:]
    torch.testing.assert_close(logits[0], want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], want2, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in tail.parameters())
    with pytest.raises(UsageError, match="outside the teacher's blocks 1..2"):
        TeacherTail(model, 2, 3)


def test_attention_loss_is_the_row_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 5, 5, generator=g), 2 * torch.randn(2, 3, 5, 5, generator=g)
    total, rows = 0.0, 0
    for b, hd, i in np.ndindex(2, 3, 5):
        p = np.exp(t[b, hd, i].double().numpy())
        p /= p.sum()
        z = s[b, hd, i].double().numpy()
        log_q = z - math.log(np.exp(z).sum())
        total += -(p * log_q).sum()
        rows += 1
    assert attention_loss(s, t).item() == pytest.approx(total / rows, rel=1e-6)
    same = attention_loss(t, t).item()  # the teacher's own entropy: the least the student can reach
    assert same < attention_loss(s, t).item()
    with pytest.raises(ValueError, match="does not match"):
        attention_loss(s, t[:, :2])


def _bound_method(**options):
    spec = get_teacher("tiny")
    record = teacher_metadata(spec, 256, layers=(2, 2))
    method = make_method("haste", options)
    method.bind(CacheContext(("tiny",), {"tiny": record}, {"tiny": state_dict_sha256(load_teacher(spec, 256))}, 256))
    return method


def test_haste_objective_against_a_hand_computation():
    method = _bound_method()
    mcfg = sit_config("SiT-tiny/2", num_classes=5, z_dims=(32,), projector_dim=16)  # 16x16 tokens, as the teacher
    g = torch.Generator().manual_seed(0)
    batch = StepBatch(torch.randn(4, 4, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g),
                      [torch.randn(4, 256, 32, generator=g)], [], [torch.randn(4, 257, 32, generator=g)])
    tr, zs, denoise = hand_step(method, mcfg, batch)
    assert isinstance(tr.model, HasteSiT) and tr.model.attn_blocks == {2} and tr.model.attn_heads == 2  # encoder_depth 2
    assert len(zs) == 2 and zs[1].shape == (4, 2, 256, 256)  # the student's first 2 of 4 heads
    teacher = load_teacher(get_teacher("tiny"), 256)
    target = _hand_logits(teacher.blocks[1], batch.hidden[0])[:, :, 1:, 1:]
    feat = -F.cosine_similarity(zs[0].double(), batch.patch[0].double(), dim=-1).mean()
    p = target.double().softmax(-1)
    attn = -(p * zs[1].double().log_softmax(-1)).sum(-1).mean()
    want = float(denoise + 0.5 * (feat + 1.0 * attn))
    torch.manual_seed(7)
    res = train_step(tr, batch, 0)
    assert res.loss.item() == pytest.approx(want, rel=1e-5)
    assert res.terms["attn"].item() == pytest.approx(float(attn), rel=1e-5)
    assert set(res.terms) == {"denoise", "repa", "attn"}


def test_haste_refuses_what_it_cannot_align(hidden_cache, tiny_cache, tmp_path):
    with pytest.raises(UsageError, match="needs the hidden tokens of teacher 'tiny'.*--teacher-layers"):
        plan_run(_cfg(tiny_cache, tmp_path / "r"))
    with pytest.raises(UsageError, match="aligns the attention of one teacher"):
        plan_run(_cfg(hidden_cache, tmp_path / "r", teachers=("tiny", "tiny-reg")))
    with pytest.raises(UsageError, match="aligns 3 heads per block, but the teacher has 2"):  # when the run is planned
        plan_run(_cfg(hidden_cache, tmp_path / "r", method_options={"heads": "3"}))
    with pytest.raises(UsageError, match="2 teacher blocks \\(1-2\\) with student blocks ending at 1"):
        plan_run(_cfg(hidden_cache, tmp_path / "r", teachers=("tiny-reg",), encoder_depth=1))
    with pytest.raises(UsageError, match="trains a flat SiT"):
        plan_run(_cfg(hidden_cache, tmp_path / "r", model="USiT-tiny/2"))
    record = teacher_metadata(get_teacher("tiny"), 256, layers=(2, 2))
    for bad in ({}, {"first_block": 2, "last_block": 1, "heads": 2, "depth": 2}, {**record["hidden"], "heads": "2"},
                {**record["hidden"], "last_block": 10**12}):
        with pytest.raises(UsageError, match="has an unreadable record of its hidden tokens"):
            make_method("haste").bind(CacheContext(("tiny",), {"tiny": {**record, "hidden": bad}}, {"tiny": ""}, 256))
    method = _bound_method()
    method._cache.weights["tiny"] = "0" * 64  # as if another teacher file wrote the cache
    with pytest.raises(UsageError, match="are not those that wrote the cache"):
        method.teacher_tail(torch.device("cpu"))


def test_teacher_layers_are_checked_before_anything_is_written(demo_images, hidden_cache, tmp_path, run_cli):
    out = tmp_path / "c"
    for layers, message in (({"*": "x"}, "takes FIRST or FIRST-LAST"),
                            ({"*": "3"}, "--teacher-layers 3 is outside the blocks 1..2 of teacher 'tiny'"),
                            ({"*": "2-1"}, "2-1 runs backwards"), ({"clip-vit-l": "9"}, "names teacher 'clip-vit-l'")):
        with pytest.raises(UsageError, match=message):
            precompute(tiny_config(demo_images, out, teacher_layers=layers))
        assert not out.exists()
    code, _, err = run_cli(["precompute", str(demo_images), str(out), "--vae", "tiny", "--teacher", "tiny",
                            "--teacher-layers", "0", "--device", "cpu", "-q"])
    assert code == 2 and "--teacher-layers 0 is outside" in err and "Traceback" not in err
    # an existing group keeps what it holds when not asked, and refuses other hidden tokens in one line
    again = precompute(tiny_config(demo_images, hidden_cache, teachers=("tiny", "tiny-reg"), feature_dtype="float32"))
    assert set(again.groups.values()) == {"already committed"}
    with pytest.raises(FingerprintMismatch, match="holds hidden tokens for blocks 2-2, and this command asks for "
                                                  "hidden tokens for blocks 1-2.*--latents-only"):
        precompute(tiny_config(demo_images, hidden_cache, teachers=("tiny",), feature_dtype="float32", teacher_layers={"*": "1"}))


def test_hidden_tokens_for_a_cache_made_without_them_keep_its_latents(demo_images, tiny_cache, tmp_path, run_cli):
    with pytest.raises(FingerprintMismatch, match="holds no hidden tokens, and this command asks for hidden tokens for blocks 2-2"):
        precompute(tiny_config(demo_images, tiny_cache, teacher_layers={"*": "2"}))
    new = tmp_path / "new"
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(new), "--latents-only", "-q"])
    assert code == 0 and "latents: copied" in out and "teachers/" not in out, err
    res = precompute(tiny_config(demo_images, new, teacher_layers={"*": "2"}))
    assert res.groups == {"latents": "already committed", "teachers/tiny": "written"}
    old_r, new_r = CacheReader(tiny_cache), CacheReader(new)
    idx = old_r.valid_indices()
    a, b = old_r.read(idx, fields=["latents/mean", "teachers/tiny/patch"]), new_r.read(idx, fields=["latents/mean", "teachers/tiny/patch"])
    assert np.array_equal(a["latents/mean"], b["latents/mean"]) and np.array_equal(a["teachers/tiny/patch"], b["teachers/tiny/patch"])
    assert new_r.array_names("teachers/tiny") == ["patch", "cls", "hidden"]
    code, _, err = run_cli(["cache", "copy", str(tiny_cache), str(tmp_path / "x"), "--latents-only", "--teacher", "tiny"])
    assert code == 2 and "--latents-only copies no teacher" in err


def test_after_the_stop_no_hidden_token_is_read_and_no_teacher_block_runs(hidden_cache, tmp_path, monkeypatch):
    setup = plan_run(_cfg(hidden_cache, tmp_path / "r", align_schedule="stop:2"))
    assert setup.data_fields() == ((0, ("patch", "hidden")), (2, ()))
    calls = []
    real = TeacherTail.forward

    def counting(self, hidden):
        calls.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(TeacherTail, "forward", counting)
    train(_cfg(hidden_cache, tmp_path / "a", align_schedule="stop:2", max_steps=4, ckpt_every=4))
    assert calls == [8, 8]  # steps 0 and 1 only

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was loaded after the stop")

    monkeypatch.setattr(teachers_mod, "load_teacher", no_teacher)  # HASTE imports the registry when it loads its teacher
    res = train(_cfg(hidden_cache, tmp_path / "a", align_schedule="stop:2", max_steps=6, ckpt_every=4))
    assert res.resumed_from == 4 and res.step == 6 and calls == [8, 8]


@pytest.mark.slow
def test_haste_trains_resumes_exactly_and_samples(hidden_cache, tmp_path):
    full = train(_cfg(hidden_cache, tmp_path / "a", teachers=("tiny-reg",), encoder_depth=3))
    train(_cfg(hidden_cache, tmp_path / "b", teachers=("tiny-reg",), encoder_depth=3, max_steps=3))
    resumed = train(_cfg(hidden_cache, tmp_path / "b", teachers=("tiny-reg",), encoder_depth=3))
    assert full.step == resumed.step == 6 and resumed.resumed_from == 3
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    assert a.card.method["name"] == "haste" and "attn" in full.last_metrics
    res = sample(tmp_path / "a", tmp_path / "s", SampleConfig(num=2, steps=2, sampler="ode", device="cpu", grid=0, quiet=True))
    assert res.written == 2


def test_an_int8_cache_feeds_the_teacher_tail_within_the_codec_error(hidden_cache, tmp_path):
    from repa_cache.cache.copy import copy_cache
    from repa_cache.cache.format import LatentNorm
    from repa_cache.train.data import CacheBatches, DataConfig, to_device

    copy_cache(hidden_cache, tmp_path / "q", feature_codec="int8", quiet=True)
    batches = {}
    for name, root in (("f32", hidden_cache), ("int8", tmp_path / "q")):
        ds = CacheBatches(DataConfig(str(root), ("tiny",), 8, teacher_fields=((0, ("patch", "hidden")),), num_workers=0))
        norm = LatentNorm.of_latents(CacheReader(root).group("latents").meta.model)
        torch.manual_seed(0)
        batches[name] = to_device(ds[0], norm, ("tiny",), torch.device("cpu"), ds.codecs)
    exact, quantised = batches["f32"].hidden[0], batches["int8"].hidden[0]
    assert exact.shape == quantised.shape == (8, 257, 32)
    assert F.cosine_similarity(exact, quantised, dim=-1).min() > 0.9999  # per token, as the codec promises
    tail = TeacherTail(load_teacher(get_teacher("tiny"), 256), 2, 2)
    (a,), (b,) = tail(exact), tail(quantised)
    p, q = a.softmax(-1), b.softmax(-1)
    assert (p - q).abs().sum(-1).max() < 1e-3  # L1 distance of every attention row (measured 1.5e-4)
