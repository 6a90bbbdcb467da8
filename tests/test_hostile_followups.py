"""Hostile inputs to the newer surfaces, each through the real command line: one line and exit 2,
no code from a file runs, no size read from a file is trusted before its bytes are there, nothing we
did not write is touched, damaged data is never trained on.

Covered: import-ckpt (planted pickle, huge and garbage files, a header claiming a huge model),
GMem banks and evaluation npz files (objects, lying headers, wrong dtype or shape), int8 caches with
an unknown codec or bad scales, forged ``_lock.json`` files, absurd ``--teacher-layers``, cache copy
onto or into its source or into a foreign folder, ``--init-from`` a hostile checkpoint, two trains
into one ``--out``, a SIGKILL during an int8 transcode, and manifests of another schema or size."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from repa_cache.cache.lock import LOCK_FILE

from .cache.test_cache_format import N, build
from .conftest import HUNG

ROOT = Path(__file__).resolve().parents[1]


def _one_line(code: int, err: str, message: str) -> None:
    """Exit 2 and exactly ``error: message`` on stderr."""
    assert code == 2, err
    assert err == f"error: {message}\n", err


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


class _Payload:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- import-ckpt -------------------------------------------------------------------------------------
def test_import_ckpt_planted_pickle_runs_no_code(tmp_path, run_cli):
    marker = tmp_path / "pwned"
    for name, save in (("legacy.pt", lambda p, o: p.write_bytes(pickle.dumps(o, protocol=2))),
                       ("zip.pt", lambda p, o: torch.save(o, p))):
        src = tmp_path / name
        save(src, {"ema": {}, "args": _Payload(marker)})
        code, out, err = run_cli(["import-ckpt", str(src), str(tmp_path / "run")])
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: {src} is not a readable REPA checkpoint (Weights only load failed"), err
        assert not marker.exists() and not (tmp_path / "run").exists()


def test_import_ckpt_huge_and_garbage_files_are_one_line(tmp_path, run_cli):
    huge = tmp_path / "huge.pt"
    with open(huge, "wb") as f:  # 64 GiB on paper, nothing on disk
        f.truncate(64 * 2**30)
    code, _, err = run_cli(["import-ckpt", str(huge), str(tmp_path / "run")])  # the reason is torch's own words
    assert code == 2 and err.startswith(f"error: {huge} is not a readable REPA checkpoint (") and err.count("\n") == 1, err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run_cli(["import-ckpt", str(garbage), str(tmp_path / "run")])
    assert code == 2 and err.startswith(f"error: {garbage} is not a readable REPA checkpoint (") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_import_ckpt_header_claiming_a_huge_model_is_refused_before_building_it(tmp_path, run_cli, monkeypatch):
    """Every tensor of a width-65536 SiT, each a view of one float (stride 0): a 5 KB file whose
    shapes claim 1.7e11 parameters. The imported run would allocate them when sampled."""
    import repa_cache.train.model as model_mod
    from repa_cache.train.interop import _expected, to_repa

    with monkeypatch.context() as m:
        m.setattr(model_mod, "MAX_MODEL_VALUES", 2**60)  # only to list the shapes of such a model
        config = model_mod.SiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=65536, depth=2, num_heads=4,
                                     num_classes=4, encoder_depth=1, projector_dim=8, z_dims=(8,))
        want, _ = _expected(config)
    one = torch.zeros(1)
    src = tmp_path / "wide.pt"
    torch.save({"ema": {to_repa(k): one.expand(v.shape) for k, v in want.items()}}, src)
    assert src.stat().st_size < 10_000
    code, out, err = run_cli(["import-ckpt", str(src), str(tmp_path / "run"), "--num-heads", "4", "--encoder-depth", "1"])
    _one_line(code, err, f"{src} ['ema']: a SiT of depth 2, width 65536, 4 tokens, 4 classes and projectors [8] would hold "
                         "about 1.72e+11 values; at most 8.59e+09 are built")
    assert out == "" and not (tmp_path / "run").exists()


# -- evaluate: npz files -----------------------------------------------------------------------------
def _npz_with_header(path: Path, shape: tuple[int, ...], descr: str = "|u1", data: bytes = b"\0" * 64) -> Path:
    """An npz whose arr_0 header claims ``shape`` over ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", buf.getvalue() + data)
    return path


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("npz")
    np.savez(d / "good.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(d / "objects.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(d / "float.npz", arr_0=np.zeros((4, 16, 16, 3), np.float32))
    np.savez(d / "gray.npz", arr_0=np.zeros((4, 16, 16), np.uint8))
    np.savez(d / "wide.npz", arr_0=np.zeros((1, 1, 5000, 3), np.uint8))
    np.savez(d / "fortran.npz", arr_0=np.asfortranarray(np.zeros((4, 16, 16, 3), np.uint8)))
    _npz_with_header(d / "short.npz", (1000, 16, 16, 3))
    _npz_with_header(d / "huge.npz", (2, 2**20, 2**20, 3))
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize("bad, problem", [
    ("objects", "'arr_0' cannot be read: it holds Python objects (object (2,)), which are never unpickled"),
    ("short", "'arr_0' cannot be read: its header says uint8 (1000, 16, 16, 3) but the file has 192 bytes"),
    ("huge", "'arr_0' cannot be read: its header says uint8 (2, 1048576, 1048576, 3) but the file has 192 bytes"),
    ("fortran", "'arr_0' cannot be read: it is stored in Fortran order; save it C-ordered (np.ascontiguousarray)"),
    ("float", "arr_0 must be uint8 (N, H, W, 3) images, got float32 (4, 16, 16, 3)"),
    ("gray", "arr_0 must be uint8 (N, H, W, 3) images, got uint8 (4, 16, 16)"),
    ("wide", "arr_0 holds 5000x1 images; evaluation reads sides of 1 to 4096"),
])
def test_evaluate_refuses_a_hostile_npz_before_loading_an_extractor(npz_files, bad, problem, tmp_path, run_cli):
    """Before: the Inception weights were loaded (here: a failed download) before the files were
    looked at, and a lying header ended in a ValueError traceback."""
    good, path = npz_files["good"], npz_files[bad]
    for args in ((path, good), (good, path)):
        code, out, err = run_cli(["evaluate", *map(str, args), "--stats-dir", str(tmp_path / "st"), "-q"])
        _one_line(code, err, f"{path}: {problem}")
        assert out == "" and not (tmp_path / "st").exists()


# -- GMem banks --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gmem_run(tiny_cache, tmp_path_factory) -> Path:
    """A GMem checkpoint (untrained weights) with the card of a run on the tiny cache."""
    from repa_cache.train.checkpoint import save_checkpoint
    from repa_cache.train.config import TrainConfig
    from repa_cache.train.loop import plan_run

    run = tmp_path_factory.mktemp("gmem") / "run"
    setup = plan_run(TrainConfig(cache=str(tiny_cache), out=str(run), model="SiT-tiny/2", method="gmem"))
    model, ema = setup.method.build_student(setup.model_config), setup.method.build_student(setup.model_config)
    save_checkpoint(run, 1, model, ema, torch.optim.AdamW(model.parameters()), setup.card)
    return run


def _bank_files(d: Path) -> dict[str, Path]:
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "ints.npy", np.zeros((3, 32), np.int32))
    short = d / "short.npy"  # a header that claims 1000 entries over the bytes of 8
    with open(short, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (1000, 32)})
        f.write(np.ones((8, 32), np.float32).tobytes())
    return {p.stem: p for p in (d / "objects.npy", d / "ints.npy", short)}


