"""The sampling job, checkpoint loading and the alignment job.

One small cache (tiny VAE, tiny teacher, 64 px) and a checkpoint of a SiT-tiny with perturbed
weights, written by the trainer's own checkpoint code with the trainer's model card, are shared by
the module. The last test trains a real tiny run, deletes its cache and samples from the run
folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import repa_cache.eval.sample as sample_mod
from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.eval.align import align
from repa_cache.eval.config import AlignConfig, SampleConfig
from repa_cache.eval.images import make_grid, png_name
from repa_cache.eval.sample import grid_title, sample
from repa_cache.eval.samplers import SamplerConfig, sample_labels, sample_latents
from repa_cache.pipeline.demo import make_demo_images
from repa_cache.pipeline.plan import PrecomputeConfig
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages.vae import VAESpec, load_vae
from repa_cache.train.alignment import alignment_metrics
from repa_cache.train.checkpoint import save_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import plan_run, train
from repa_cache.train.model import SiT, sit_config
from repa_cache.train.noise import SampleNoise
from repa_cache.train.student import load_student

NUM_CLASSES = 4
#: Fast settings of the sampling job for these tests.
QUICK = SampleConfig(steps=3, sampler="ode", device="cpu", grid=0, quiet=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval-job")
    make_demo_images(root / "images", per_class=2)
    cache = root / "cache"
    precompute(PrecomputeConfig(data=str(root / "images"), out=str(cache), resolution=64, vae="tiny",
                                teachers=("tiny",), flip=False, shard_size=8, batch_size=8, device="cpu",
                                workers=1, processes=False, quiet=True))
    out = root / "run"
    setup = plan_run(TrainConfig(cache=str(cache), out=str(out), model="SiT-tiny/2", device="cpu"))
    mcfg = setup.model_config
    assert mcfg == sit_config("SiT-tiny/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, z_dims=(32,))
    torch.manual_seed(0)
    model, ema = SiT(mcfg), SiT(mcfg)
    with torch.no_grad():  # move off the zero init so outputs depend on inputs and labels
        for p, q in zip(model.parameters(), ema.parameters()):
            p.add_(0.05 * torch.randn_like(p))
            q.add_(0.05 * torch.randn_like(q))
    ema.eval()
    save_checkpoint(out, 10, model, ema, torch.optim.AdamW(model.parameters()), setup.card)
    return SimpleNamespace(root=root, cache=cache, dir=out, ema=ema, model=model, mcfg=mcfg, card=setup.card)


def _npz(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]


def _close_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to an occasional rounding step (float sums differ across batch sizes)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_sampling_job_writes_pngs_npz_and_grid(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = sample(run.dir, out, dataclasses.replace(QUICK, num=5, batch_size=2, grid=4))
    assert res.written == 5 and res.skipped == 0 and res.step == 10
    assert sorted(p.name for p in (out / "images").iterdir()) == [png_name(i) for i in range(5)]
    with np.load(out / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 64, 64, 3)
    assert labels.tolist() == sample_labels(0, range(5), NUM_CLASSES).tolist()
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / "images" / png_name(i))), arr[i])
    # 2 x 2 tiles of 64 px with 2 px gaps, a 12 px label strip under each and a 12 px title line above
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (14 + 2 * (64 + 12 + 2) + 2, 2 * 66 + 2, 3)
    for k in range(4):
        y, x = 16 + (k // 2) * 78, 2 + (k % 2) * 66
        assert np.array_equal(grid[y:y + 64, x:x + 64], arr[k]), k
        assert (grid[y + 64:y + 76, x:x + 64] < 128).any(), k  # its label is written under it
    assert (grid[2:14] < 128).any()  # the title
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))  # atomic writes leave no temporaries

    # Sample 0 by hand: its seeded noise, the EMA weights, the card's VAE and scale 0.18215.
    noise = SampleNoise(0, [0])
    z = sample_latents(run.ema, noise.randn((4, 8, 8)), torch.tensor(labels[:1]), SamplerConfig("ode", 3),
                       NUM_CLASSES, noise)
    img = load_vae(VAESpec("tiny")).decode(z / 0.18215).sample
    img = ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    _close_images(img[0], arr[0])


def test_samples_do_not_depend_on_world_size_or_batch_size(run: SimpleNamespace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dataclasses.replace(QUICK, num=5, sampler="sde", cfg_scale=2.0, guidance_interval=(0.0, 0.7), seed=3)
    one = sample(run.dir, tmp_path / "one", dataclasses.replace(cfg, batch_size=5))
    assert one.written == 5
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(sample_mod, "_dist_info", lambda: (1, 2))
    r1 = sample(run.dir, tmp_path / "two", dataclasses.replace(cfg, batch_size=2))
    assert r1.npz is None and r1.written == 2
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == [png_name(1), png_name(3)]
    monkeypatch.setattr(sample_mod, "_dist_info", lambda: (0, 2))
    r0 = sample(run.dir, tmp_path / "two", dataclasses.replace(cfg, batch_size=2))
    assert r0.written == 3 and r0.npz is not None
    _close_images(_npz(tmp_path / "one"), _npz(tmp_path / "two"))
    assert not np.array_equal(_npz(tmp_path / "one")[0], _npz(tmp_path / "one")[1])


def test_rerun_resumes_and_refuses_other_settings(run: SimpleNamespace, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    cfg = dataclasses.replace(QUICK, steps=2, num=4, batch_size=4)
    sample(run.dir, out, cfg)
    first = _npz(out)
    (out / "images" / png_name(2)).unlink()
    (out / "samples.npz").unlink()
    kept = (out / "images" / png_name(0)).stat().st_mtime_ns
    res = sample(run.dir, out, cfg)
    assert (res.written, res.skipped) == (1, 3)
    assert (out / "images" / png_name(0)).stat().st_mtime_ns == kept
    _close_images(_npz(out), first)
    assert sample(run.dir, out, dataclasses.replace(cfg, num=6)).written == 2  # more samples: only the new ones
    assert _npz(out).shape[0] == 6

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded although every sample exists")

    monkeypatch.setattr(sample_mod, "load_student", no_model)
    assert sample(run.dir, out, dataclasses.replace(cfg, num=6, batch_size=QUICK.batch_size)).written == 0
    with pytest.raises(UsageError, match="other settings"):
        sample(run.dir, out, dataclasses.replace(cfg, num=6, cfg_scale=3.0))


def test_checkpoint_loading_uses_the_card_and_the_ema_weights(run: SimpleNamespace, tmp_path: Path) -> None:
    loaded = load_student(run.dir)
    assert loaded.path.name == "ema-step-00000010.pt" and loaded.step == 10
    for a, b in zip(loaded.model.state_dict().values(), run.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    full = load_student(run.dir / "checkpoints" / "step-00000010.pt")
    assert torch.equal(full.model.final_layer.linear.weight, run.ema.final_layer.linear.weight)
    # A lone EMA file, away from its run and its cache: the card alone describes the model.
    lone = tmp_path / "weights.pt"
    shutil.copy(run.dir / "checkpoints" / "ema-step-00000010.pt", lone)
    alone = load_student(lone)
    assert alone.config == run.mcfg and alone.null_class == NUM_CLASSES
    assert alone.card.teachers == ("tiny",) and alone.card.path == "linear"
    assert alone.card.norm == LatentNorm((0.18215,), (0.0,))
    assert alone.card.vae["id"] == "tiny" and len(alone.card.vae["weights_sha256"]) == 64


def _edited_checkpoint(run: SimpleNamespace, folder: Path, **card_changes: object) -> Path:
    """A copy of the run's EMA file whose model card has ``card_changes``."""
    state = torch.load(run.dir / "checkpoints" / "ema-step-00000010.pt", weights_only=True)
    state["card"] = {**state["card"], **card_changes}
    path = folder / f"ckpt-{len(list(folder.iterdir()))}.pt"
    torch.save(state, path)
    return path


