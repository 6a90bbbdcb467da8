"""Feature codecs: round trips on outlier-heavy tokens, edge tokens, refusal of bad input, and the
int8 codec through precompute, transcoding, the readers, verify and stats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from repa_cache.cache.codec import (
    MISSING_INT8,
    Int8Codec,
    cosine_check,
    decode_numpy,
    dequantize,
    encode_int8,
    merge_checks,
    token_cosine,
)
from repa_cache.cache.copy import copy_cache
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import GROUP_ATTR, with_feature_codec
from repa_cache.cache.reader import CacheReader, group_meta
from repa_cache.cache.verify import verify_cache
from repa_cache.cache.wds import export_wds
from repa_cache.cache.wds_reader import WdsReader
from repa_cache.cache.writer import write_shard
from repa_cache.pipeline.precompute import precompute

from ..conftest import tiny_config

CODEC = Int8Codec()
GROUP = "teachers/tiny"


def outlier_tokens(n: int, dim: int, outlier: float, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 tokens like real ViT features, only harsher: Student-t(3) values (heavy
    tails), two channels ``outlier`` times larger than the rest, and per-token norms spread over
    two orders of magnitude."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(n, dim))
    x[:, rng.choice(dim, 2, replace=False)] *= outlier
    x *= np.exp(rng.uniform(-2.3, 2.3, size=(n, 1)))
    return x.astype(np.float32)


@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("outlier", [1.0, 10.0, 30.0, 100.0, 1000.0])
def test_int8_holds_cosine_0999_for_every_outlier_heavy_token(dim, outlier):
    x = outlier_tokens(2048, dim, outlier, seed=int(outlier) + dim)
    q, scale = encode_int8(x, CODEC, "test")
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2048, 1)
    assert q.min() >= -127  # -128 is the fill value, never data
    cos = token_cosine(x, decode_numpy(q, scale, CODEC))
    assert cos.min() >= 0.999
    assert cos.min() >= 1 - np.sqrt(dim) / 129032  # the worst-case bound in cache.codec's docstring


def test_plain_linear_absmax_fails_the_bound_on_the_same_tokens():
    """Why the codec compands: the same tokens quantised linearly lose the 0.999 bound."""
    x = outlier_tokens(2048, 768, 30.0, seed=1)
    linear = Int8Codec(power=1.0)
    q, scale = encode_int8(x, linear, "test")
    assert token_cosine(x, decode_numpy(q, scale, linear)).min() < 0.999


def test_all_zero_and_constant_tokens_round_trip_exactly():
    x = np.zeros((4, 768), np.float32)
    x[1] = 3.25
    x[2] = -0.0078125
    x[3, ::2], x[3, 1::2] = 7.5, -7.5
    q, scale = encode_int8(x, CODEC, "test")
    assert scale[:, 0].tolist() == [0.0, 3.25, 0.0078125, 7.5]
    np.testing.assert_array_equal(decode_numpy(q, scale, CODEC), x)
    np.testing.assert_array_equal(dequantize(torch.from_numpy(q), torch.from_numpy(scale), CODEC).numpy(), x)


def test_torch_dequantize_equals_numpy_decode():
    x = outlier_tokens(64, 768, 50.0)
    q, scale = encode_int8(x, CODEC, "test")
    got = dequantize(torch.from_numpy(q), torch.from_numpy(scale), CODEC)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), decode_numpy(q, scale, CODEC))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values_naming_where(bad):
    x = outlier_tokens(4, 768, 1.0)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"^group 'g' shard 7: non-finite teacher feature .* at position \(2, 5\)"):
        encode_int8(x, CODEC, "group 'g' shard 7")


def test_merge_checks_by_hand():
    cos = np.array([1.0] * 998 + [0.9995, 0.99])
    a, b = cosine_check(cos[:500]), cosine_check(cos[500:])
    got = merge_checks([a, b])
    assert got["tokens"] == 1000 and got["min"] == 0.99
    assert got["mean"] == pytest.approx(cos.mean())
    # the 1st lowest of 1000 is 0.99 (1 - cos = 1e-2): its bin is [1e-2, 10^-1.9), reported at its upper edge
    assert got["q001"] == pytest.approx(1 - 10**-1.9)
    assert merge_checks([]) == {"tokens": 0}


# -- through the cache ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_caches(tiny_cache, demo_images, tmp_path_factory):
    """A cache precomputed with --feature-codec int8, and the test session's float16 cache transcoded."""
    base = tmp_path_factory.mktemp("codec")
    precompute(tiny_config(demo_images, base / "pre", feature_codec="int8"))
    copy_cache(tiny_cache, base / "trans", feature_codec="int8", quiet=True)
    return base / "pre", base / "trans"


