"""``--method gmem``: the condition path against a hand computation, the per-sample null-condition
dropout at its rate, one step's loss by hand, the memory bank (export round trip, hostile files),
and a tiny run through the CLI that resumes exactly, writes training grids and samples."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_cache.cache.errors import UsageError
from repa_cache.cache.reader import CacheReader
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig, TransportConfig
from repa_cache.train.loop import plan_run
from repa_cache.train.methods import make_method, method_from_card
from repa_cache.train.methods.base import StepBatch
from repa_cache.train.methods.gmem import CacheBank, GMemSiT, NpyBank, export_bank, open_bank
from repa_cache.train.model import sit_config
from repa_cache.train.schedule import MAIN, WARMUP
from repa_cache.train.step import build_trainer, train_step
from repa_cache.train.transport import Transport

from ..train.hand import kick

CPU = torch.device("cpu")
Z = 6


def _batch(n: int = 4, classes: int = 5) -> tuple[object, StepBatch]:
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=classes, z_dims=(Z,), projector_dim=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    patch = [3 * torch.randn(n, mcfg.num_tokens, Z, generator=g) + 1]
    cls = [5 * torch.randn(n, Z, generator=g)]  # raw tokens, far from unit length
    return mcfg, StepBatch(x, y, patch, cls)


def _unit(c: torch.Tensor) -> torch.Tensor:
    """Rows of c scaled to unit length, in float64, written out."""
    c = c.double()
    return c / c.pow(2).sum(dim=1, keepdim=True).sqrt()


# ------------------------------------------------------------------------------------ the method


def test_registry_options_and_cache_check():
    m = make_method("gmem")
    assert m.card() == {"name": "gmem", "options": {"proj_coeff": 0.5, "cond_dropout": 0.4}}
    assert method_from_card({"name": "gmem", "options": {"cond_dropout": 0.1}}).options.cond_dropout == 0.1
    assert m.teacher_fields(True) == ("cls", "patch") and m.teacher_fields(False) == ("cls",)
    assert m.samples_from_bank() and not make_method("repa").samples_from_bank()
    with pytest.raises(UsageError) as e:
        make_method("gmem", {"cond_dropout": "1.5"})
    assert str(e.value) == "gmem cond_dropout must be in [0, 1], got 1.5"
    with pytest.raises(UsageError) as e:
        m.check_cache({"tiny": ["patch"]})
    assert str(e.value) == "--method gmem needs the CLS token of teacher 'tiny', which the cache does not hold"
    m.check_cache({"tiny": ["patch", "cls"]})


def test_condition_is_t_embed_plus_linear_of_the_normalised_cls_and_drives_the_forward():
    mcfg, batch = _batch()
    model = make_method("gmem").build_student(mcfg)
    assert isinstance(model, GMemSiT) and not hasattr(model, "y_embedder")
    assert not any(n.startswith("y_embedder") for n in model.state_dict())
    assert torch.equal(model.cond_embedder.bias, torch.zeros(mcfg.hidden_size))  # the public code's init
    kick(model)
    model.eval()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    c = make_method("gmem").condition(batch)
    torch.testing.assert_close(c.double(), _unit(batch.cls[0]), rtol=0, atol=3e-7)

    # adaLN condition by hand: the timestep MLP on the frequencies, plus W n + b, in float64
    freq = torch.cat([torch.cos(t.double()[:, None] * torch.exp(-math.log(10000) * torch.arange(128).double() / 128)),
                      torch.sin(t.double()[:, None] * torch.exp(-math.log(10000) * torch.arange(128).double() / 128))], 1)
    l1, l2 = model.t_embedder.mlp[0], model.t_embedder.mlp[2]
    h = freq @ l1.weight.double().T + l1.bias.double()
    t_emb = (h * torch.sigmoid(h)) @ l2.weight.double().T + l2.bias.double()
    W, b = model.cond_embedder.weight.double(), model.cond_embedder.bias.double()
    want = t_emb + _unit(batch.cls[0]) @ W.T + b  # (B, D)
    with torch.no_grad():
        got = model.condition(t, c)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        # the null condition (zeros) leaves the bias alone
        torch.testing.assert_close(model.condition(t, torch.zeros_like(c)).double(), t_emb + b, rtol=1e-5, atol=1e-5)

        # the forward is the SiT's on that condition: blocks and final layer written out
        v, zs = model(batch.x, t, c)
        hh = model.x_embedder(batch.x).flatten(2).transpose(1, 2) + model.pos_embed
        cc = want.float()
        for i, block in enumerate(model.blocks, start=1):
            hh = block(hh, cc)
            if i == mcfg.encoder_depth:
                z_hand = model.projectors[0](hh)
        out = model.unpatchify(model.final_layer(hh, cc))
        torch.testing.assert_close(v, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(zs[0], z_hand, rtol=1e-4, atol=1e-5)
        other = model(batch.x, t, torch.roll(c, 1, dims=0))[0]
        assert not torch.allclose(other, v)  # the output depends on the condition
    with pytest.raises(ValueError, match=r"conditioned on \(B, Z\) float vectors"):
        model(batch.x, t, batch.y)


def test_feature_dropout_gives_the_null_condition_at_its_rate():
    n, p = 10_000, 0.4
    g = torch.Generator().manual_seed(4)
    cls = torch.randn(n, Z, generator=g) * 3 + 1
    batch = StepBatch(torch.randn(n, 1, 2, 2, generator=g), torch.zeros(n, dtype=torch.long), [], [cls])
    method, transport = make_method("gmem"), Transport(TransportConfig(label_dropout=0.0))
    torch.manual_seed(11)
    d = method.draw(transport, batch, MAIN)
    dropped = (d.y_used == 0).all(dim=1)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 4 * sd
    unit = F.normalize(cls, dim=-1)
    assert torch.equal(d.y_used[~dropped], unit[~dropped])  # kept rows: the normalised CLS, exactly
    torch.testing.assert_close(d.y_used[~dropped].double(), _unit(cls)[~dropped], rtol=0, atol=3e-7)
    # the order of draws: times, latent noise, then one coin per sample
    torch.manual_seed(11)
    t, eps, coins = torch.rand(n), torch.randn_like(batch.x), torch.rand(n) < p
    assert torch.equal(d.t, t) and torch.equal(d.noise, eps) and torch.equal(dropped, coins)
    # the warm-up draws the coins alone, at t = 0 and without noise
    torch.manual_seed(11)
    w = method.draw(transport, batch, WARMUP)
    assert torch.equal(w.t, torch.zeros(n)) and w.noise is None
    torch.manual_seed(11)
    assert torch.equal((w.y_used == 0).all(dim=1), torch.rand(n) < p)
    # no dropout: every row kept, and no coin drawn
    torch.manual_seed(11)
    d0 = make_method("gmem", {"cond_dropout": 0.0}).draw(transport, batch, MAIN)
    after = torch.rand(1)
    torch.manual_seed(11)
    torch.rand(n), torch.randn_like(batch.x)
    assert torch.equal(d0.y_used, unit) and torch.equal(after, torch.rand(1))


def test_one_step_objective_against_a_hand_computation():
    mcfg, batch = _batch()
    method = make_method("gmem", {"cond_dropout": 0.5})
    tr = build_trainer(mcfg, CPU, method=method, transport=TransportConfig(label_dropout=0.9), seed=2)
    kick(tr.model)
    model = copy.deepcopy(tr.model)
    torch.manual_seed(9)
    t = torch.rand(4)
    eps = torch.randn_like(batch.x)
    drop = torch.rand(4) < 0.5
    assert 0 < int(drop.sum()) < 4  # the seed drops some conditions and keeps others
    cond = torch.where(drop.unsqueeze(1), torch.zeros(4, Z, dtype=torch.float64), _unit(batch.cls[0])).float()
    tb = t.view(-1, 1, 1, 1)
    v_hat, zs = model((1 - tb) * batch.x + tb * eps, t, cond)
    denoise = (v_hat.double() - (eps - batch.x).double()).pow(2).mean().detach()
    repa = -F.cosine_similarity(zs[0].double(), batch.patch[0].double(), dim=-1).mean().detach()
    torch.manual_seed(9)
    res = train_step(tr, batch, 0)
    assert res.terms["denoise"].item() == pytest.approx(float(denoise), rel=1e-5)
    assert res.terms["repa"].item() == pytest.approx(float(repa), rel=1e-5, abs=1e-6)
    assert res.loss.item() == pytest.approx(float(denoise + 0.5 * repa), rel=1e-5)
    assert set(res.terms) == {"denoise", "repa"}
    assert tr.model.cond_embedder.weight.grad is not None and tr.model.cond_embedder.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ the memory bank


def _cache_cls(cache: Path, teacher: str = "tiny") -> torch.Tensor:
    """Every valid sample's CLS tokens (n * V, Z), view-minor, normalised: read here independently."""
    r = CacheReader(cache, groups=[f"teachers/{teacher}"])
    cls = r.read(r.valid_indices(), fields=[f"teachers/{teacher}/cls"])[f"teachers/{teacher}/cls"]  # (n, V, Z)
    assert cls.dtype == np.float16 and cls.shape[1] == len(r.views) == 2
    c = torch.from_numpy(cls.astype(np.float32)).reshape(-1, cls.shape[-1])
    return F.normalize(c, dim=-1)