def test_unset_sampler_settings_are_the_ones_the_card_records(run: SimpleNamespace, tmp_path: Path) -> None:
    """A job takes each sampler setting it leaves unset from the card's record of the method's; a
    card without the record (written before it existed) samples with REPA's, as it always did."""
    assert run.card.sampling == {"sampler": "sde", "steps": 250, "heun": False, "cfg_scale": 1.0,
                                 "guidance_interval": [0.0, 0.7], "cls_cfg_scale": None}  # the trainer records REPA's
    edits = tmp_path / "cards"
    edits.mkdir()
    record = {"sampler": "ode", "steps": 2, "heun": True, "cfg_scale": 2.5, "guidance_interval": [0.1, 0.9], "cls_cfg_scale": 3.0}
    recorded = _edited_checkpoint(run, edits, sampling=record)
    bare = SampleConfig(num=1, batch_size=1, device="cpu", grid=0, quiet=True)

    def job(out: Path) -> dict:
        return {k: v for k, v in json.loads((out / "sample.json").read_text()).items()
                if k in ("sampler", "steps", "heun", "cfg_scale", "guidance_interval", "cls_cfg_scale")}

    sample(recorded, tmp_path / "a", bare)
    assert job(tmp_path / "a") == record
    sample(recorded, tmp_path / "b", dataclasses.replace(bare, cfg_scale=1.5, heun=False))  # typed settings win
    assert job(tmp_path / "b") == {**record, "heun": False, "cfg_scale": 1.5, "cls_cfg_scale": None}  # the CLS scale follows --cfg
    with pytest.raises(UsageError, match="other settings"):  # a rerun resolves them the same way, so a change is seen
        sample(recorded, tmp_path / "a", dataclasses.replace(bare, steps=3))

    state = torch.load(run.dir / "checkpoints" / "ema-step-00000010.pt", weights_only=True)
    del state["card"]["sampling"]
    torch.save(state, edits / "old.pt")
    sample(edits / "old.pt", tmp_path / "c", dataclasses.replace(bare, steps=2))
    assert job(tmp_path / "c") == {"sampler": "sde", "steps": 2, "heun": False, "cfg_scale": 1.0,
                                   "guidance_interval": [0.0, 0.7], "cls_cfg_scale": None}
    with pytest.raises(UsageError, match="^unreadable sampling record"):
        sample(_edited_checkpoint(run, edits, sampling={"steps": "many"}), tmp_path / "d", bare)