def test_float16_groups_carry_no_codec_metadata(tiny_cache):
    gmeta = group_meta(tiny_cache, GROUP)
    assert gmeta.feature_codec is None and "feature_codec" not in gmeta.to_json()
    assert "feature_codec" not in gmeta.fingerprint
    assert with_feature_codec(gmeta, "float16") == gmeta  # the transcoder's float16 is precompute's
    rec = json.loads((tiny_cache / "_records" / GROUP / "000000.json").read_text())
    assert "codec_check" not in rec


def test_transcoded_cache_verifies_and_reads_the_same_batches(tiny_cache, int8_caches, run_cli):
    pre, trans = int8_caches
    code, out, err = run_cli(["verify", str(trans)])
    assert code == 0, out + err
    gmeta = group_meta(trans, GROUP)
    assert gmeta.feature_codec == CODEC.to_json() and gmeta.codec == CODEC  # the JSON as recorded, and typed
    assert gmeta.fingerprint_hash == group_meta(pre, GROUP).fingerprint_hash  # same settings, same fingerprint
    assert gmeta.fingerprint["base"] == group_meta(tiny_cache, GROUP).fingerprint["base"]
    assert (trans / "zarr.json").read_bytes() == (tiny_cache / "zarr.json").read_bytes()
    src, dst = CacheReader(tiny_cache), CacheReader(trans)
    idx = src.valid_indices()[::-1]
    views = np.arange(idx.size) % 2
    a, b = src.read_views(idx, views), dst.read_views(idx, views)
    assert sorted(a) == sorted(b)
    for k in ("index", "view", "label", "latents/mean", "latents/std"):
        np.testing.assert_array_equal(a[k], b[k])
    for k in (f"{GROUP}/patch", f"{GROUP}/cls"):
        assert b[k].dtype == np.float16 and b[k].shape == a[k].shape
        assert token_cosine(a[k], b[k]).min() >= 0.999
    commit = json.loads((trans / "_commits" / GROUP / ".." / "tiny.json").resolve().read_text())
    assert commit["codec_check"]["tokens"] == int(src.valid.sum()) * 2 * 257
    assert 0.999 <= commit["codec_check"]["min"] <= commit["codec_check"]["q001"] <= commit["codec_check"]["mean"] <= 1


def test_raw_read_and_device_dequantize_equal_the_decoded_read(int8_caches):
    reader = CacheReader(int8_caches[0])
    idx = reader.valid_indices()[:5]
    views = np.array([0, 1, 1, 0, 1])
    fields = [f"{GROUP}/patch"]
    raw = reader.read_views(idx, views, fields=fields, raw=True)
    assert raw[f"{GROUP}/patch"].dtype == np.int8 and raw[f"{GROUP}/patch_scale"].shape == (5, 256, 1)
    got = dequantize(torch.from_numpy(raw[f"{GROUP}/patch"]), torch.from_numpy(raw[f"{GROUP}/patch_scale"]),
                     reader.feature_codec(GROUP))
    decoded = reader.read_views(idx, views, fields=fields)
    assert f"{GROUP}/patch_scale" not in decoded
    np.testing.assert_array_equal(got.numpy().astype(np.float16), decoded[f"{GROUP}/patch"])


def test_webdataset_export_of_an_int8_cache_decodes_the_same(int8_caches, tmp_path):
    reader = CacheReader(int8_caches[1])
    export_wds(int8_caches[1], tmp_path / "wds", quiet=True)
    wds = WdsReader(tmp_path / "wds")
    idx = reader.valid_indices()[:6]
    a, b = reader.read(idx), wds.read(idx)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_transcode_resumes_only_missing_shards_and_ends_identical(tiny_cache, int8_caches, tmp_path):
    trans = int8_caches[1]
    part = tmp_path / "part"
    shutil.copytree(trans, part)
    shutil.rmtree(part / "_commits" / "teachers")
    (part / "_records" / GROUP / "000001.json").unlink()  # killed after shard 1's data, before its record
    res = copy_cache(tiny_cache, part, feature_codec="int8", quiet=True)
    assert res.groups == {"latents": "already there", GROUP: "transcoded to int8"}
    assert (res.shards_copied, res.shards_skipped) == (1, 2)
    assert verify_cache(part, quiet=True).ok
    for s in range(3):
        name = f"{s:06d}.json"
        assert (part / "_records" / GROUP / name).read_bytes() == (trans / "_records" / GROUP / name).read_bytes()
    again = copy_cache(tiny_cache, part, feature_codec="int8", quiet=True)
    assert again.groups == {"latents": "already there", GROUP: "already there"} and again.shards_copied == 0