def test_bank_export_round_trip_and_the_cli(tiny_cache, tmp_path, run_cli):
    want = _cache_cls(tiny_cache)
    path, entries, dim = export_bank(tiny_cache, tmp_path / "bank.npy")
    assert (entries, dim) == tuple(want.shape)
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == np.float32 and torch.equal(torch.from_numpy(arr), want)
    assert not list(tmp_path.glob(".*tmp"))
    # the cache read on demand gives the very entries the file holds
    cache_bank = open_bank(tiny_cache, "tiny", dim)
    ks = [5, 0, 17, 5, entries - 1]
    assert isinstance(cache_bank, CacheBank) and cache_bank.size == entries
    assert torch.equal(cache_bank.entries(ks), want[ks])
    file_bank = open_bank(path, "tiny", dim)
    assert isinstance(file_bank, NpyBank) and file_bank.size == entries
    torch.testing.assert_close(file_bank.entries(ks), want[ks], rtol=0, atol=3e-7)  # normalised again on use

    code, out, err = run_cli(["gmem-bank", str(tiny_cache), str(tmp_path / "cli.npy"), "--teacher", "tiny"])
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'cli.npy'}: {entries} entries of dimension {dim}"
    assert np.array_equal(np.load(tmp_path / "cli.npy"), arr)
    code, out, err = run_cli(["gmem-bank", str(tiny_cache), str(tmp_path / "x.npy"), "--teacher", "dino"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dino" in err
    mine = tmp_path / "mine.npy"
    mine.write_bytes(b"a file of the user's")
    code, out, err = run_cli(["gmem-bank", str(tiny_cache), str(mine), "--teacher", "tiny"])
    assert code == 2 and f"{mine} already exists" in err and mine.read_bytes() == b"a file of the user's"
    with pytest.raises(UsageError) as e:
        open_bank(tiny_cache, "tiny", dim + 1)
    assert str(e.value) == f"--bank {tiny_cache} holds {dim}-dimensional tokens, the model is conditioned on {dim + 1}"


def test_hostile_or_garbage_bank_files_are_refused_with_one_line(tmp_path):
    def refused(path: Path, dim: int = 4) -> str:
        with pytest.raises(UsageError) as e:
            open_bank(path, "tiny", dim)
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = "is not a bank (a float32 (N, Z) .npy from repa gmem-bank)"
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY\x01\x00" + b"garbage" * 20)
    assert refused(garbage) == f"--bank {garbage} {bad}"
    text = tmp_path / "text.npy"
    text.write_text("not an array at all")
    assert refused(text) == f"--bank {text} {bad}"
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert refused(pickled) == f"--bank {pickled} {bad}; it holds object (2,)"
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((3, 4), np.int32))
    assert refused(ints) == f"--bank {ints} {bad}; it holds int32 (3, 4)"
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(4, np.float32))
    assert refused(flat) == f"--bank {flat} {bad}; it holds float32 (4,)"
    short = tmp_path / "short.npy"
    np.save(short, np.ones((8, 4), np.float32))
    short.write_bytes(short.read_bytes()[:-5])
    size = short.stat().st_size
    assert refused(short) == f"--bank {short} {bad}; its header says float32 (8, 4) but the file has {size} bytes"
    huge = tmp_path / "huge.npy"  # a header that promises 2^45 entries, over a few bytes
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**45, 4)})
        f.write(b"\0" * 64)
    assert "its header says float32 (35184372088832, 4)" in refused(huge)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 4), np.nan, np.float32))
    with pytest.raises(UsageError, match="holds non-finite values"):
        open_bank(nan, "tiny", 4).entries([1])
    assert refused(tmp_path / "missing") == f"--bank {tmp_path / 'missing'}: no such cache or bank file"
    wrong_dim = tmp_path / "dim.npy"
    np.save(wrong_dim, np.ones((2, 5), np.float32))
    assert refused(wrong_dim) == f"--bank {wrong_dim} holds 5-dimensional tokens, the model is conditioned on 4"


