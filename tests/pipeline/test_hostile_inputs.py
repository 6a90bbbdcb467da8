"""Hostile and unlucky inputs to ``repa precompute``: a same-size file
replacement is refused on resume and on adding a teacher, OUT inside DATA is refused up front, and
bad option values get one line and exit 2."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa_cache.cache.errors import RepaError, UsageError
from repa_cache.cache.format import commit_path, record_path
from repa_cache.cache.reader import CacheReader
from repa_cache.pipeline.plan import check_config, sample_order
from repa_cache.pipeline.precompute import precompute
from repa_cache.pipeline.source import list_source

from ..conftest import tiny_config

SHARD = 4


def _bmp(seed: int) -> bytes:
    """A 40x40 noise BMP: every such file has the same byte size, whatever its pixels."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(buf, format="BMP")
    return buf.getvalue()


@pytest.fixture
def bmp_data(tmp_path: Path) -> Path:
    """2 classes x 5 same-size BMP images (10 inputs, 3 shards of 4)."""
    root = tmp_path / "data"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            (root / f"c{c}" / f"img_{i}.bmp").write_bytes(_bmp(10 * c + i))
    return root


def _cfg(data: Path, out: Path, **kw):
    return tiny_config(data, out, shard_size=SHARD, batch_size=SHARD, **kw)


def _shard_of(data: Path, key: str) -> int:
    listing = list_source(data)
    order = sample_order(len(listing.items), 0)
    keys = [listing.items[i].key for i in order]
    return keys.index(key) // SHARD


def _replace_same_size(data: Path, key: str) -> tuple[str, str, str]:
    """Replace one input with other pixels of the same byte size; (its path, old and new sha256)."""
    path = data / key
    old = path.read_bytes()
    new = _bmp(999)
    assert len(new) == len(old) and new != old
    path.write_bytes(new)
    return str(path.resolve()), hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()


