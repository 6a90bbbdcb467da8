"""The sampling job, checkpoint loading and the alignment job on a tiny trained-looking run.

One small cache (tiny VAE, tiny teacher, 64 px) and a hand-written checkpoint of a SiT-tiny with
perturbed weights, in the trainer's format, are shared by the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import eval.sample as sample_mod
from cache.errors import CacheError, UsageError
from cache.format import sha256_json
from cache.reader import CacheReader
from eval.align import align, alignment_metrics
from eval.sample import load_checkpoint_for_eval, png_name, sample
from eval.samplers import SampleNoise, SamplerConfig, sample_labels, sample_latents
from pipeline.demo import make_demo_images
from pipeline.plan import PrecomputeConfig
from pipeline.precompute import precompute
from stages.vae import VAESpec, load_vae
from train.loss import repa_loss
from train.model import SiT, sit_config

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval-job")
    make_demo_images(root / "images", per_class=2)
    cache = root / "cache"
    precompute(PrecomputeConfig(data=str(root / "images"), out=str(cache), resolution=64, vae="tiny",
                                teachers=("tiny",), flip=False, shard_size=8, batch_size=8, device="cpu",
                                workers=1, processes=False, quiet=True))
    reader = CacheReader(cache, groups=["latents", "tiny"])
    cache_info = {
        "base_fingerprint": sha256_json(reader.meta.base_fingerprint),
        "groups": {g: info.commit["fingerprint_hash"] for g, info in reader.groups.items()},
        "weights": {g: info.commit["weights_sha256"] for g, info in reader.groups.items()},
    }
    mcfg = sit_config("SiT-tiny/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, z_dims=(32,))
    torch.manual_seed(0)
    model, ema = SiT(mcfg), SiT(mcfg)
    with torch.no_grad():  # move off the zero init so outputs depend on inputs and labels
        for p, q in zip(model.parameters(), ema.parameters()):
            p.add_(0.05 * torch.randn_like(p))
            q.add_(0.05 * torch.randn_like(q))
    ema.eval()
    out = root / "run"
    (out / "checkpoints").mkdir(parents=True)
    config = {"cache": str(cache), "out": str(out), "model": "SiT-tiny/2", "teachers": ["tiny"],
              "encoder_depth": None, "seed": 0, "resample_teacher": False,
              "transport": {"path": "linear", "time_sampling": "uniform", "label_dropout": 0.1, "null_class": 1000}}
    torch.save({"kind": "repa-train-checkpoint", "version": 1, "step": 10, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": {}, "config": config, "cache": cache_info},
               out / "checkpoints" / "step-00000010.pt")
    torch.save({"kind": "repa-ema-weights", "version": 1, "step": 10, "ema": ema.state_dict(), "config": config,
                "cache": cache_info}, out / "checkpoints" / "ema-step-00000010.pt")
    (out / "config.json").write_text(json.dumps(
        {"train": config, "model": dataclasses.asdict(mcfg), "teachers": ["tiny"], "cache": cache_info}))
    return SimpleNamespace(root=root, cache=cache, dir=out, ema=ema, model=model, mcfg=mcfg, config=config,
                           cache_info=cache_info)


def _npz(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]


def _close_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to an occasional rounding step (float sums differ across batch sizes)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_sampling_job_writes_pngs_npz_and_grid(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = sample(run.dir, out, num=5, steps=3, sampler="ode", batch_size=2, device="cpu", grid=4, quiet=True)
    assert res.written == 5 and res.skipped == 0 and res.step == 10
    assert sorted(p.name for p in (out / "images").iterdir()) == [png_name(i) for i in range(5)]
    with np.load(out / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 64, 64, 3)
    assert labels.tolist() == sample_labels(0, range(5), NUM_CLASSES).tolist()
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / "images" / png_name(i))), arr[i])
    assert Image.open(out / "grid.png").size == (2 * 66 + 2, 2 * 66 + 2)

    # Sample 0 by hand: its seeded noise, the EMA weights, the cache's VAE and scale 0.18215.
    noise = SampleNoise(0, [0])
    z = sample_latents(run.ema, noise.randn((4, 8, 8)), torch.tensor(labels[:1]), SamplerConfig("ode", 3),
                       NUM_CLASSES, noise)
    img = load_vae(VAESpec("tiny")).decode(z / 0.18215).sample
    img = ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    _close_images(img[0], arr[0])


def test_samples_do_not_depend_on_world_size_or_batch_size(run: SimpleNamespace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(num=5, steps=3, sampler="sde", cfg_scale=2.0, guidance_interval=(0.0, 0.7), device="cpu",
                  grid=0, quiet=True, seed=3)
    one = sample(run.dir, tmp_path / "one", batch_size=5, **kwargs)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(sample_mod, "_dist_info", lambda: (1, 2))
    r1 = sample(run.dir, tmp_path / "two", batch_size=2, **kwargs)
    assert r1.npz is None and r1.written == 2
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == [png_name(1), png_name(3)]
    monkeypatch.setattr(sample_mod, "_dist_info", lambda: (0, 2))
    r0 = sample(run.dir, tmp_path / "two", batch_size=2, **kwargs)
    assert r0.written == 3 and r0.npz is not None
    _close_images(_npz(tmp_path / "one"), _npz(tmp_path / "two"))
    assert not np.array_equal(_npz(tmp_path / "one")[0], _npz(tmp_path / "one")[1])


def test_rerun_resumes_and_refuses_other_settings(run: SimpleNamespace, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    kwargs = dict(steps=2, sampler="ode", device="cpu", grid=0, quiet=True)
    sample(run.dir, out, num=4, batch_size=4, **kwargs)
    first = _npz(out)
    (out / "images" / png_name(2)).unlink()
    (out / "samples.npz").unlink()
    kept = (out / "images" / png_name(0)).stat().st_mtime_ns
    res = sample(run.dir, out, num=4, batch_size=4, **kwargs)
    assert (res.written, res.skipped) == (1, 3)
    assert (out / "images" / png_name(0)).stat().st_mtime_ns == kept
    _close_images(_npz(out), first)
    assert sample(run.dir, out, num=6, batch_size=4, **kwargs).written == 2  # more samples: only the new ones
    assert _npz(out).shape[0] == 6

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded although every sample exists")

    monkeypatch.setattr(sample_mod, "load_checkpoint_for_eval", no_model)
    assert sample(run.dir, out, num=6, **kwargs).written == 0
    with pytest.raises(UsageError, match="other settings"):
        sample(run.dir, out, num=6, cfg_scale=3.0, **kwargs)


def test_checkpoint_loading_uses_the_ema_weights(run: SimpleNamespace, tmp_path: Path) -> None:
    loaded = load_checkpoint_for_eval(run.dir)
    assert loaded.path.name == "ema-step-00000010.pt" and loaded.step == 10
    for a, b in zip(loaded.model.state_dict().values(), run.ema.state_dict().values()):
        assert torch.equal(a, b)
    full = load_checkpoint_for_eval(run.dir / "checkpoints" / "step-00000010.pt")
    assert torch.equal(full.model.final_layer.linear.weight, run.ema.final_layer.linear.weight)
    # A lone EMA file (no run config beside it): the shape is derived from the trainer config and the cache.
    lone = tmp_path / "weights.pt"
    shutil.copy(run.dir / "checkpoints" / "ema-step-00000010.pt", lone)
    assert load_checkpoint_for_eval(lone).model_config == run.mcfg


def test_bad_inputs_are_one_line_errors(run: SimpleNamespace, tmp_path: Path) -> None:
    def moved_cache_ckpt(**changes: object) -> Path:
        state = torch.load(run.dir / "checkpoints" / "ema-step-00000010.pt", weights_only=True)
        state.update(changes)
        path = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}.pt"
        torch.save(state, path)
        return path

    (tmp_path / "foreign.pt").parent.mkdir(exist_ok=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    kw = dict(num=2, steps=2, sampler="ode", device="cpu", quiet=True)
    cases = [
        (lambda: sample(run.dir, tmp_path / "o1", **{**kw, "num": 0}), UsageError, "--num"),
        (lambda: sample(run.dir, tmp_path / "o2", guidance_interval=(0.5, 1.5), **kw), UsageError, "within [0, 1]"),
        (lambda: sample(run.dir, tmp_path / "o3", guidance_interval=(0.7, 0.2), **kw), UsageError, "LOW <= HIGH"),
        (lambda: sample(tmp_path / "foreign.pt", tmp_path / "o4", **kw), UsageError, "not a checkpoint of this tool"),
        (lambda: sample(tmp_path / "notes.txt", tmp_path / "o5", **kw), UsageError, "not a checkpoint of this tool"),
        (lambda: sample(tmp_path / "nowhere", tmp_path / "o6", **kw), UsageError, "no checkpoint"),
        (lambda: sample(tmp_path / "empty-run", tmp_path / "o7", **kw), UsageError, "holds no checkpoint"),
        (lambda: sample(run.dir, tmp_path / "o8", classes=[NUM_CLASSES], **kw), UsageError, "--class"),
        (lambda: sample(run.dir, tmp_path / "busy", **kw), UsageError, "not empty"),
        (lambda: sample(run.dir, tmp_path / "o9", sampler="sde", heun=True, num=2), UsageError, "--heun"),
        (lambda: sample(moved_cache_ckpt(config={**run.config, "cache": str(tmp_path / "gone")}), tmp_path / "o10", **kw),
         CacheError, "missing"),
        (lambda: sample(moved_cache_ckpt(cache={**run.cache_info, "groups": {"latents": "0" * 64}}), tmp_path / "o11", **kw),
         CacheError, "not the one the checkpoint was trained on"),
        (lambda: align(run.dir, num=0), UsageError, "--num"),
        (lambda: align(run.dir, device="gpu0"), UsageError, "unknown device"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "o4").exists()


def test_alignment_job_and_trainer_hook(run: SimpleNamespace) -> None:
    res = align(run.dir, num=9, k=3, batch_size=4, device="cpu")
    assert res["num"] == 9 and res["step"] == 10 and set(res["teachers"]) == {"tiny"}
    m = res["teachers"]["tiny"]
    assert -1 <= m["cos"] <= 1 and -1 <= m["cknna"] <= 1.0 + 1e-9 and 0 <= m["mutual_knn"] <= 1

    # The trainer hook: same numbers for any batch size; the model's mode is restored.
    model = run.model.train()
    a = alignment_metrics(model, run.cache, ["tiny"], num=6, k=2, batch_size=6)
    b = alignment_metrics(model, run.cache, ["tiny"], num=6, k=2, batch_size=4)
    assert model.training and a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5)

    # The mean cosine is the REPA objective's cosine on the last valid samples at t = 0.5.
    reader = CacheReader(run.cache, groups=["latents", "tiny"])
    idx = reader.valid_indices()[-6:]
    data = reader.read(idx, ["latents", "tiny"])
    x0 = torch.from_numpy(data["latents/mean"][:, 0]) * 0.18215
    eps = SampleNoise(0, idx.tolist()).randn((4, 8, 8)).float()
    with torch.no_grad():
        _, zs = model.eval()(0.5 * x0 + 0.5 * eps, torch.full((6,), 0.5), torch.from_numpy(data["label"]))
    _, cos = repa_loss(zs, [torch.from_numpy(data["teachers/tiny/patch"][:, 0]).float()])
    assert a["align/cos/tiny"] == pytest.approx(float(cos[0]), abs=1e-5)