# ------------------------------------------------------------------------------------ a tiny run


def _train_args(cache: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(out), "--model", "SiT-tiny/2", "--method", "gmem",
            "--batch-size", "8", "--max-steps", str(steps), "--ckpt-every", "3", "--log-every", "3", "--workers", "0",
            "--device", "cpu", "--sample-every", "3", "-q"]


@pytest.mark.slow
def test_a_gmem_run_resumes_exactly_and_samples_from_a_bank(tiny_cache, tmp_path, run_cli):
    setup = plan_run(TrainConfig(cache=str(tiny_cache), out=str(tmp_path / "p"), model="SiT-tiny/2", method="gmem"))
    assert setup.data_fields() == ((0, ("cls", "patch")),)
    for run, steps in ((tmp_path / "a", [6]), (tmp_path / "b", [3, 6])):
        for s in steps:
            code, _, err = run_cli(_train_args(tiny_cache, run, s))
            assert code == 0, err
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert a.step == b.step == 6 and a.card.method == {"name": "gmem", "options": {"proj_coeff": 0.5, "cond_dropout": 0.4}}
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    assert "cond_embedder.weight" in a.model and not any(k.startswith("y_embedder") for k in a.model)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all({"denoise", "repa"} <= set(r) for r in rows)
    # the training grids, drawn from the training cache's bank, are the same across the resume
    for step in (3, 6):
        assert (tmp_path / "a" / "samples" / f"step-{step:08d}.png").read_bytes() == \
            (tmp_path / "b" / "samples" / f"step-{step:08d}.png").read_bytes()

    sample = ["sample", "--ckpt", str(tmp_path / "a"), "--num", "3", "--sampler", "ode", "--steps", "2", "--cfg", "2",
              "--guidance-interval", "0,1", "--device", "cpu", "--grid", "0", "-q"]
    code, _, err = run_cli([*sample, "--out", str(tmp_path / "none")])
    assert code == 2 and err.strip() == (
        "error: this model (--method gmem) is conditioned on memory-bank entries, not classes: pass --bank CACHE "
        "(a cache with its teacher's CLS tokens) or --bank FILE.npy (from repa gmem-bank)")
    assert not (tmp_path / "none" / "sample.json").exists()
    code, out, err = run_cli([*sample, "--out", str(tmp_path / "s"), "--bank", str(tiny_cache)])
    assert code == 0 and "3 written" in out, err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape[0] == 3 and "arr_1" not in f.files  # bank conditions have no class
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["bank"] == str(tiny_cache.resolve())
    # the alignment metrics condition the student on each sample's own CLS token
    code, out, err = run_cli(["align", "--ckpt", str(tmp_path / "a"), "--cache", str(tiny_cache), "--num", "12", "--k", "3",
                              "--device", "cpu"])
    assert code == 0, err
    cos = json.loads(out)["teachers"]["tiny"]["cos"]
    assert math.isfinite(cos) and -1.0 <= cos <= 1.0
