"""One reader test suite, run against both backends: the zarr cache (CacheReader) and its webdataset
export (WdsReader), on a small synthetic cache written with the writer API (no models). Plus the
export itself (index.json, streaming with webdataset, refusals), trainer batches from either
backend, and ``repa export-wds``."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import FORMAT_VERSION, GROUP_ATTR, LATENTS, ROOT_ATTR, ArraySpec, CacheMeta, GroupMeta
from repa_cache.cache.layout import shard_key
from repa_cache.cache.open import open_meta_any, open_reader
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.wds import INDEX_FILE, export_wds, member_field
from repa_cache.cache.wds_reader import WdsReader
from repa_cache.cache.writer import DEFAULT_CODEC, commit_group, create_cache, create_group, write_shard

N, SHARD, VIEWS = 13, 4, ("orig", "hflip")  # 4 cache shards, the last one partial
SKIPPED = (5, 11)  # inputs that failed to decode: 11 valid samples (a shard with only skipped rows trips the writer)
VALID = [i for i in range(N) if i not in SKIPPED]
CLASSES = ("apple", "bear", "cat")
TEACHERS = ("t", "u")
SHARD_BYTES = 3000  # a few samples per tar shard; tar boundaries do not follow the cache shards
F32 = dict(DEFAULT_CODEC)


def _meta() -> CacheMeta:
    return CacheMeta(
        format_version=FORMAT_VERSION, code_version="test", num_samples=N, shard_size=SHARD, resolution=32,
        crop="adm-center", views=VIEWS, seed=3, class_names=CLASSES, source={"kind": "synthetic", "root": "-"},
        base_fingerprint={"listing": "x", "num_samples": N},
    )


def _groups() -> list[GroupMeta]:
    lat = GroupMeta(LATENTS, "latents", {"id": "synthetic-vae", "scaling_factor": 0.5, "shift_factor": 0.1},
                    (ArraySpec("mean", (4, 4, 4), "float32", F32), ArraySpec("std", (4, 4, 4), "float32", F32)),
                    {"group": LATENTS, "v": 1})
    t = GroupMeta("teachers/t", "teacher", {"name": "t", "num_tokens": 4, "dim": 8},
                  (ArraySpec("patch", (4, 8), "float16", F32), ArraySpec("cls", (8,), "float16", F32)),
                  {"group": "teachers/t", "v": 1})
    u = GroupMeta("teachers/u", "teacher", {"name": "u", "num_tokens": 4, "dim": 6},
                  (ArraySpec("patch", (4, 6), "float32", F32), ArraySpec("cls", (6,), "float32", F32)),
                  {"group": "teachers/u", "v": 2})
    return [lat, t, u]


def _outcomes(start: int, stop: int) -> list[list]:
    return [["skipped", "corrupt", 0, 0] if i in SKIPPED else ["ok", "", 40 + i, 30] for i in range(start, stop)]


def build(root: Path, commit: bool = True) -> dict[str, np.ndarray]:
    """A committed cache; returns the truth as {"<group>/<array>": (N, V, ...)} (NaN rows = skipped)."""
    meta = _meta()
    plan = pa.table({"index": np.arange(N), "key": [f"cls{i % 3}/img_{i:03d}.png" for i in range(N)],
                     "label": pa.array(np.arange(N) % 3, pa.int32())})
    create_cache(root, meta, plan)
    truth = {}
    for gi, g in enumerate(_groups()):
        create_group(root, meta, g)
        rng = np.random.default_rng(100 + gi)
        data = {}
        for a in g.arrays:
            x = (rng.normal(size=(N, len(VIEWS), *a.sample_shape)) * 3).astype(a.dtype)
            x[list(SKIPPED)] = np.nan
            data[a.name] = x
            truth[f"{g.group}/{a.name}"] = x
        for s in range(meta.num_shards):
            lo, hi = meta.shard_range(s)
            write_shard(root, meta, g, s, {k: v[lo:hi] for k, v in data.items()}, _outcomes(lo, hi), f"{gi}" * 64)
        if commit:
            commit_group(root, meta, g)
    return truth


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("conformance")
    truth = build(base / "cache")
    index = export_wds(base / "cache", base / "wds", shard_bytes=SHARD_BYTES)
    return {"zarr": base / "cache", "wds": base / "wds", "truth": truth, "index": index, "base": base}


@pytest.fixture(params=["zarr", "wds"])
def backend(request, synth):
    """(name, open(groups=None, verify_checksums=False) -> reader of that backend, truth)."""
    kind = request.param

    def open_(groups=None, verify_checksums=False):
        r = open_reader(synth[kind], groups=groups, verify_checksums=verify_checksums)
        assert isinstance(r, WdsReader if kind == "wds" else CacheReader)
        return r

    return kind, open_, synth["truth"]


# -- the shared suite ------------------------------------------------------------------------------
def test_meta_labels_keys_views_valid(backend, synth):
    _, open_, _ = backend
    r = open_()
    assert r.meta == _meta()
    assert r.meta.class_names == CLASSES and r.meta.num_shards == 4
    assert r.num_samples == N and r.views == VIEWS
    np.testing.assert_array_equal(r.labels, np.arange(N) % 3)
    assert r.labels.dtype == np.int64
    assert r.keys == [f"cls{i % 3}/img_{i:03d}.png" for i in range(N)]
    np.testing.assert_array_equal(r.valid, [i not in SKIPPED for i in range(N)])
    np.testing.assert_array_equal(r.valid_indices(), VALID)
    assert list(r.status) == ["skipped" if i in SKIPPED else "ok" for i in range(N)]


def test_group_meta_and_commit_records(backend, synth):
    _, open_, _ = backend
    r = open_()
    truth_reader = CacheReader(synth["zarr"])
    assert list(r.groups) == ["latents", "teachers/t", "teachers/u"]
    for want in _groups():
        got = r.group(want.group)
        assert got.meta == want and got.meta.fingerprint_hash == want.fingerprint_hash
        assert got.commit == truth_reader.group(want.group).commit
        assert got.commit["fingerprint_hash"] == want.fingerprint_hash
        assert got.commit["counts"] == {"ok": 11, "converted": 0, "skipped": 2}
    assert r.group("t") is r.group("teachers/t")  # bare teacher names resolve
    assert r.group(LATENTS).commit["weights_sha256"] == "0" * 64
    assert r.group(LATENTS).meta.model["scaling_factor"] == 0.5


def test_read_random_access_bit_exact(backend):
    _, open_, truth = backend
    r = open_()
    for idx in ([9, 0, 3, 3, 7], [12, 0], VALID, VALID[::-1], [4]):
        got = r.read(idx)
        assert set(got) == set(truth) | {"label", "index"}
        for name, x in truth.items():
            assert got[name].dtype == x.dtype and got[name].shape == (len(idx), *x.shape[1:])
            np.testing.assert_array_equal(got[name], x[idx])
        np.testing.assert_array_equal(got["label"], np.array(idx) % 3)
        np.testing.assert_array_equal(got["index"], idx)


def test_read_views_bit_exact(backend):
    _, open_, truth = backend
    r = open_()
    for idx, views in (([9, 0, 3, 3, 7], [1, 0, 0, 1, 1]), (VALID, [i % 2 for i in range(len(VALID))]), ([4], [1]), ([], [])):
        got = r.read_views(idx, views)
        assert set(got) == set(truth) | {"label", "index", "view"}
        for name, x in truth.items():
            assert got[name].dtype == x.dtype and got[name].shape == (len(idx), *x.shape[2:])
            np.testing.assert_array_equal(got[name], x[idx, views] if idx else x[:0, 0])
        np.testing.assert_array_equal(got["view"], views)
        np.testing.assert_array_equal(got["index"], idx)
    with pytest.raises(CacheError, match=r"view out of range \[0, 2\) in read_views\(\) \(views: orig, hflip\)"):
        r.read_views([0, 1], [0, 2])
    with pytest.raises(CacheError, match=r"read_views\(\) needs one view per index \(2 indices, 1 views\)"):
        r.read_views([0, 1], [0])
    with pytest.raises(CacheError, match="cache index 5 is a skipped input"):
        r.read_views([5], [0])


def test_fields_read_only_the_named_arrays(backend):
    _, open_, truth = backend
    r = open_()
    idx, views = [9, 0, 3, 3, 12], [1, 0, 0, 1, 0]
    fields = ["latents/std", "t/patch", "teachers/u/cls"]  # a bare teacher name works as the group
    got = r.read_views(idx, views, fields=fields)
    assert set(got) == {"latents/std", "teachers/t/patch", "teachers/u/cls", "label", "index", "view"}
    for name in ("latents/std", "teachers/t/patch", "teachers/u/cls"):
        np.testing.assert_array_equal(got[name], truth[name][idx, views])
    block = r.read_block(2, 9, fields=["latents/mean"])
    keep = [i for i in range(2, 9) if i not in SKIPPED]
    assert set(block) == {"latents/mean", "label", "index"}
    np.testing.assert_array_equal(block["latents/mean"], truth["latents/mean"][keep])
    with pytest.raises(CacheError, match=r"'t/feat' is not an array of a group this reader opened \(arrays: latents/mean, "):
        r.read([0], fields=["t/feat"])
    with pytest.raises(CacheError, match=r"'mean' is not an array of a group this reader opened"):
        r.read([0], fields=["mean"])
    with pytest.raises(CacheError, match=r"read\(\): pass groups or fields, not both"):
        r.read([0], groups=["t"], fields=["t/patch"])


def test_zarr_chunks_hold_one_view_of_one_sample(synth):
    arr = CacheReader(synth["zarr"]).group("t").arrays["patch"]
    assert arr.shards == (SHARD, 2, 4, 8) and arr.chunks == (1, 1, 4, 8)


def test_read_block_bit_exact(backend):
    _, open_, truth = backend
    r = open_()
    for start, stop in [(0, N), (2, 9), (4, 8), (5, 6), (7, 7), (10, 13), (11, 12), (0, 1)]:
        got = r.read_block(start, stop)
        keep = [i for i in range(start, stop) if i not in SKIPPED]
        np.testing.assert_array_equal(got["index"], keep)
        np.testing.assert_array_equal(got["label"], np.array(keep, dtype=np.int64) % 3)
        for name, x in truth.items():
            assert got[name].dtype == x.dtype and got[name].shape == (len(keep), *x.shape[1:])
            np.testing.assert_array_equal(got[name], x[keep])


def test_empty_read_has_shapes_and_dtypes(backend):
    _, open_, truth = backend
    got = open_().read([])
    for name, x in truth.items():
        assert got[name].shape == (0, *x.shape[1:]) and got[name].dtype == x.dtype
    assert got["label"].shape == (0,) and got["index"].shape == (0,)


def test_skipped_index_refused(backend):
    _, open_, _ = backend
    r = open_()
    with pytest.raises(CacheError, match=r"cache index 5 is a skipped input \(cls2/img_005.png\)"):
        r.read([4, 5])
    with pytest.raises(CacheError, match="cache index 11 is a skipped input"):
        r.read([11], groups=["t"])


def test_out_of_range_refused(backend):
    _, open_, _ = backend
    r = open_()
    for idx in ([N], [-1], [0, N + 5]):
        with pytest.raises(CacheError, match=rf"index out of range \[0, {N}\) in read\(\)"):
            r.read(idx)
    for start, stop in [(3, N + 1), (-1, 2), (5, 4)]:
        with pytest.raises(CacheError, match=rf"block \[{start}, {stop}\) is outside \[0, {N}\)"):
            r.read_block(start, stop)


def test_groups_selection(backend):
    _, open_, truth = backend
    r = open_(groups=["u"])
    assert list(r.groups) == ["teachers/u"]
    got = r.read([1, 2])
    assert set(got) == {"teachers/u/patch", "teachers/u/cls", "label", "index"}
    np.testing.assert_array_equal(got["teachers/u/patch"], truth["teachers/u/patch"][[1, 2]])
    with pytest.raises(CacheError, match="group 'latents' was not opened by this reader"):
        r.read([1], groups=[LATENTS])
    r2 = open_(groups=[LATENTS, "teachers/t"])
    got = r2.read_block(0, 4, groups=["t"])
    assert set(got) == {"teachers/t/patch", "teachers/t/cls", "label", "index"}
    np.testing.assert_array_equal(got["teachers/t/cls"], truth["teachers/t/cls"][[0, 1, 2, 3]])
    with pytest.raises(CacheError, match="has no group 'teachers/nope'"):
        open_(groups=["nope"])


def test_checked_reads_are_exact(backend):
    _, open_, truth = backend
    got = open_(verify_checksums=True).read(VALID)
    for name, x in truth.items():
        np.testing.assert_array_equal(got[name], x[VALID])


def test_backends_agree_on_random_reads(synth):
    z, w = CacheReader(synth["zarr"]), WdsReader(synth["wds"])
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = rng.choice(VALID, size=int(rng.integers(1, 20)))
        groups = [g for g in ("latents", "t", "u") if rng.random() < 0.7] or ["latents"]
        a, b = z.read(idx, groups=groups), w.read(idx, groups=groups)
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])


# -- the export ------------------------------------------------------------------------------------
def _tar_keys(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            out.setdefault(key, []).append(suffix)
    return out


def test_index_describes_shards_and_copies_metadata(synth):
    index, out, cache = synth["index"], synth["wds"], synth["zarr"]
    on_disk = json.loads((out / INDEX_FILE).read_text())
    assert on_disk == index and index["format"] == "repa-cache-wds" and index["num_samples"] == len(VALID)
    shards = index["shards"]
    assert len(shards) >= 4 and sorted(p.name for p in out.glob("*.tar")) == [s["file"] for s in shards]
    seen: list[int] = []
    members = sorted(["cls", "txt"] + [member_field(g.group, a.name) for g in _groups() for a in g.arrays])
    for s in shards:
        path = out / s["file"]
        assert s["bytes"] == path.stat().st_size
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        keys = _tar_keys(path)
        ids = [int(k) for k in keys]
        assert all(len(k) == 9 for k in keys) and ids == sorted(ids)
        assert (s["first"], s["last"], s["count"]) == (ids[0], ids[-1], len(ids))
        assert all(sorted(v) == members for v in keys.values())
        seen += ids
    assert seen == VALID  # one sample per valid index, in cache order, nothing skipped exported
    attrs = zarr.open_group(str(cache), mode="r").attrs.asdict()
    assert index["cache"]["meta"] == attrs[ROOT_ATTR]
    assert index["class_names"] == list(CLASSES)
    for g in _groups():
        exported = index["cache"]["groups"][g.group]
        assert exported["meta"] == zarr.open_group(str(cache / g.group), mode="r").attrs.asdict()[GROUP_ATTR]
        assert exported["meta"]["model"] == g.model
        assert exported["commit"] == json.loads((cache / "_commits" / f"{g.group}.json").read_text())
    assert (out / "manifest.parquet").read_bytes() == (cache / "manifest.parquet").read_bytes()
    assert index["fields"]["teachers/t/patch"] == "teachers.t.patch.npy"


def test_export_streams_with_plain_webdataset(synth):
    import webdataset as wds

    truth = synth["truth"]
    urls = [str(synth["wds"] / s["file"]) for s in synth["index"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in VALID]
    for s, i in zip(samples, VALID):
        assert s["cls"] == i % 3 and s["txt"] == f"cls{i % 3}/img_{i:03d}.png"
        for name, x in truth.items():
            got = s[member_field(*name.rsplit("/", 1))]
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, x[i])


def test_wds_reader_indexes_only_the_shards_it_touches(synth):
    r = WdsReader(synth["wds"])
    shard = next(k for k, s in enumerate(r.shards) if s["first"] <= 9 <= s["last"])
    r.read([9])
    assert set(r._tables) == {shard}
    r.read_block(0, 2)
    assert set(r._tables) == {0, shard}


def test_an_export_without_checksum_files_is_checked_whole_shard(synth, tmp_path):
    """An export of version 1 (no per-member checksums): the verifying reader hashes each shard whole."""
    out = tmp_path / "w"
    shutil.copytree(synth["wds"], out)
    index = json.loads((out / INDEX_FILE).read_text())
    for s in index["shards"]:
        (out / s.pop("crc_file")).unlink()
        del s["crc_sha256"]
    del index["members"]
    index["wds_version"] = 1
    (out / INDEX_FILE).write_text(json.dumps(index))
    r = WdsReader(out, verify_checksums=True)
    np.testing.assert_array_equal(r.read(VALID)["teachers/u/cls"], synth["truth"]["teachers/u/cls"][VALID])
    f = out / index["shards"][1]["file"]
    raw = bytearray(f.read_bytes())
    raw[-1100] ^= 0x01  # anywhere in the shard
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=f"shard {index['shards'][1]['file']} fails its checksum"):
        WdsReader(out, verify_checksums=True).read([index["shards"][1]["first"]])


def test_export_is_deterministic_and_reexport_replaces(synth, tmp_path):
    out = tmp_path / "w"
    a = export_wds(synth["zarr"], out, shard_bytes=SHARD_BYTES)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in synth["index"]["shards"]]
    (out / "shard-000099.tar").write_bytes(b"stale")  # left over by an interrupted export
    b = export_wds(synth["zarr"], out, shard_bytes=10**9)
    assert len(b["shards"]) == 1 and b["shards"][0]["count"] == len(VALID)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "manifest.parquet", "shard-000000.crc", "shard-000000.tar"]
    np.testing.assert_array_equal(WdsReader(out).read(VALID)["teachers/u/cls"], synth["truth"]["teachers/u/cls"][VALID])


def test_export_of_a_group_subset(synth, tmp_path):
    index = export_wds(synth["zarr"], tmp_path / "w", groups=["latents", "u"])
    assert list(index["cache"]["groups"]) == ["latents", "teachers/u"]
    r = open_reader(tmp_path / "w")
    assert list(r.groups) == ["latents", "teachers/u"]
    with pytest.raises(CacheError, match=r"has no group 'teachers/t' \(groups present: latents, teachers/u\)"):
        WdsReader(tmp_path / "w", groups=["t"])
    np.testing.assert_array_equal(r.read([0])["latents/std"], synth["truth"]["latents/std"][[0]])
    root, meta, groups = open_meta_any(tmp_path / "w")
    assert (str(root), meta, groups) == (str(tmp_path / "w"), _meta(), ["latents", "teachers/u"])
    root, meta, groups = open_meta_any(synth["zarr"])
    assert (str(root), meta, groups) == (str(synth["zarr"]), _meta(), ["latents", "teachers/t", "teachers/u"])


def test_export_refuses_uncommitted_cache_and_bad_out(synth, tmp_path):
    build(tmp_path / "uncommitted", commit=False)
    with pytest.raises(CacheError, match="has no committed group"):
        export_wds(tmp_path / "uncommitted", tmp_path / "w1")
    assert not (tmp_path / "w1").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is an existing file"):
        export_wds(synth["zarr"], tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and is not a webdataset export"):
        export_wds(synth["zarr"], tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="inside the cache"):
        export_wds(synth["zarr"], synth["zarr"] / "wds")


def test_export_refuses_a_damaged_cache(synth, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(synth["zarr"], cache)
    arr = zarr.open_group(str(cache), mode="r")["teachers/t"]["patch"]
    f = cache / shard_key(arr, 1)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard 1 of 'patch' fails its checksum"):
        export_wds(cache, tmp_path / "w", shard_bytes=SHARD_BYTES)
    assert not (tmp_path / "w" / INDEX_FILE).exists()  # never committed


def test_damaged_export_refused_naming_the_shard(synth, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(synth["wds"], out)
    shards = json.loads((out / INDEX_FILE).read_text())["shards"]
    # A bit flip inside the data of shard 1's first sample's mean: the size is unchanged, its crc32c is not.
    f = out / shards[1]["file"]
    with tarfile.open(f) as tar:
        member = next(m for m in tar if m.name.endswith(".latents.mean.npy"))
    raw = bytearray(f.read_bytes())
    raw[member.offset_data + member.size - 1] ^= 0x10
    f.write_bytes(bytes(raw))
    r = WdsReader(out, verify_checksums=True)
    r.read([shards[0]["first"]])  # another shard reads fine
    first = shards[1]["first"]
    r.read([first], fields=["teachers/u/cls"])  # and so do the other members of the sample
    with pytest.raises(CacheError, match=f"shard {shards[1]['file']}: 'latents.mean.npy' of cache index {first} fails its checksum"):
        r.read([first])
    # A tar header damaged (its own checksum field): refused naming the shard
    raw[member.offset_data - 512 + 148] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=f"shard {shards[1]['file']} (holds|is not a readable tar)"):
        WdsReader(out, verify_checksums=True).read([first])
    # The checksum file of a shard replaced: refused by its sha256 in index.json
    crc = out / shards[0]["crc_file"]
    crc.write_bytes(bytes(len(crc.read_bytes())))
    with pytest.raises(CacheError, match=f"checksum file {shards[0]['crc_file']} of shard {shards[0]['file']} fails its checksum"):
        WdsReader(out, verify_checksums=True).read([shards[0]["first"]])
    # A truncated shard is refused on open.
    f2 = out / shards[2]["file"]
    f2.write_bytes(f2.read_bytes()[:1000])
    with pytest.raises(CacheError, match=f"shard {shards[2]['file']} has 1000 bytes"):
        WdsReader(out)
    # Without index.json it is no export (an interrupted one): open_reader falls back and refuses.
    (out / INDEX_FILE).unlink()
    with pytest.raises(CacheError, match="is not a repa cache"):
        open_reader(out)


# -- the trainer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
def test_trainer_batches_equal_from_either_backend(synth, monkeypatch, world_size):
    import torch

    from repa_cache.cache.format import LATENTS, LatentNorm
    from repa_cache.train.data import CacheBatches, DataConfig

    monkeypatch.setattr(CacheBatches, "_open", lambda self: open_reader(
        self.cfg.cache, groups=self.groups, verify_checksums=self.cfg.verify_checksums))
    cfgs = {k: DataConfig(cache=str(synth[k]), teachers=("t", "u"), global_batch=4, seed=5, block_size=3,
                          window_blocks=2, num_workers=0) for k in ("zarr", "wds")}
    for rank in range(world_size):
        z = CacheBatches(cfgs["zarr"], rank=rank, world_size=world_size)
        w = CacheBatches(cfgs["wds"], rank=rank, world_size=world_size)
        assert isinstance(w._reader, WdsReader) and isinstance(z._reader, CacheReader)
        assert z.batches_per_epoch == w.batches_per_epoch == len(VALID) // 4
        norms = [LatentNorm.of_latents(r.group(LATENTS).meta.model) for r in (z._reader, w._reader)]
        assert norms[0] == norms[1] == LatentNorm((0.5,), (0.1,))
        for step in range(7):  # more than three epochs
            a, b = z[step], w[step]
            assert list(a) == list(b) and len(a["index"]) == 4 // world_size
            for k in a:
                assert a[k].dtype == b[k].dtype
                assert torch.equal(a[k], b[k]), (rank, step, k)


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_export_wds(synth, tmp_path, run_cli):
    out = tmp_path / "w"
    code, stdout, err = run_cli(["export-wds", str(synth["zarr"]), str(out), "--shard-bytes", "3000", "--teacher", "t"])
    assert code == 0, err
    n = len(json.loads((out / INDEX_FILE).read_text())["shards"])
    assert stdout.strip().startswith(f"exported {len(VALID)} samples to {n} webdataset shards in {out}")
    assert stdout.strip().endswith("groups: latents, teachers/t)") and len(stdout.strip().splitlines()) == 1
    assert list(open_reader(out).groups) == ["latents", "teachers/t"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["EMPTY", "OUT"], "error: EMPTY is not a repa cache"),
        (["/nonexistent/cache", "OUT"], "error: no cache at /nonexistent/cache"),
        (["UNCOMMITTED", "OUT"], "has no committed group"),
        (["CACHE", "FILE"], "error: output path FILE is an existing file"),
        (["CACHE", "OTHER"], "error: output folder OTHER is not empty and is not a webdataset export"),
        (["CACHE", "OUT", "--teacher", "nope"], "has no group 'teachers/nope'"),
        (["CACHE", "OUT", "--shard-bytes", "0"], "error: --shard-bytes must be positive"),
        (["CACHE"], "Missing argument 'out'"),
    ],
)
def test_cli_export_wds_bad_input_exit_2(args, message, synth, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    if "UNCOMMITTED" in args:
        build(tmp_path / "uncommitted", commit=False)
    subst = {"EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file"),
             "OTHER": str(tmp_path / "other"), "UNCOMMITTED": str(tmp_path / "uncommitted"), "CACHE": str(synth["zarr"])}
    args = [subst.get(a, a) for a in args]
    for k, v in subst.items():
        message = message.replace(k, v)
    code, _, err = run_cli(["export-wds", *args])
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    if err.startswith("error:"):
        assert len(err.strip().splitlines()) == 1


def test_training_from_the_export_equals_training_from_the_cache(tiny_cache, tmp_path, monkeypatch):
    """The whole trainer (plan, batches, steps, checkpoint) on an export: same weights, same cache identity."""
    import torch

    import repa_cache.train.loop as loop
    from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
    from repa_cache.train.config import TrainConfig

    export_wds(tiny_cache, tmp_path / "wds", shard_bytes=200_000)
    states = {}
    for name, src in (("zarr", tiny_cache), ("wds", tmp_path / "wds")):
        cfg = TrainConfig(cache=str(src), out=str(tmp_path / name), model="SiT-tiny/2", batch_size=8, max_steps=4,
                               ckpt_every=4, log_every=4, num_workers=0, device="cpu", quiet=True)
        assert loop.train(cfg).step == 4
        states[name] = load_checkpoint(latest_checkpoint(tmp_path / name))
    a, b = states["zarr"], states["wds"]
    assert a.card.cache == b.card.cache  # fingerprints and weight hashes: a run can resume on either backend
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), f"{part}.{k} differs"