def test_sample_bank_refuses_hostile_npy_files_in_one_line(gmem_run, tmp_path, run_cli):
    banks = _bank_files(tmp_path)
    bad = "is not a bank (a float32 (N, Z) .npy from repa gmem-bank)"
    want = {"objects": f"{bad}; it holds object (2,)", "ints": f"{bad}; it holds int32 (3, 32)",
            "short": f"{bad}; its header says float32 (1000, 32) but the file has {banks['short'].stat().st_size} bytes"}
    for name, path in banks.items():
        out = tmp_path / f"s-{name}"
        code, _, err = run_cli(["sample", "--ckpt", str(gmem_run), "--out", str(out), "--bank", str(path), "--num", "2",
                                "--steps", "2", "--device", "cpu", "-q"])
        _one_line(code, err, f"--bank {path} {want[name]}")
        assert not (out / "sample.json").exists()


def test_gmem_bank_never_writes_over_an_existing_npy(tiny_cache, tmp_path, run_cli):
    for name, path in _bank_files(tmp_path).items():
        before = path.read_bytes()
        code, _, err = run_cli(["gmem-bank", str(tiny_cache), str(path), "--teacher", "tiny"])
        _one_line(code, err, f"{path} already exists; remove it or choose another path")
        assert path.read_bytes() == before, name


