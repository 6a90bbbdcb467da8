"""Caches on S3: written, read, copied, exported and trained from through a real S3 API server
(moto's server on loopback, started here); plus the server going away in the middle of a write."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from repa_cache.cache.copy import copy_cache
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import commit_path, record_path
from repa_cache.cache.open import open_reader
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.storage import store_path
from repa_cache.cache.verify import verify_cache
from repa_cache.cache.wds import export_wds
from repa_cache.cache.wds_reader import WdsReader

from ..conftest import HUNG, tiny_config

ROOT = Path(__file__).resolve().parents[2]


class S3Server:
    """moto's S3 server on a free loopback port; stop() and start() keep its objects, as a real
    service keeps them through an outage."""

    def __init__(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
        }
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def bucket(self) -> str:
        """A new empty bucket; returns its s3:// URL."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        store_path(f"s3://{name}").fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _files(root) -> dict[str, bytes]:
    root = store_path(root)
    return {k: (root / k).read_bytes() for k in root.find()}


def _read_all(path, groups=None) -> dict[str, np.ndarray]:
    r = open_reader(path, groups=groups)
    return r.read(r.valid_indices())


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_precompute_to_s3_is_the_local_cache_bit_for_bit(s3, demo_images, tiny_cache):
    from repa_cache.pipeline.precompute import precompute

    url = f"{s3.bucket()}/cache"
    precompute(tiny_config(demo_images, url))
    local, remote = _files(tiny_cache), _files(url)
    assert sorted(local) == sorted(remote)
    for k in local:  # every object but the commit time is the same bytes
        if not k.startswith("_commits/"):
            assert local[k] == remote[k], k
    _assert_same(_read_all(tiny_cache), _read_all(url))
    report = verify_cache(url, quiet=True)
    assert report.ok and report.shards_checked == 2 * 3, report.problems


def test_cache_copy_round_trip_through_s3_is_byte_identical(s3, tiny_cache, tmp_path, run_cli):
    url = f"{s3.bucket()}/staged"
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), url, "-q"])
    assert code == 0, err
    assert "6 shards" in out and "latents: copied" in out and "teachers/tiny: copied" in out
    assert _files(url) == _files(tiny_cache)  # commit records included: copied verbatim
    code, out, _ = run_cli(["verify", url, "-q"])
    assert code == 0 and out.startswith("ok: 6 shards in 2 groups")
    back = tmp_path / "back"
    code, _, err = run_cli(["cache", "copy", url, str(back), "-q"])
    assert code == 0, err
    assert _files(back) == _files(tiny_cache)
    code, out, _ = run_cli(["cache", "copy", url, str(back), "-q"])  # again: nothing to do
    assert code == 0 and "0 shards (0 B)" in out and "latents: already there" in out


def test_cache_copy_resumes_only_what_is_missing(tiny_cache, tmp_path):
    dst = tmp_path / "dst"
    copy_cache(tiny_cache, dst, quiet=True)
    # An interrupted copy: no commit record yet, two shard records and one shard object not written.
    commit_path(store_path(dst), "teachers/tiny").unlink(missing_ok=False)
    record_path(store_path(dst), "teachers/tiny", 0).unlink(missing_ok=False)
    record_path(store_path(dst), "teachers/tiny", 2).unlink(missing_ok=False)
    next((dst / "teachers" / "tiny" / "patch" / "c").rglob("0/0/0/0")).unlink()  # shard 0 of 'patch'
    assert list(CacheReader(dst).groups) == ["latents"]
    with pytest.raises(CacheError, match="group 'teachers/tiny' of .* is not committed"):
        CacheReader(dst, groups=["tiny"])
    res = copy_cache(tiny_cache, dst, quiet=True)
    assert (res.shards_copied, res.shards_skipped) == (2, 1)  # of the group being copied
    assert res.groups == {"latents": "already there", "teachers/tiny": "copied"}
    assert _files(dst) == _files(tiny_cache)


def test_cache_copy_refuses_a_damaged_source_and_commits_nothing(tiny_cache, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_cache, src)
    obj = next((src / "teachers" / "tiny" / "cls" / "c").rglob("1/0/0"))  # shard 1 of 'cls'
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    dst = tmp_path / "dst"
    with pytest.raises(CacheError, match=r"group 'teachers/tiny' of .*src: shard 1 of 'cls' fails its checksum; it was not copied"):
        copy_cache(src, dst, quiet=True, jobs=1)
    assert not commit_path(store_path(dst), "teachers/tiny").exists()
    assert not record_path(store_path(dst), "teachers/tiny", 1).exists()
    with pytest.raises(CacheError, match="not committed"):
        CacheReader(dst, groups=["tiny"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-empty", "destination DST is not empty and is not a repa cache"),
        ("other-cache", "DST is another cache (made with other settings: resolution: 128 -> 256"),
        ("uncommitted", "SRC has no committed group"),
        ("jobs", "--jobs must be positive, not 0"),
        ("inside", "source SRC and destination SRC/inner overlap"),
    ],
)
def test_cache_copy_refusals(case, message, tiny_cache, demo_images, tmp_path, run_cli):
    src, dst = tiny_cache, tmp_path / "dst"
    args = []
    if case == "not-empty":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    elif case == "other-cache":
        from repa_cache.pipeline.precompute import precompute

        precompute(tiny_config(demo_images, dst, resolution=128))
    elif case == "uncommitted":
        src = tmp_path / "partial"
        shutil.copytree(tiny_cache, src)
        for p in (src / "_commits").rglob("*.json"):
            p.unlink()
    elif case == "jobs":
        args = ["--jobs", "0"]
    elif case == "inside":
        dst = Path(src) / "inner"
    code, _, err = run_cli(["cache", "copy", str(src), str(dst), *args])
    assert code == 2, err
    assert message.replace("DST", str(dst)).replace("SRC", str(src)) in err, err
    assert len(err.strip().splitlines()) == 1