def test_tokens_beyond_float16_are_refused_decoded_but_read_raw(int8_caches, tmp_path):
    import zarr

    cache = tmp_path / "c"
    shutil.copytree(int8_caches[1], cache)
    arr = zarr.open_array(str(cache / GROUP / "patch_scale"), mode="r+")
    block = np.asarray(arr[:8])
    i = int(CacheReader(cache).valid_indices()[0])
    block[i] *= 1e6  # the same tokens, a million times larger: beyond 65504
    arr[:8] = block
    reader = CacheReader(cache)
    with pytest.raises(CacheError, match="'patch' holds values beyond float16's range; read it with raw=True"):
        reader.read([i])
    raw = reader.read([i], raw=True)
    big = dequantize(torch.from_numpy(raw[f"{GROUP}/patch"]), torch.from_numpy(raw[f"{GROUP}/patch_scale"]),
                     reader.feature_codec(GROUP))
    assert float(big.abs().max()) > 65504 and torch.isfinite(big).all()


def test_transcode_back_to_float16_reads_float16(int8_caches, tmp_path):
    copy_cache(int8_caches[1], tmp_path / "back", feature_codec="float16", quiet=True)
    assert group_meta(tmp_path / "back", GROUP).feature_codec is None
    got = CacheReader(tmp_path / "back").read([int(CacheReader(tmp_path / "back").valid_indices()[0])])
    assert got[f"{GROUP}/patch"].dtype == np.float16


def test_non_finite_feature_is_refused_at_write_naming_the_shard(int8_caches):
    from repa_cache.cache.reader import open_meta

    root = int8_caches[0]
    _, meta = open_meta(root)
    gmeta = group_meta(root, GROUP)
    before = (root / "_records" / GROUP / "000001.json").read_bytes()
    rows = meta.shard_range(1)[1] - meta.shard_range(1)[0]
    data = {"patch": np.ones((rows, 2, 256, 32), np.float32), "cls": np.ones((rows, 2, 32), np.float32)}
    data["patch"][3, 1, 10, 4] = np.nan
    data["patch"][2], data["cls"][2] = np.nan, np.nan  # a skipped input's row: NaN, not refused
    outcomes = [["ok", "", 64, 64]] * rows
    outcomes[2] = ["skipped", "empty file", 0, 0]
    with pytest.raises(CacheError, match=r"^group 'teachers/tiny' shard 1, array 'patch': non-finite teacher feature nan "
                                         r"at position \(3, 1, 10, 4\); refusing to quantise it$"):
        write_shard(root, meta, gmeta, 1, data, outcomes, "w")
    assert (root / "_records" / GROUP / "000001.json").read_bytes() == before


def test_unknown_codec_is_refused_with_one_line(int8_caches, tmp_path, run_cli):
    cache = tmp_path / "c"
    shutil.copytree(int8_caches[1], cache)
    zj = cache / GROUP / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"][GROUP_ATTR]["feature_codec"]["name"] = "int4"
    zj.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="unknown feature codec 'int4'"):
        CacheReader(cache)
    code, out, err = run_cli(["stats", str(cache)])
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "unknown feature codec 'int4' (this version reads float16, int8); upgrade repa-cache" in err


def test_lost_int8_chunk_is_found_by_reader_and_verify(int8_caches, tmp_path):
    """A chunk that reads back as the int8 fill value is missing data, as NaN is for floats."""
    import zarr

    cache = tmp_path / "c"
    shutil.copytree(int8_caches[1], cache)
    arr = zarr.open_array(str(cache / GROUP / "patch"), mode="r+")
    reader = CacheReader(cache)
    i = int(reader.valid_indices()[0])
    block = np.asarray(arr[: 8])
    block[i, 0] = MISSING_INT8
    arr[:8] = block  # rewrites shard 0 (its checksum now differs too)
    with pytest.raises(CacheError, match=f"shard 0 has missing or non-finite data in 'patch' at index {i}"):
        CacheReader(cache).read([i])
    problems = [str(p) for p in verify_cache(cache, quiet=True).problems]
    assert any(p.startswith("teachers/tiny shard 0:") for p in problems)


def test_stats_print_codec_bytes_per_view_and_cosine(int8_caches, run_cli):
    code, out, _ = run_cli(["stats", str(int8_caches[0])])
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("codec") and "int8" in ln)
    assert "/view stored; cosine to the source at write: min 0.9999" in line and "tokens" in line


def test_cli_transcodes_and_refuses_an_unknown_codec_with_exit_2(tiny_cache, demo_images, tmp_path, run_cli):
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(tmp_path / "t"), "--feature-codec", "int8", "-q"])
    assert code == 0, err
    assert f"{GROUP}: transcoded to int8" in out and group_meta(tmp_path / "t", GROUP).codec == CODEC
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(tmp_path / "u"), "--feature-codec", "int4"])
    assert (code, err) == (2, "error: --feature-codec must be one of float16, int8, not 'int4'\n")
    assert not (tmp_path / "u").exists()
    code, _, err = run_cli(["precompute", str(demo_images), str(tmp_path / "p"), "--vae", "tiny", "--teacher", "tiny",
                            "--feature-codec", "fp8"])
    assert (code, err) == (2, "error: --feature-codec must be one of float16, int8, not 'fp8'\n")