# -- --teacher-layers --------------------------------------------------------------------------------
SYNTAX = "--teacher-layers takes FIRST or FIRST-LAST (1-based block numbers, e.g. 9-12), not '{}'"


@pytest.mark.parametrize("value, message", [
    ("0", "--teacher-layers 0 is outside the blocks 1..2 of teacher 'tiny'"),
    ("3", "--teacher-layers 3 is outside the blocks 1..2 of teacher 'tiny'"),
    ("9999", "--teacher-layers 9999 is outside the blocks 1..2 of teacher 'tiny'"),
    ("1-9999", "--teacher-layers 1-9999 is outside the blocks 1..2 of teacher 'tiny'"),
    ("2-1", "--teacher-layers 2-1 runs backwards; give FIRST-LAST with FIRST <= LAST (e.g. 1-2)"),
    ("tiny=2-1", "--teacher-layers 2-1 runs backwards; give FIRST-LAST with FIRST <= LAST (e.g. 1-2)"),
    ("99999", SYNTAX.format("99999")),
    ("99999999999999999999", SYNTAX.format("99999999999999999999")),
    ("-3", SYNTAX.format("-3")),
    ("1.5", SYNTAX.format("1.5")),
    ("3-", SYNTAX.format("3-")),
    ("two", SYNTAX.format("two")),
    ("tiny=", SYNTAX.format("")),
    ("=1", "--teacher-layers names teacher '', which this command does not encode (--teacher: tiny)"),
])
def test_absurd_teacher_layers_are_one_line_before_anything_is_written(demo_images, tmp_path, run_cli, value, message):
    out = tmp_path / "c"
    code, stdout, err = run_cli(["precompute", str(demo_images), str(out), "--vae", "tiny", "--teacher", "tiny",
                                 "--teacher-layers", value, "--device", "cpu", "-q"])
    _one_line(code, err, message)
    assert stdout == "" and not out.exists()


# -- cache copy --------------------------------------------------------------------------------------
def test_cache_copy_onto_into_or_around_its_source_touches_nothing(tmp_path, run_cli):
    import zarr

    src = tmp_path / "c"
    build(src)
    (tmp_path / "link").symlink_to(src)
    foreign = tmp_path / "zarr-store"  # a zarr group of someone else's
    zarr.open_group(str(foreign), mode="w").create_array("x", data=np.arange(4))
    before, theirs = _tree(src), _tree(foreign)
    cases = {
        src: "overlap", tmp_path / "link": "overlap", src / "sub": "overlap", src / "teachers" / "t": "overlap",
        Path(f"{src}/../c"): "overlap", tmp_path: "overlap", tmp_path / "link" / "sub": "overlap",
        foreign: f"{foreign} is a zarr group but not a repa cache (no 'repa_cache' attributes)",
    }
    for dst, message in cases.items():
        code, out, err = run_cli(["cache", "copy", str(src), str(dst), "-q", "--feature-codec", "int8"])
        if message == "overlap":
            message = f"source {src} and destination {dst} overlap"
        _one_line(code, err, message)
        assert out == "" and _tree(src) == before and _tree(foreign) == theirs, dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "link", "zarr-store"]