def test_records_hold_the_sha256_of_each_input(bmp_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    precompute(_cfg(bmp_data, out))
    listing = list_source(bmp_data)
    keys = [listing.items[i].key for i in sample_order(len(listing.items), 0)]
    for group in ("latents", "teachers/tiny"):
        for shard in range(3):
            rec = json.loads(record_path(out, group, shard).read_text())
            expected = [hashlib.sha256((bmp_data / k).read_bytes()).hexdigest() for k in keys[SHARD * shard : SHARD * (shard + 1)]]
            assert rec["input_sha256"] == expected


def test_same_size_replacement_before_adding_a_teacher_is_refused_naming_the_file(bmp_data: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "c"
    precompute(_cfg(bmp_data, out, teachers=()))  # latents only
    key = "c1/img_3.bmp"
    path, old, new = _replace_same_size(bmp_data, key)
    shard = _shard_of(bmp_data, key)
    code, _, err = run_cli(["precompute", str(bmp_data), str(out), "--vae", "tiny", "--teacher", "tiny", "--shard-size", str(SHARD),
                            "--batch-size", str(SHARD), "--device", "cpu", "--workers", "1", "-q"])
    assert code == 2, err
    assert err.strip() == (f"error: {path} changed since shard {shard} of 'latents' was encoded from it (same size, sha256 "
                           f"{old[:12]} -> {new[:12]}); restore the file or precompute into a new cache")
    assert not commit_path(out, "teachers/tiny").exists()


def test_same_size_replacement_between_a_kill_and_the_resume_is_refused(bmp_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    precompute(_cfg(bmp_data, out))
    reference = tmp_path / "ref"
    shutil.copytree(out, reference)
    key = "c0/img_2.bmp"
    shard = _shard_of(bmp_data, key)
    # What a kill leaves behind: the teacher's record of that shard not written, nothing committed.
    record_path(out, "teachers/tiny", shard).unlink()
    shutil.rmtree(out / "_commits")
    (out / "manifest.parquet").unlink(missing_ok=True)
    original = (bmp_data / key).read_bytes()
    path, old, new = _replace_same_size(bmp_data, key)
    with pytest.raises(RepaError) as info:
        precompute(_cfg(bmp_data, out))
    assert info.value.exit_code == 2
    assert str(info.value) == (f"{path} changed since shard {shard} of 'latents' was encoded from it (same size, sha256 "
                               f"{old[:12]} -> {new[:12]}); restore the file or precompute into a new cache")
    assert not record_path(out, "teachers/tiny", shard).exists()
    # The file restored, the resume finishes and equals the uninterrupted cache.
    (bmp_data / key).write_bytes(original)
    res = precompute(_cfg(bmp_data, out))
    assert res.shards_written == 1 and res.groups == {"latents": "resumed", "teachers/tiny": "resumed"}
    a, b = CacheReader(reference), CacheReader(out)
    idx = a.valid_indices()
    for k, v in a.read(idx).items():
        np.testing.assert_array_equal(v, b.read(idx)[k])


def test_unchanged_dataset_adds_a_teacher_and_resumes(bmp_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    precompute(_cfg(bmp_data, out, teachers=()))
    res = precompute(_cfg(bmp_data, out, teachers=("tiny",)))
    assert res.shards_written == 3 and res.groups == {"latents": "already committed", "teachers/tiny": "written"}
    record_path(out, "teachers/tiny", 1).unlink()
    shutil.rmtree(out / "_commits")
    res = precompute(_cfg(bmp_data, out, teachers=("tiny",)))
    assert res.shards_written == 1


# --- OUT inside DATA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "same", "symlink"])
def test_out_inside_data_is_refused_up_front(bmp_data: Path, tmp_path: Path, run_cli, where: str) -> None:
    before = sorted(p.relative_to(bmp_data) for p in bmp_data.rglob("*"))
    if where == "inside":
        out = bmp_data / "c0" / "cache"
    elif where == "same":
        out = bmp_data
    else:  # OUT reaches DATA through a link
        (tmp_path / "link").symlink_to(bmp_data)
        out = tmp_path / "link" / "cache"
    code, _, err = run_cli(["precompute", str(bmp_data), str(out), "--vae", "tiny", "--teacher", "tiny", "--device", "cpu", "-q"])
    assert code == 2
    assert err.strip() == (f"error: output folder {out} is inside the data folder {bmp_data} "
                           f"({out.resolve()} in {bmp_data.resolve()}); write the cache somewhere else")
    assert sorted(p.relative_to(bmp_data) for p in bmp_data.rglob("*")) == before


# --- bad option values: one line, exit 2, nothing created ------------------------------------------


@pytest.mark.parametrize(
    "opts, message",
    [
        (["--device", "foo"], "error: unknown device 'foo'; use auto, cpu, cuda or cuda:N"),
        (["--device", "mps"], "error: unsupported device 'mps'; use auto, cpu, cuda or cuda:N"),
        pytest.param(["--device", "cuda"], "error: --device cuda was asked for but no CUDA device is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
        (["--workers", "-1"], "error: --workers must be at least 1, not -1"),
        (["--workers", "0"], "error: --workers must be at least 1, not 0"),
        (["--shard-size", "0"], "error: --shard-size must be in [1, 65536], not 0"),
        (["--shard-size", "65537"], "error: --shard-size must be in [1, 65536], not 65537"),
        (["--resolution", "4104"], "error: --resolution must be a multiple of 8 in [64, 4096], not 4104"),
        (["--resolution", "56"], "error: --resolution must be a multiple of 8 in [64, 4096], not 56"),
        (["--resolution", "-8"], "error: --resolution must be a multiple of 8 in [64, 4096], not -8"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, not 0"),
    ],
)
def test_bad_precompute_values_one_line_exit_2(bmp_data: Path, tmp_path: Path, run_cli, opts: list[str], message: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["precompute", str(bmp_data), str(out), "--vae", "tiny", "--teacher", "tiny", "-q", *opts])
    assert code == 2
    assert err.strip() == message
    assert not out.exists()


def test_bounds_are_inclusive(bmp_data: Path, tmp_path: Path) -> None:
    for kw in ({"resolution": 64}, {"resolution": 4096}, {"shard_size": 1}, {"shard_size": 65536}, {"batch_size": 1}, {"workers": 1}):
        check_config(tiny_config(bmp_data, tmp_path / "out", **kw))


def test_remote_scheduler_checks_the_device_name_only(bmp_data: Path, tmp_path: Path) -> None:
    check_config(tiny_config(bmp_data, tmp_path / "out", scheduler="tcp://127.0.0.1:1", device="cuda:3"))
    with pytest.raises(UsageError, match="^unknown device 'foo'"):
        check_config(tiny_config(bmp_data, tmp_path / "out", scheduler="tcp://127.0.0.1:1", device="foo"))