def test_bad_inputs_are_one_line_errors(run: SimpleNamespace, tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save({"kind": "repa-ema-weights", "version": 1, "ema": {}}, tmp_path / "old.pt")
    torch.save({"format": "repa-cache-checkpoint", "version": 99, "kind": "ema"}, tmp_path / "future.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    edits = tmp_path / "edited"
    edits.mkdir()
    other_vae = _edited_checkpoint(run, edits, vae={**run.card.vae, "weights_sha256": "0" * 64})
    moved = _edited_checkpoint(run, edits, train={**run.card.train, "cache": str(tmp_path / "gone")})
    other_cache = _edited_checkpoint(run, edits, cache={**run.card.cache, "groups": {"latents": "0" * 64}})
    cfg = dataclasses.replace(QUICK, num=2, steps=2)
    cases = [
        (lambda: sample(run.dir, tmp_path / "o1", dataclasses.replace(cfg, num=0)), UsageError, "--num"),
        (lambda: sample(run.dir, tmp_path / "o2", dataclasses.replace(cfg, guidance_interval=(0.5, 1.5))), UsageError,
         "within [0, 1]"),
        (lambda: sample(run.dir, tmp_path / "o3", dataclasses.replace(cfg, guidance_interval=(0.7, 0.2))), UsageError,
         "LOW <= HIGH"),
        (lambda: sample(tmp_path / "foreign.pt", tmp_path / "o4", cfg), UsageError, "not a checkpoint of this tool"),
        (lambda: sample(tmp_path / "old.pt", tmp_path / "o4", cfg), UsageError, "older version of this tool"),
        (lambda: sample(tmp_path / "future.pt", tmp_path / "o4", cfg), UsageError, "format version 99"),
        (lambda: sample(tmp_path / "notes.txt", tmp_path / "o5", cfg), UsageError, "not a readable checkpoint of this tool"),
        (lambda: sample(tmp_path / "nowhere", tmp_path / "o6", cfg), UsageError, "no checkpoint"),
        (lambda: sample(tmp_path / "empty-run", tmp_path / "o7", cfg), UsageError, "holds no checkpoint"),
        (lambda: sample(run.dir, tmp_path / "o8", dataclasses.replace(cfg, classes=(NUM_CLASSES,))), UsageError, "--class"),
        (lambda: sample(run.dir, tmp_path / "busy", cfg), UsageError, "not empty"),
        (lambda: sample(run.dir, tmp_path / "o9", dataclasses.replace(cfg, sampler="sde", heun=True)), UsageError, "--heun"),
        (lambda: sample(run.dir, tmp_path / "o9", dataclasses.replace(cfg, precision="fp16")), UsageError, "--precision"),
        (lambda: sample(other_vae, tmp_path / "o10", cfg), UsageError, "other weights"),
        (lambda: sample(run.dir, tmp_path / "o11", dataclasses.replace(cfg, vae=str(tmp_path / "no-vae"))), UsageError,
         "cannot load VAE"),
        (lambda: align(moved, AlignConfig(device="cpu")), CacheError, "missing"),
        (lambda: align(other_cache, AlignConfig(device="cpu")), CacheError, "not the one the checkpoint was trained on"),
        (lambda: align(run.dir, AlignConfig(cache=str(tmp_path / "gone"), device="cpu")), CacheError, "missing"),
        (lambda: align(run.dir, AlignConfig(num=0)), UsageError, "--num"),
        (lambda: align(run.dir, AlignConfig(device="gpu0")), UsageError, "unknown device"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "o4").exists()  # an unreadable checkpoint: nothing written
    for name in ("o10", "o11"):  # a wrong or missing VAE: refused before any sample is made
        assert not list((tmp_path / name).glob("images/*.png"))


def test_alignment_job_matches_the_trainer_measure(run: SimpleNamespace, tmp_path: Path) -> None:
    res = align(run.dir, AlignConfig(num=9, k=3, batch_size=4, device="cpu"))
    assert res["num"] == 9 and res["step"] == 10 and set(res["teachers"]) == {"tiny"}
    assert res["cache"] == str(run.cache)
    m = res["teachers"]["tiny"]
    assert -1 <= m["cos"] <= 1 and -1 <= m["cknna"] <= 1.0 + 1e-9 and 0 <= m["mutual_knn"] <= 1
    # The job is the trainer's measure on the EMA weights, teachers and normalisation of the card.
    direct = alignment_metrics(run.ema, run.cache, ["tiny"], num=9, k=3, batch_size=4)
    for name in ("cos", "cknna", "cknna_proj", "mutual_knn"):
        assert m[name] == pytest.approx(direct[f"align/{name}/tiny"], abs=1e-6)
    # A cache that moved is named with --cache; its fingerprints are those of the training cache.
    moved = tmp_path / "moved-cache"
    shutil.copytree(run.cache, moved)
    again = align(run.dir, AlignConfig(cache=str(moved), num=9, k=3, batch_size=4, device="cpu"))
    assert again["cache"] == str(moved) and again["teachers"] == res["teachers"]


def test_sampling_needs_only_the_run_folder(tiny_cache: Path, tmp_path: Path, run_cli) -> None:
    """Train a tiny run on a private copy of a cache, sample; delete the cache, sample again from
    the run folder alone (through the CLI): the same PNGs, byte for byte."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    run_dir = tmp_path / "run"
    train(TrainConfig(cache=str(cache), out=str(run_dir), model="SiT-tiny/2", batch_size=8, max_steps=2, ckpt_every=2,
                      log_every=2, num_workers=0, device="cpu", quiet=True))
    cfg = SampleConfig(num=3, sampler="ode", steps=2, batch_size=2, device="cpu", grid=3, quiet=True)
    first = sample(run_dir, tmp_path / "A", cfg)
    assert first.written == 3 and first.step == 2

    shutil.rmtree(cache)
    code, out, err = run_cli(["sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "B"), "--num", "3",
                              "--sampler", "ode", "--steps", "2", "--batch-size", "2", "--device", "cpu",
                              "--grid", "3", "--quiet"])
    assert code == 0, err
    assert "3 written" in out
    names = [png_name(i) for i in range(3)] + ["../grid.png"]
    a_bytes = [(tmp_path / "A" / "images" / n).read_bytes() for n in names]
    b_bytes = [(tmp_path / "B" / "images" / n).read_bytes() for n in names]
    assert a_bytes == b_bytes
    assert len(set(a_bytes[:3])) == 3  # and the samples differ from each other
    assert np.array_equal(_npz(tmp_path / "A"), _npz(tmp_path / "B"))


def test_raw_weights_are_the_trained_model(run: SimpleNamespace, tmp_path: Path) -> None:
    """--weights raw loads the checkpoint's trained weights, not the EMA (the two differ here):
    align measures them, and a sample folder records which weights made it."""
    raw = load_student(run.dir, "cpu", "raw").model
    for (name, a), b in zip(raw.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), name
    res = align(run.dir, AlignConfig(num=9, k=3, batch_size=4, device="cpu", weights="raw"))
    direct = alignment_metrics(run.model, run.cache, ["tiny"], num=9, k=3, batch_size=4)
    assert res["weights"] == "raw" and res["teachers"]["tiny"]["cos"] == pytest.approx(direct["align/cos/tiny"], abs=1e-6)
    ema = align(run.dir, AlignConfig(num=9, k=3, batch_size=4, device="cpu"))
    assert ema["teachers"]["tiny"]["cos"] != res["teachers"]["tiny"]["cos"]
    cfg = SampleConfig(num=2, sampler="ode", steps=2, batch_size=2, device="cpu", grid=0, quiet=True, weights="raw")
    sample(run.dir, tmp_path / "s", cfg)
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["weights"] == "raw"
    changed = r"holds samples made with other settings \(checkpoint: .*/step-00000010.pt -> .*/ema-step-00000010.pt; weights: raw -> ema\)"
    with pytest.raises(UsageError, match=changed):
        sample(run.dir, tmp_path / "s", dataclasses.replace(cfg, weights="ema"))
    with pytest.raises(UsageError, match="^--weights must be one of ema, raw, not 'best'$"):
        SampleConfig(weights="best")


def test_grid_labels_and_title_are_drawn_beside_the_tiles_not_over_them() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    plain = make_grid(tiles)
    assert plain.shape == (2 * 22 + 2, 2 * 26 + 2, 3) and np.array_equal(plain[2:22, 28:52], tiles[1])
    labelled = make_grid(tiles, labels=["class 7", "class 1", "class 3"], title="step 4 | cfg 4 | ODE, 50 steps")
    assert labelled.shape == (14 + 2 * (20 + 12 + 2) + 2, 2 * 26 + 2, 3)
    strips = []
    for k in range(3):
        y, x = 16 + (k // 2) * 34, 2 + (k % 2) * 26
        assert np.array_equal(labelled[y:y + 20, x:x + 24], tiles[k]), k
        strips.append(labelled[y + 20:y + 32, x:x + 24])
    assert all((s < 128).any() for s in strips) and not np.array_equal(strips[0], strips[1])  # each its own text
    assert (labelled[68:, 28:] == 255).all()  # the empty fourth cell stays white
    assert grid_title(4, SamplerConfig("sde", 250, cfg_scale=1.8, guidance_interval=(0.0, 0.7))) == \
        "step 4 | cfg 1.8 on t in [0, 0.7] | SDE, 250 steps"