def test_cache_copy_into_a_folder_of_foreign_files_refuses_untouched(tmp_path, run_cli):
    src, dst = tmp_path / "c", tmp_path / "d"
    build(src)
    (dst / "latents").mkdir(parents=True)
    (dst / "latents" / "notes.txt").write_text("mine")
    (dst / "zarr.txt").write_text("also mine")
    before = _tree(dst)
    code, _, err = run_cli(["cache", "copy", str(src), str(dst), "-q"])
    _one_line(code, err, f"destination {dst} is not empty and is not a repa cache")
    assert _tree(dst) == before


# -- forged locks --------------------------------------------------------------------------------------
def _forge(root: Path, **info) -> dict:
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "token": "forged", "command": "repa precompute",
            "started_at": "2026-01-01T00:00:00+00:00", **info}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    return lock


@pytest.fixture()
def cache_copy(tiny_cache, tmp_path) -> Path:
    root = tmp_path / "c"
    shutil.copytree(tiny_cache, root)
    return root


def test_a_forged_lock_of_a_live_pid_on_this_host_is_respected(cache_copy, run_cli):
    """The pid runs (it is this test's), so the lock is not stale: refused, never taken over."""
    lock = _forge(cache_copy)
    before = _tree(cache_copy)
    code, _, err = run_cli(["latent-stats", str(cache_copy), "-q"])
    _one_line(code, err, f"{cache_copy} is being written by repa precompute (host {lock['host']}, pid {os.getpid()}, "
                         "started 2026-01-01T00:00:00+00:00); wait for it to finish (or stop it) and run again")
    assert _tree(cache_copy) == before


def test_a_forged_lock_of_another_host_is_never_taken_over(cache_copy, run_cli):
    _forge(cache_copy, host="gpu-node-7", pid=1)
    before = _tree(cache_copy)
    code, _, err = run_cli(["latent-stats", str(cache_copy), "-q"])
    _one_line(code, err, f"{cache_copy} is being written by repa precompute (host gpu-node-7, pid 1, started "
                         f"2026-01-01T00:00:00+00:00); if that writer is gone, delete {cache_copy / LOCK_FILE} and run again")
    assert _tree(cache_copy) == before


@pytest.mark.parametrize("content", [b"{torn", b"[1, 2]", b"\xff\xfe garbage", b"{}", b"null"])
def test_a_garbage_lock_is_refused_in_one_line(cache_copy, run_cli, content):
    (cache_copy / LOCK_FILE).write_bytes(content)
    before = _tree(cache_copy)
    code, _, err = run_cli(["latent-stats", str(cache_copy), "-q"])
    _one_line(code, err, f"{cache_copy} is locked by another writer ({cache_copy / LOCK_FILE} is unreadable); if no writer "
                         f"is running, delete {cache_copy / LOCK_FILE} and run again")
    assert _tree(cache_copy) == before


def test_a_lock_with_multiline_fields_is_shown_on_one_line(cache_copy, run_cli):
    """Before: the fields were printed as found, so a forged command spread the error over lines."""
    _forge(cache_copy, command="repa precompute\nerror: something else\x1b[31m" + "x" * 500, host="other\nhost")
    code, _, err = run_cli(["latent-stats", str(cache_copy), "-q"])
    shown = ("repa precompute?error: something else?[31m" + "x" * 500)[:77] + "..."
    _one_line(code, err, f"{cache_copy} is being written by {shown} (host other?host, pid {os.getpid()}, started "
                         f"2026-01-01T00:00:00+00:00); if that writer is gone, delete {cache_copy / LOCK_FILE} and run again")


def test_a_huge_lock_file_is_not_read_whole(cache_copy, run_cli):
    """Before: the whole file was read; a sparse 64 GiB lock would have been allocated."""
    with open(cache_copy / LOCK_FILE, "wb") as f:
        f.write(b'{"host": "x"' + b" " * 100)
        f.truncate(64 * 2**30)
    code, _, err = run_cli(["latent-stats", str(cache_copy), "-q"])
    _one_line(code, err, f"{cache_copy} is locked by another writer ({cache_copy / LOCK_FILE} is unreadable); if no writer "
                         f"is running, delete {cache_copy / LOCK_FILE} and run again")


# -- manifests -----------------------------------------------------------------------------------------
def _column(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, values)