def test_export_to_s3_and_train_from_s3(s3, tiny_cache, tmp_path, run_cli):
    bucket = s3.bucket()
    cache_url, export_url = f"{bucket}/cache", f"{bucket}/wds"
    copy_cache(tiny_cache, cache_url, quiet=True)
    index = export_wds(cache_url, export_url, shard_bytes=20_000)
    assert len(index["shards"]) > 1
    reader = WdsReader(export_url, verify_checksums=True)
    _assert_same(reader.read(reader.valid_indices()), _read_all(tiny_cache))
    for path in (cache_url, export_url):  # DataLoader workers reopen the store after fork
        run = tmp_path / path.rsplit("/", 1)[1]
        code, _, err = run_cli(["train", "--cache", path, "--out", str(run), "--model", "SiT-tiny/2", "--batch-size", "4",
                                "--max-steps", "2", "--workers", "2", "--device", "cpu", "--quiet"])
        assert code == 0, err
        assert (run / "checkpoints").is_dir()


def test_missing_bucket_is_one_line(s3, run_cli, tiny_cache):
    code, _, err = run_cli(["stats", "s3://no-such-bucket-here/cache"])
    assert code == 2
    assert err.strip() == "error: no cache at s3://no-such-bucket-here/cache"
    code, _, err = run_cli(["cache", "copy", str(tiny_cache), "s3://no-such-bucket-here/cache", "-q"])
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: storage failed:") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_s3_server_stopped_mid_write_then_restarted(s3, demo_images, tmp_path):
    """A teacher is being added to a committed S3 cache when the server goes away. The run fails with
    one line; after the restart the committed groups read as before, the partial group is refused,
    and running the command again completes it, equal to an uninterrupted local run."""
    url = f"{s3.bucket()}/cache"
    env = {**os.environ, **s3.env, "AWS_MAX_ATTEMPTS": "2"}
    base = [sys.executable, "-m", "repa_cache.cli", "precompute", str(demo_images)]
    opts = ["--vae", "tiny", "--shard-size", "2", "--batch-size", "2", "--device", "cpu", "--workers", "1", "--quiet"]

    def run(out: str, teachers: list[str], **kw):
        t = [a for name in teachers for a in ("--teacher", name)]
        return subprocess.run(base + [out] + t + opts, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HUNG, **kw)

    first = run(url, ["tiny"])
    assert first.returncode == 0, first.stderr
    before = _read_all(url)

    proc = subprocess.Popen(base + [url, "--teacher", "tiny", "--teacher", "tiny-reg"] + opts, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = store_path(url) / "_records" / "teachers" / "tiny-reg"
    hung = time.monotonic() + HUNG
    while proc.poll() is None and len(records.iterdir()) < 2:  # the outage comes after 2 of 11 shards, however long they take
        if time.monotonic() > hung:
            proc.kill()
            pytest.fail(f"precompute wrote fewer than 2 shards in {HUNG} s: hung")
        time.sleep(0.02)
    s3.stop()
    try:
        _, err = proc.communicate(timeout=HUNG)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        s3.start()
    assert proc.returncode == 1, err
    assert err.startswith("error: storage failed:") and "run the command again" in err, err
    assert "Traceback" not in err
    done = len(records.iterdir())
    assert 2 <= done < 11, f"the outage came at {done} of 11 shards; the test proves nothing"

    assert not commit_path(store_path(url), "teachers/tiny-reg").exists()
    _assert_same(_read_all(url), before)  # committed groups: intact, and the partial one is not opened
    with pytest.raises(CacheError, match="group 'teachers/tiny-reg' of .* is not committed"):
        CacheReader(url, groups=["tiny-reg"])

    again = run(url, ["tiny", "tiny-reg"])
    assert again.returncode == 0, again.stderr
    assert "teachers/tiny-reg: resumed" in again.stdout and "teachers/tiny: already committed" in again.stdout
    assert verify_cache(url, quiet=True).ok
    clean = run(str(tmp_path / "clean"), ["tiny", "tiny-reg"])
    assert clean.returncode == 0, clean.stderr
    _assert_same(_read_all(url), _read_all(tmp_path / "clean"))


def test_lock_on_s3_is_a_conditional_put(s3):
    from repa_cache.cache.lock import LOCK_FILE, LockHeld, acquire, release

    root = store_path(s3.bucket() + "/c")
    info = acquire(root, "repa precompute")
    with pytest.raises(LockHeld, match=r"is being written by repa precompute \(host .*; wait for it to finish"):
        acquire(root, "repa cache copy")
    lock = root / LOCK_FILE
    with pytest.raises(FileExistsError), lock.fs.open(lock.path, "xb") as f:  # the store refuses it (If-None-Match)
        f.write(b"x")
    release(root, info)
    assert not (root / LOCK_FILE).exists()
