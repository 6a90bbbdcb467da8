"""Stage one end to end with the tiny presets: what the cache holds equals what the encoders
produce, resume and add-a-teacher do only the missing work, mismatches and bad input are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import zarr

from repa_cache.cache.errors import CacheError, FingerprintMismatch
from repa_cache.cache.format import record_path
from repa_cache.cache.reader import CacheReader
from repa_cache.pipeline.plan import sample_order
from repa_cache.pipeline.precompute import precompute
from repa_cache.pipeline.source import list_source
from repa_cache.stages.images import decode_and_crop
from repa_cache.stages.teachers import get_teacher, load_teacher
from repa_cache.stages.vae import VAESpec, load_vae

from ..conftest import HUNG, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _shard_crops(reader: CacheReader, data: Path, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid cache indices of the shard, their uint8 crops (n, 3, H, W)) decoded independently."""
    start, stop = reader.meta.shard_range(shard)
    idx, crops = [], []
    for i in range(start, stop):
        res = decode_and_crop((data / reader.keys[i]).read_bytes(), reader.meta.resolution)
        if res.image is not None:
            idx.append(i)
            crops.append(res.image)
    return np.array(idx), torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def encode_as_worker(vae, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_images`` with as many threads as the one local worker used: CPU results depend on
    the thread count in the last bits."""
    from repa_cache.stages.vae import encode_images

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return encode_images(vae, crops)
    finally:
        torch.set_num_threads(threads)


def test_stored_latents_equal_autoencoderkl_posterior(tiny_cache, demo_images):
    reader = CacheReader(tiny_cache)
    vae = load_vae(VAESpec("tiny"))
    for shard in range(reader.meta.num_shards):
        idx, crops = _shard_crops(reader, demo_images, shard)
        got = reader.read(idx)
        for v, images in enumerate([crops, crops.flip(-1)]):
            with torch.no_grad():
                dist = vae.encode(images.float() / 127.5 - 1).latent_dist
            np.testing.assert_array_equal(got["latents/mean"][:, v], dist.mean.numpy())
            np.testing.assert_array_equal(got["latents/std"][:, v], dist.std.numpy())


def timm_tokens(model: torch.nn.Module, spec, images: torch.Tensor) -> torch.Tensor:
    """A teacher's final-norm tokens (B, prefix + T, D) of uint8 crops, preprocessed by hand
    (bicubic to 224 px, the teacher's mean/std), as timm computes them."""
    x = F.interpolate(images.float() / 255, size=224, mode="bicubic", align_corners=False)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features(x)


def test_stored_teacher_tokens_equal_timm_final_norm_tokens(tiny_cache, demo_images):
    reader = CacheReader(tiny_cache)
    spec = get_teacher("tiny")
    model = load_teacher(spec, 256)
    idx, crops = _shard_crops(reader, demo_images, 0)
    got = reader.read(idx)
    for v, images in enumerate([crops, crops.flip(-1)]):
        tokens = timm_tokens(model, spec, images)  # (B, 1 + 256, D)
        np.testing.assert_array_equal(got["teachers/tiny/patch"][:, v], tokens[:, 1:].half().numpy())
        np.testing.assert_array_equal(got["teachers/tiny/cls"][:, v], tokens[:, 0].half().numpy())


def test_manifest_records_every_outcome_and_the_seeded_order(tiny_cache, demo_images):
    m = pq.read_table(tiny_cache / "manifest.parquet").to_pydict()
    listing = list_source(demo_images)
    order = sample_order(len(listing.items), seed=0)
    assert m["key"] == [listing.items[i].key for i in order]
    assert m["label"] == [listing.items[i].label for i in order]
    by_key = dict(zip(m["key"], zip(m["status"], m["reason"])))
    assert by_key["circles/grayscale_extra.png"] == ("converted", "mode L converted to RGB")
    status, reason = by_key["stripes/truncated_extra.jpg"]
    assert status == "skipped" and reason.startswith("corrupt or truncated image")
    assert sum(s == "skipped" for s in m["status"]) == 1
    reader = CacheReader(tiny_cache)
    assert reader.valid.sum() == len(m["key"]) - 1
    bad = m["key"].index("stripes/truncated_extra.jpg")
    arr = zarr.open_group(str(tiny_cache), mode="r")["latents/mean"]
    assert np.isnan(arr[bad]).all()  # never zeros: the fill, which readers refuse


def test_rerun_does_nothing(tiny_cache, demo_images, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    res = precompute(tiny_config(demo_images, copy))
    assert res.shards_written == 0
    assert res.groups == {"latents": "already committed", "teachers/tiny": "already committed"}


def test_resume_rewrites_only_missing_shards_bit_exact(tiny_cache, demo_images, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    # What a kill leaves behind: shard 1 of the latents and shard 2 of the teacher without records,
    # one of them with half-written data, and no commit records.
    record_path(copy, "latents", 1).unlink()
    record_path(copy, "teachers/tiny", 2).unlink()
    shutil.rmtree(copy / "_commits")
    (copy / "manifest.parquet").unlink()
    f = sorted(p for p in (copy / "latents" / "mean" / "c").rglob("*") if p.is_file())[1]
    f.write_bytes(f.read_bytes()[:100])
    res = precompute(tiny_config(demo_images, copy))
    assert res.shards_written == 2 and res.groups == {"latents": "resumed", "teachers/tiny": "resumed"}
    a, b = CacheReader(tiny_cache), CacheReader(copy)
    idx = a.valid_indices()
    for k, v in a.read(idx).items():
        np.testing.assert_array_equal(v, b.read(idx)[k])


def test_add_teacher_reads_images_again_but_not_the_vae(tiny_cache, demo_images, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    latent_files = {p: p.stat().st_mtime_ns for p in (copy / "latents").rglob("*") if p.is_file()}
    res = precompute(tiny_config(demo_images, copy, teachers=("tiny", "tiny-reg")))
    assert res.groups == {"latents": "already committed", "teachers/tiny": "already committed", "teachers/tiny-reg": "written"}
    assert {p: p.stat().st_mtime_ns for p in latent_files} == latent_files
    reader = CacheReader(copy, groups=["tiny-reg"])
    model = reader.group("tiny-reg").meta.model
    assert (model["num_tokens"], model["dim"], model["num_prefix_tokens"]) == (256, 48, 5)
    # Registers dropped: stored patch tokens are forward_features[:, 5:].
    idx, crops = _shard_crops(reader, demo_images, 1)
    spec = get_teacher("tiny-reg")
    x = F.interpolate(crops.float() / 255, size=224, mode="bicubic", align_corners=False)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = load_teacher(spec, 256).forward_features(x)
    np.testing.assert_array_equal(reader.read(idx)["teachers/tiny-reg/patch"][:, 0], tokens[:, 5:].half().numpy())


def test_a_v1_cache_resumes_and_takes_a_teacher_under_v2(tiny_cache, demo_images, tmp_path, monkeypatch):
    """A cache written before chunk checksums (format v1, its fingerprints saying so), killed
    mid-run: v2 code resumes its groups in their own layout, adds a teacher in the v2 layout, and
    the cache then says v2."""
    from repa_cache.cache.format import ROOT_ATTR
    from repa_cache.pipeline import groups, plan

    from ..cache.shards import written_as_v1

    old = tmp_path / "v1"
    with written_as_v1(monkeypatch), monkeypatch.context() as m:
        m.setattr(plan, "FORMAT_VERSION", 1)
        m.setattr(groups, "FORMAT_VERSION", 1)
        precompute(tiny_config(demo_images, old))
    assert zarr.open_group(str(old), mode="r").attrs[ROOT_ATTR]["format_version"] == 1
    record_path(old, "latents", 1).unlink()  # what a kill leaves
    shutil.rmtree(old / "_commits")
    (old / "manifest.parquet").unlink()
    res = precompute(tiny_config(demo_images, old, teachers=("tiny", "tiny-reg")))
    assert res.groups == {"latents": "resumed", "teachers/tiny": "resumed", "teachers/tiny-reg": "written"}
    assert zarr.open_group(str(old), mode="r").attrs[ROOT_ATTR]["format_version"] == 2
    r = CacheReader(old, verify_checksums=True)
    assert {g: info.chunk_checked for g, info in r.groups.items()} == {"latents": False, "teachers/tiny": False, "teachers/tiny-reg": True}
    assert "chunks" not in json.loads(record_path(old, "latents", 1).read_text())  # rewritten in the group's own layout
    idx = r.valid_indices()
    ref = CacheReader(tiny_cache).read(idx)
    got = r.read(idx)
    for k, v in ref.items():
        np.testing.assert_array_equal(v, got[k])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"resolution": 128}, "was made with other settings: resolution: 256 -> 128"),
        ({"seed": 7}, "was made with other settings: seed: 0 -> 7"),
        ({"flip": False}, 'views: ["orig","hflip"] -> ["orig"]'),
        ({"shard_size": 4}, "shard_size: 8 -> 4"),
        ({"feature_dtype": "float32"}, "group 'teachers/tiny' of .* was made with other settings: arrays"),
    ],
)
def test_fingerprint_mismatch_is_refused_naming_the_field(tiny_cache, demo_images, override, message):
    with pytest.raises(FingerprintMismatch, match=message.replace("[", r"\[").replace("]", r"\]") if "views" in message else message):
        precompute(tiny_config(demo_images, tiny_cache, **override))


def test_changed_dataset_is_refused(tiny_cache, demo_images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    (data / "gradient" / "gradient_000.png").unlink()
    with pytest.raises(FingerprintMismatch, match="listing \\(changed\\); num_samples: 22 -> 21"):
        precompute(tiny_config(data, tiny_cache))


def test_webdataset_source(demo_images, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    files = sorted(p for p in demo_images.rglob("*.png") if "extra" not in p.name)
    classes = sorted(d.name for d in demo_images.iterdir())
    for t in range(2):
        with tarfile.open(shards / f"part-{t:04d}.tar", "w") as tar:
            for i, p in enumerate(files[t::2]):
                tar.add(p, arcname=f"s{t}{i:04d}.png")
                cls = (str(classes.index(p.parent.name))).encode()
                info = tarfile.TarInfo(f"s{t}{i:04d}.cls")
                info.size = len(cls)
                import io

                tar.addfile(info, io.BytesIO(cls))
    res = precompute(tiny_config(shards, tmp_path / "c"))
    reader = CacheReader(res.root)
    assert reader.num_samples == len(files) and reader.valid.all()
    by_name = {f"part-{t:04d}.tar/s{t}{i:04d}": classes.index(p.parent.name) for t in range(2) for i, p in enumerate(files[t::2])}
    assert {k: int(lab) for k, lab in zip(reader.keys, reader.labels)} == by_name


def test_stats_numbers_match_the_stored_arrays(tiny_cache):
    from repa_cache.cache.stats import cache_stats, format_stats

    s = cache_stats(tiny_cache)
    statuses = pq.read_table(tiny_cache / "manifest.parquet").column("status").to_pylist()
    assert s["samples"] == 22 and s["outcomes"] == {k: statuses.count(k) for k in set(statuses)}
    assert s["outcomes"]["skipped"] == 1 and s["outcomes"]["converted"] >= 1
    assert s["per_class"] == {"checkers": 5, "circles": 6, "gradient": 5, "stripes": 5}
    assert s["skipped_by_reason"] == {"corrupt or truncated image": 1}
    reader = CacheReader(tiny_cache)
    data = reader.read(reader.valid_indices())
    mean = data["latents/mean"].astype(np.float64)
    np.testing.assert_allclose(s["groups"]["latents"]["latent_stats"]["channel_mean"], mean.mean(axis=(0, 1, 3, 4)), atol=1e-5)
    norms = np.linalg.norm(data["teachers/tiny/patch"].astype(np.float32), axis=-1)
    assert s["groups"]["teachers/tiny"]["feature_stats"]["patch_norm_mean"] == pytest.approx(norms.mean(), abs=1e-3)
    assert s["groups"]["latents"]["model"]["tiny"] is True
    text = format_stats(s)
    assert "[TINY random-init preset]" in text and "22 in 3 shards of 8" in text


def test_cli_stats_json_plot_and_verify(tiny_cache, tmp_path, run_cli):
    code, out, _ = run_cli(["stats", str(tiny_cache), "--json", "--plot", str(tmp_path / "s.png")])
    assert code == 0 and json.loads(out)["samples"] == 22
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(["verify", str(tiny_cache), "-q"])
    assert code == 0 and out.startswith("ok: 6 shards in 2 groups verified")
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    f = sorted(p for p in (copy / "teachers" / "tiny" / "patch" / "c").rglob("*") if p.is_file())[2]
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0xFF
    f.write_bytes(bytes(raw))
    code, out, _ = run_cli(["verify", str(copy), "-q"])
    assert code == 1 and "DAMAGED teachers/tiny shard 2: of 'patch' fails its checksum" in out
    assert out.splitlines()[-1] == (f"repair: repa precompute DATA {copy} --repair --teacher ... encodes the damaged shards "
                                    "again from the source images")


def test_repair_encodes_the_damaged_shards_again(tiny_cache, demo_images, tmp_path, run_cli):
    """A committed cache with a flipped byte in a teacher shard: --repair refuses to go on without
    that teacher named (touching nothing), then takes back the damaged shard and its group's
    commit, encodes the shard again and commits: the cache equals the one never damaged."""
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    shards = sorted(p for p in (copy / "teachers" / "tiny" / "patch" / "c").rglob("*") if p.is_file())
    raw = bytearray(shards[1].read_bytes())
    raw[-100] ^= 0xFF
    shards[1].write_bytes(bytes(raw))
    common = ["--vae", "tiny", "--batch-size", "8", "--device", "cpu", "-q", "--repair"]
    code, _, err = run_cli(["precompute", str(demo_images), str(copy), "--teacher", "tiny-reg", *common])
    assert code == 2 and err == f"error: teachers/tiny of {copy} has damaged shards: name its teacher with --teacher to repair it\n"
    assert sorted(p.name for p in (copy / "teachers").iterdir()) == ["tiny", "zarr.json"] and (copy / "_commits" / "teachers" / "tiny.json").exists()
    code, out, err = run_cli(["precompute", str(demo_images), str(copy), "--teacher", "tiny", *common])
    assert code == 0, err
    assert out.strip().endswith("latents: already committed, teachers/tiny: resumed (shards [1] repaired)")
    code, out, _ = run_cli(["verify", str(copy), "-q"])
    assert code == 0, out
    for group in ("latents", "teachers/tiny"):  # the same records and outcomes; only the time differs
        new, old = CacheReader(copy).group(group).commit, CacheReader(tiny_cache).group(group).commit
        assert {k: v for k, v in new.items() if k != "committed_at"} == {k: v for k, v in old.items() if k != "committed_at"}
    for p in (tiny_cache / "teachers").rglob("*"):
        if p.is_file():
            assert (copy / p.relative_to(tiny_cache)).read_bytes() == p.read_bytes(), p


@pytest.mark.parametrize(
    "args, message",
    [
        (["precompute", "/nonexistent/data", "OUT"], "error: data folder /nonexistent/data does not exist"),
        (["precompute", "EMPTY", "OUT"], "error: no images found in EMPTY"),
        (["precompute", "DATA", "OUT", "--teacher", "dino"], "error: unknown teacher 'dino'; known teachers: clip-vit-l, dinov1-vit-b, dinov2-vit-b"),
        (["precompute", "DATA", "FILE"], "error: output path FILE is an existing file, not a cache"),
        (["precompute", "DATA", "OUT", "--resolution", "100"], "error: --resolution must be a multiple of 8 in [64, 4096], not 100"),
        (["precompute", "DATA", "OUT", "--precision", "fp16"], "error: --precision must be one of fp32, bf16, not 'fp16'"),
        (["stats", "/nonexistent/cache"], "error: no cache at /nonexistent/cache"),
        (["verify", "EMPTY"], "error: EMPTY is not a repa cache"),
        (["precompute", "DATA"], "Missing argument 'out'"),
        # Weights that cannot load on a worker (offline): one line from the driver, no dask traceback.
        (["precompute", "DATA", "OUT", "--vae", "tiny", "--teacher", "dinov2-vit-b", "--device", "cpu", "-q"],
         "error: cannot load teacher 'dinov2-vit-b' (vit_base_patch14_dinov2.lvd142m)"),
    ],
)
def test_bad_cli_input_one_line_exit_2(args, message, demo_images, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    subst = {"EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out"), "DATA": str(demo_images), "FILE": str(tmp_path / "file")}
    args = [subst.get(a, a) for a in args]
    for k, v in subst.items():
        message = message.replace(k, v)
    code, _, err = run_cli(args)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    if err.startswith("error:"):
        assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigkill_mid_precompute_then_rerun_equals_uninterrupted(demo_images, tmp_path):
    base = [sys.executable, "-m", "repa_cache.cli", "precompute", str(demo_images)]
    opts = ["--vae", "tiny", "--teacher", "tiny", "--shard-size", "2", "--batch-size", "2", "--device", "cpu", "--workers", "1", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + [str(killed)] + opts, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    records = killed / "_records" / "teachers" / "tiny"
    while time.time() < deadline and proc.poll() is None and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(records.glob("*.json")))
    assert 0 < done < 11, f"kill landed at {done} of 11 shards; the test proves nothing"
    assert not (killed / "_commits").exists()
    time.sleep(1.0)  # the worker dies with its parent; give it a moment
    with pytest.raises(CacheError, match="not committed|no committed group"):
        CacheReader(killed)
    rerun = subprocess.run(base + [str(killed)] + opts, cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    clean = subprocess.run(base + [str(tmp_path / "clean")] + opts, cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    assert clean.returncode == 0, clean.stderr
    a, b = CacheReader(tmp_path / "clean"), CacheReader(killed)
    np.testing.assert_array_equal(a.valid, b.valid)
    idx = a.valid_indices()
    ra, rb = a.read(idx), b.read(idx)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])
    for shard in range(a.meta.num_shards):  # identical stored bytes, shard by shard
        for g in ("latents", "teachers/tiny"):
            ja = json.loads(record_path(a.root, g, shard).read_text())
            jb = json.loads(record_path(b.root, g, shard).read_text())
            assert ja["checksums"] == jb["checksums"]


def test_bf16_precision_stores_autocast_outputs_and_is_part_of_the_fingerprint(tiny_cache, demo_images, tmp_path):
    out = tmp_path / "bf16"
    precompute(tiny_config(demo_images, out, teachers=(), precision="bf16"))
    reader = CacheReader(out)
    assert reader.group("latents").meta.model["precision"] == "bf16"
    vae = load_vae(VAESpec("tiny"))
    idx, crops = _shard_crops(reader, demo_images, 0)
    got = reader.read(idx)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dist = vae.encode(crops.float() / 127.5 - 1).latent_dist
    np.testing.assert_array_equal(got["latents/mean"][:, 0], dist.mean.float().numpy())
    fp32 = CacheReader(tiny_cache).read(idx)["latents/mean"][:, 0]
    assert not np.array_equal(got["latents/mean"][:, 0], fp32)  # bf16 arithmetic really ran
    np.testing.assert_allclose(got["latents/mean"][:, 0], fp32, atol=0.1)

    # Adding a teacher without --precision keeps the latents as they are and encodes the teacher in
    # fp32; asking for fp32 latents on this cache is refused, naming the field.
    res = precompute(tiny_config(demo_images, out))
    assert res.groups == {"latents": "already committed", "teachers/tiny": "written"}
    assert CacheReader(out).group("tiny").meta.model["precision"] == "fp32"
    with pytest.raises(FingerprintMismatch, match=r"group 'latents' of .* other settings: model\.precision: \"bf16\" -> \"fp32\""):
        precompute(tiny_config(demo_images, out, precision="fp32"))


def test_a_cache_remembers_its_settings_when_extended(demo_images, tmp_path, run_cli):
    """Adding a teacher to a cache made with --shard-size 4 --no-flip --resolution 128 --seed 3 needs
    none of them again: the cache's own are the defaults. A value typed differently is a change,
    refused with the usual one line."""
    out = str(tmp_path / "c")
    common = ["--vae", "tiny", "--batch-size", "4", "--device", "cpu", "-q"]
    code, _, err = run_cli(["precompute", str(demo_images), out, "--teacher", "tiny", "--shard-size", "4", "--no-flip",
                            "--resolution", "128", "--seed", "3", *common])
    assert code == 0, err
    code, stdout, err = run_cli(["precompute", str(demo_images), out, "--teacher", "tiny", "--teacher", "tiny-reg", *common])
    assert code == 0, err
    assert stdout.strip().endswith("latents: already committed, teachers/tiny: already committed, teachers/tiny-reg: written")
    meta = CacheReader(out).meta
    assert (meta.shard_size, meta.views, meta.resolution, meta.seed) == (4, ("orig",), 128, 3)
    code, _, err = run_cli(["precompute", str(demo_images), out, "--teacher", "tiny", "--shard-size", "8", *common])
    assert code == 2 and err == f"error: {out} was made with other settings: shard_size: 4 -> 8\n"