MANIFESTS = {
    "no label": (lambda t: t.drop(["label"]), "it has no column 'label'"),
    "string labels": (lambda t: _column(t, "label", pa.array([str(i) for i in range(N)])), "column 'label' holds string"),
    "labels beyond the classes": (lambda t: _column(t, "label", pa.array([0] * (N - 1) + [10**9], pa.int64())),
                                  "labels range over [0, 1000000000], the cache has classes 0..2"),
    "negative labels": (lambda t: _column(t, "label", pa.array([-1] * N, pa.int64())),
                        "labels range over [-1, -1], the cache has classes 0..2"),
    "missing labels": (lambda t: _column(t, "label", pa.nulls(N, pa.int64())), "column 'label' has 10 missing values"),
    "integer status": (lambda t: _column(t, "status", pa.array([1] * N)), "column 'status' holds int64"),
    "unknown status": (lambda t: _column(t, "status", pa.array(["ok"] * (N - 1) + ["fine"])),
                       "status 'fine' is not one of ok, converted, skipped"),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_a_manifest_of_another_schema_is_one_line_for_verify_stats_and_readers(tmp_path, run_cli, name):
    """Before: stats raised KeyError, verify an ArrowNotImplementedError, and labels outside the
    classes or null (read as -2^63) reached the trainer."""
    from repa_cache.cache.errors import CacheError
    from repa_cache.cache.reader import CacheReader

    root = tmp_path / "c"
    build(root)
    edit, problem = MANIFESTS[name]
    pq.write_table(edit(pq.read_table(root / "manifest.parquet")), root / "manifest.parquet")
    want = f"{root / 'manifest.parquet'} is not a manifest of this cache: {problem} (damaged cache)"
    commands = [["stats", str(root)], ["verify", str(root), "-q"]]
    for cmd in commands if name != "no label" else commands[:1]:  # verify reads status and label: there a read error
        code, out, err = run_cli(cmd)
        _one_line(code, err, want)
        assert out == ""
    with pytest.raises(CacheError) as e:
        CacheReader(root)
    assert "\n" not in str(e.value) and "manifest.parquet is not a" in str(e.value)


def test_a_manifest_of_an_absurd_row_count_is_refused_from_its_footer(tmp_path, run_cli):
    root = tmp_path / "c"
    build(root)
    pq.write_table(pa.table({"label": pa.nulls(10**8, pa.int32())}), root / "manifest.parquet")  # a few hundred KB
    for cmd in (["stats", str(root)], ["verify", str(root), "-q"]):
        code, _, err = run_cli(cmd)
        _one_line(code, err, f"{root / 'manifest.parquet'} has 100000000 rows but the cache metadata says {N} samples (damaged cache)")


# -- training on hostile caches and folders --------------------------------------------------------------
GROUP = "teachers/tiny"


def _train_args(cache: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(out), "--model", "SiT-tiny/2", "--batch-size", "8", "--max-steps", "2",
            "--ckpt-every", "2", "--log-every", "1", "--workers", "0", "--device", "cpu", "-q", *more]


@pytest.fixture(scope="module")
def int8_cache(tiny_cache, tmp_path_factory) -> Path:
    from repa_cache.cache.copy import copy_cache

    out = tmp_path_factory.mktemp("int8") / "c"
    copy_cache(tiny_cache, out, feature_codec="int8", quiet=True)
    return out


def test_an_unknown_codec_is_never_trained_on(int8_cache, tmp_path, run_cli):
    cache = tmp_path / "c"
    shutil.copytree(int8_cache, cache)
    zj = cache / GROUP / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"]["repa_group"]["feature_codec"]["name"] = "int4"
    zj.write_text(json.dumps(doc))
    code, out, err = run_cli(_train_args(cache, tmp_path / "run"))
    _one_line(code, err, f"group '{GROUP}' of {cache}: metadata out of bounds: unknown feature codec 'int4' (this version "
                         "reads float16, int8); upgrade repa-cache (damaged cache)")
    assert out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_nan_infinite_or_negative_scales_are_never_trained_on(int8_cache, tmp_path, run_cli, value):
    """Scales rewritten in place (so the shard no longer matches its checksums): with the checks
    the first read names the shard; without them (--no-verify) the values themselves are refused.
    Before, a negative scale was trained on (it turns the token around)."""
    import zarr

    from repa_cache.cache.reader import CacheReader

    cache = tmp_path / "c"
    shutil.copytree(int8_cache, cache)
    valid = CacheReader(cache).valid_indices()
    arr = zarr.open_array(str(cache / GROUP / "patch_scale"), mode="r+")
    block = np.asarray(arr[:])
    block[valid, 0, 3] = value  # every valid sample, view 0, token 3
    arr[:] = block
    code, _, err = run_cli(_train_args(cache, tmp_path / "checked"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: group '{GROUP}' of {cache}: shard "), err
    assert "patch_scale" in err and ("checksum" in err or "differ" in err), err
    code, _, err = run_cli(_train_args(cache, tmp_path / "unchecked", "--no-verify"))
    assert code == 2 and err.count("\n") == 1, err
    what = "negative scales" if value < 0 else "missing or non-finite data"
    assert err.startswith(f"error: group '{GROUP}' of {cache}: shard ") and \
        f"has {what} in 'patch_scale' at index " in err and err.endswith("(damaged cache; run `repa verify`)\n"), err
    assert not list((tmp_path / "unchecked").glob("checkpoints/*.pt")) and not list((tmp_path / "checked").glob("checkpoints/*.pt"))


def test_a_negative_scale_is_refused_by_the_reader_naming_the_sample(int8_cache, tmp_path):
    import zarr

    from repa_cache.cache.errors import CacheError
    from repa_cache.cache.reader import CacheReader

    cache = tmp_path / "c"
    shutil.copytree(int8_cache, cache)
    reader = CacheReader(cache)
    i = int(reader.valid_indices()[5])
    arr = zarr.open_array(str(cache / GROUP / "cls_scale"), mode="r+")
    block = np.asarray(arr[:])
    block[i, 1, 0] = -0.5
    arr[:] = block
    shard = reader.meta.shard_of(i)
    with pytest.raises(CacheError) as e:
        CacheReader(cache).read([i], raw=True)
    assert str(e.value) == (f"group '{GROUP}' of {cache}: shard {shard} has negative scales in 'cls_scale' at index {i} "
                            "(damaged cache; run `repa verify`)")


def test_a_negative_scale_in_an_export_is_refused_by_its_reader(int8_cache, tmp_path):
    """The webdataset export's reader checks the values of each member as the cache's does."""
    from repa_cache.cache.errors import CacheError
    from repa_cache.cache.wds import export_wds, npy_bytes
    from repa_cache.cache.wds_reader import WdsReader

    export_wds(int8_cache, tmp_path / "wds", quiet=True)
    reader = WdsReader(tmp_path / "wds")
    i = int(reader.valid_indices()[0])
    good = reader.read([i], raw=True)[f"{GROUP}/cls_scale"][0]  # (V, 1)
    assert reader._decode(npy_bytes(good), "x.tar", i, GROUP, "cls_scale").tolist() == good.tolist()
    bad = good.copy()
    bad[0, 0] = -0.5
    with pytest.raises(CacheError) as e:
        reader._decode(npy_bytes(bad), "x.tar", i, GROUP, "cls_scale")
    assert str(e.value) == f"{reader.root}: shard x.tar has negative scales in '{GROUP}/cls_scale' at index {i}"


@pytest.mark.parametrize("kind", ["pickle", "garbage"])
def test_init_from_a_hostile_checkpoint_runs_no_code(tiny_cache, tmp_path, run_cli, kind):
    from repa_cache.train import checkpoint as ck

    marker = tmp_path / "pwned"
    folder = tmp_path / "theirs"
    path = ck.checkpoint_path(folder, 5)
    path.parent.mkdir(parents=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"format": ck.FORMAT, "version": ck.FORMAT_VERSION, "x": _Payload(marker)}, protocol=2))
    else:
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    ck.checksum_path(path).write_text(json.dumps(ck._file_digest(path)))  # even with a record that matches
    code, out, err = run_cli(_train_args(tiny_cache, tmp_path / "run", "--init-from", str(folder)))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {path} is not a readable checkpoint of this tool ("), err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_second_train_into_one_out_is_refused_and_the_first_is_unharmed(tiny_cache, tmp_path, run_cli):
    """The second run starts while the first is between its steps (from a hook of the first: no
    timing involved); the first then finishes as a run alone does."""
    from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
    from repa_cache.train.config import TrainConfig
    from repa_cache.train.loop import train

    cfg = dict(model="SiT-tiny/2", batch_size=8, max_steps=3, ckpt_every=3, log_every=1, num_workers=0, device="cpu",
               quiet=True)
    run = tmp_path / "run"
    seen: list[tuple[int, int, str]] = []

    class SecondRun:
        def after_step(self, info) -> None:
            if info.step == 2:
                code, _, err = run_cli(_train_args(tiny_cache, run))
                seen.append((info.step, code, err))

        def finish(self, step: int) -> None:
            pass

    res = train(TrainConfig(cache=str(tiny_cache), out=str(run), **cfg), hooks=[lambda ctx: SecondRun()])
    assert len(seen) == 1
    step, code, err = seen[0]
    assert step == 2 and not (run / LOCK_FILE).exists()  # released when the first run ended
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {run} is being written by repa train (host {socket.gethostname()}, pid {os.getpid()}, started ")
    assert err.endswith("; wait for it to finish (or stop it) and run again\n"), err
    assert res.step == 3 and [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    alone = tmp_path / "alone"
    train(TrainConfig(cache=str(tiny_cache), out=str(alone), **cfg))
    a, b = load_checkpoint(latest_checkpoint(run)), load_checkpoint(latest_checkpoint(alone))
    assert a.step == b.step == 3
    for k, v in b.model.items():
        assert torch.equal(a.model[k], v), k
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in alone.iterdir())


# -- a SIGKILL during an int8 transcode ----------------------------------------------------------------
_KILLER = """
import os, signal, sys
from repa_cache.cache import writer
from repa_cache.cache.copy import copy_cache

calls, real = [0], writer.write_json_atomic
def write_then_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # shard data written, its record (or the commit) not
    return real(*args, **kwargs)
writer.write_json_atomic = write_then_die
copy_cache(sys.argv[1], sys.argv[2], feature_codec="int8", jobs=1, quiet=True)
"""


@pytest.mark.parametrize("kill_at, latents", [(2, "copied"), (4, "already there")])  # before shard 1's record; the commit
def test_sigkill_during_an_int8_transcode_then_rerun_equals_an_uninterrupted_copy(tiny_cache, int8_cache, tmp_path,
                                                                                     run_cli, kill_at, latents):
    from repa_cache.cache.format import commit_path, record_path
    from repa_cache.cache.reader import CacheReader, commit_record
    from repa_cache.cache.verify import verify_cache

    dst = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tiny_cache), str(dst), str(kill_at)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (dst / LOCK_FILE).exists() and not commit_path(dst, GROUP).exists()  # killed mid-way, holding the lock
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(dst), "--feature-codec", "int8", "-q"])
    assert code == 0, err
    assert err.startswith(f"taking over the stale lock of {dst} left by repa cache copy")
    assert out.strip().endswith(f"latents: {latents}, {GROUP}: transcoded to int8")
    assert verify_cache(dst, quiet=True).ok and not (dst / LOCK_FILE).exists()
    ra, rb = CacheReader(int8_cache), CacheReader(dst)
    for g in ra.groups:
        assert {k: v for k, v in commit_record(dst, g).items() if k != "committed_at"} == \
            {k: v for k, v in commit_record(int8_cache, g).items() if k != "committed_at"}
        for s in range(ra.meta.num_shards):
            assert json.loads(record_path(dst, g, s).read_text())["checksums"] == \
                json.loads(record_path(int8_cache, g, s).read_text())["checksums"]
    idx = ra.valid_indices()
    xa, xb = ra.read(idx, raw=True), rb.read(idx, raw=True)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])
