"""Per-chunk checksums bound to the shard records (format v2), and caches written before them (v1).

Every refusal the trainer's reader had with whole-shard hashes still holds, now for the chunks it
reads: damaged bytes, a truncated shard, a swapped or stale shard (also one whose chunks check
themselves perfectly), a chunk missing from the index, fill values.
"""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from repa_cache.cache import writer
from repa_cache.cache.chunks import CRC_BYTES, ChunkTable, chunk_layout
from repa_cache.cache.copy import copy_cache
from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import FORMAT_VERSION, LATENTS, ROOT_ATTR, fingerprint_diff, record_path
from repa_cache.cache.reader import CacheReader, open_meta
from repa_cache.cache.verify import verify_cache

from ..cache.shards import chunk_span, index_entries, num_chunks_of, written_as_v1
from ..cache.test_cache_format import SKIPPED, N, _groups, _shard_file, build

TEACHER = "teachers/t"


@pytest.fixture()
def cache(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "c"
    return root, build(root)


def _refused(root: Path, match: str, indices: list[int], views: list[int] | None = None) -> None:
    r = CacheReader(root, verify_checksums=True)
    with pytest.raises(CacheError, match=match):
        r.read(indices) if views is None else r.read_views(indices, views)


def test_records_bind_the_checksums_of_every_chunk(cache):
    root, _ = cache
    assert open_meta(root)[1].format_version == FORMAT_VERSION == 2
    for group in (LATENTS, TEACHER):
        grp = zarr.open_group(str(root / group), mode="r")
        for name in ("mean", "std") if group == LATENTS else ("patch", "cls"):
            arr = grp[name]
            layout = chunk_layout(arr)
            assert layout is not None and layout.chunks_per_shard == (4, 2, 1, 1, 1)[: arr.ndim]
            for shard in range(3):
                rec = json.loads(record_path(root, group, shard).read_text())
                raw = _shard_file(root, group, name, shard).read_bytes()
                assert ChunkTable.from_json(rec["chunks"][name], layout) == ChunkTable.of_object(raw, layout)
                assert rec["chunks"][name]["index_crc32c"] == raw[-CRC_BYTES:].hex()
                # each listed chunk ends in the crc32c of the bytes before it, as zarr's codec wrote it
                for pos, (offset, length) in enumerate(index_entries(raw, layout.num_chunks)):
                    if offset == 2**64 - 1:
                        assert rec["chunks"][name]["chunk_crc32c"][8 * pos: 8 * pos + 8] == "00000000"
                        continue
                    chunk = raw[int(offset): int(offset + length)]
                    assert np.uint32(google_crc32c.value(chunk[:-CRC_BYTES])).tobytes() == chunk[-CRC_BYTES:]


def test_damaged_chunk_refused_with_its_own_crc_and_others_still_read(cache):
    root, truth = cache
    f = _shard_file(root, LATENTS, "mean", 2)
    start, _ = chunk_span(f, position=0)  # sample 8, view 0
    raw = bytearray(f.read_bytes())
    raw[start + 20] ^= 0x80
    f.write_bytes(bytes(raw))
    _refused(root, "shard 2 of 'mean' fails its checksum: its .* bytes differ from those written", [8], [0])
    ok = CacheReader(root, verify_checksums=True).read_views([8, 9], [1, 0])  # other chunks of the same shard
    np.testing.assert_array_equal(ok["latents/mean"], truth[LATENTS]["mean"][[8, 9], [1, 0]])


def test_chunk_that_checks_itself_but_is_not_the_recorded_one_is_refused(cache):
    """A stale chunk: its bytes and crc32c agree and the index is unchanged (same length), so zarr
    alone would decode it; the record's crc32c for that position is what tells."""
    root, truth = cache
    f = _shard_file(root, TEACHER, "patch", 1)
    start, stop = chunk_span(f, position=0)  # sample 4, view 0
    raw = bytearray(f.read_bytes())
    body = bytearray(raw[start: stop - CRC_BYTES])
    body[-1] ^= 0x01  # a last payload byte, so the blosc header stays readable
    raw[start:stop] = bytes(body) + np.uint32(google_crc32c.value(bytes(body))).tobytes()
    f.write_bytes(bytes(raw))
    _refused(root, r"shard 1 of 'patch' holds another chunk than its record lists for sample 4 view 0 \(a swapped or stale shard\)",
             [4], [0])
    np.testing.assert_array_equal(CacheReader(root, verify_checksums=True).read_views([4], [1])["teachers/t/patch"],
                                  truth[TEACHER]["patch"][[4], 1])
    assert [(p.group, p.shard) for p in verify_cache(root, quiet=True).problems] == [(TEACHER, 1)]


def test_swapped_shards_refused(cache):
    root, _ = cache
    a, b = _shard_file(root, TEACHER, "cls", 0), _shard_file(root, TEACHER, "cls", 2)
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b)
    b.write_bytes(raw_a)
    _refused(root, "shard 0 of 'cls' is not the object its record describes", [0])
    _refused(root, "shard 2 of 'cls' is not the object its record describes", [9])


def test_stale_shard_of_an_earlier_write_refused(cache):
    """The object an earlier write left (a rewrite whose object was then lost and restored from an
    old copy): valid zarr, wrong data."""
    root, truth = cache
    f = _shard_file(root, LATENTS, "std", 0)
    earlier = f.read_bytes()
    meta, lat = open_meta(root)[1], _groups()[0]
    rewritten = {k: v[:4] + 1 for k, v in truth[LATENTS].items()}
    writer.write_shard(root, meta, lat, 0, rewritten, [["ok", "", 40, 30]] * 4, "w" * 64)
    np.testing.assert_array_equal(CacheReader(root, verify_checksums=True).read([1])["latents/std"], rewritten["std"][[1]])
    f.write_bytes(earlier)
    _refused(root, "shard 0 of 'std' (is not the object its record describes|holds another chunk)", [1])


def test_truncated_shard_refused_by_the_checked_reader(cache):
    root, _ = cache
    f = _shard_file(root, TEACHER, "patch", 0)
    f.write_bytes(f.read_bytes()[:-10])
    _refused(root, "shard 0 of 'patch' is not the object its record describes", [2], [1])


def test_chunk_dropped_from_the_index_refused_by_both_readers(cache):
    root, _ = cache
    f = _shard_file(root, LATENTS, "mean", 0)
    raw = bytearray(f.read_bytes())
    n = num_chunks_of(f)
    entries = index_entries(bytes(raw), n)
    entries[3] = 2**64 - 1  # sample 1, view 1: "never written" (reads back as the NaN fill value)
    index = entries.astype("<u8").tobytes()
    raw[-(16 * n + CRC_BYTES):] = index + np.uint32(google_crc32c.value(index)).tobytes()  # a self-consistent index
    f.write_bytes(bytes(raw))
    _refused(root, "shard 0 of 'mean' is not the object its record describes", [1], [1])
    with pytest.raises(CacheError, match="shard 0 has missing or non-finite data in 'mean' at index 1"):
        CacheReader(root).read_views([1], [1])


def test_skipped_rows_stay_refused_and_absent_chunks_are_never_fetched(cache):
    root, _ = cache
    r = CacheReader(root, verify_checksums=True)
    with pytest.raises(CacheError, match=f"cache index {min(SKIPPED)} is a skipped input"):
        r.read([min(SKIPPED)])
    assert r.read([4, 6, 7])["index"].tolist() == [4, 6, 7]


def test_a_reader_keeps_records_of_the_shards_it_read_only(cache):
    root, _ = cache
    r = CacheReader(root, groups=[TEACHER], verify_checksums=True)
    assert r._tables == {}  # opening reads no shard record
    r.read_views([4, 6], [0, 1])
    assert set(r._tables) == {(TEACHER, 1)}


# -- caches written before chunk checksums (format v1) ------------------------------------------
def _v1_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A cache as format v1 wrote it: chunks without crc32c, records without chunk tables."""
    with written_as_v1(monkeypatch):
        truth = build(root)
    z = zarr.open_group(str(root), mode="r+")
    z.attrs[ROOT_ATTR] = z.attrs[ROOT_ATTR] | {"format_version": 1}
    return truth


def test_v1_cache_reads_and_is_checked_whole_shard(tmp_path, monkeypatch):
    root = tmp_path / "v1"
    truth = _v1_cache(root, monkeypatch)
    assert "chunks" not in json.loads(record_path(root, LATENTS, 0).read_text())
    r = CacheReader(root, verify_checksums=True)
    assert not any(info.chunk_checked for info in r.groups.values())
    np.testing.assert_array_equal(r.read([0, 9])["teachers/t/patch"], truth[TEACHER]["patch"][[0, 9]])
    assert verify_cache(root, quiet=True).ok
    f = _shard_file(root, TEACHER, "patch", 1)
    _, stop = chunk_span(f, position=4)  # sample 6, view 0 (sample 5 was skipped: no chunks)
    raw = bytearray(f.read_bytes())
    raw[stop - 1] ^= 0x01
    f.write_bytes(bytes(raw))
    # the whole shard is hashed on first touch: reading sample 4 finds damage in sample 6's chunk
    _refused(root, "shard 1 of 'patch' fails its checksum", [4])


def test_a_v1_cache_takes_new_groups_and_then_says_v2(tmp_path, monkeypatch):
    root = tmp_path / "v1"
    _v1_cache(root, monkeypatch)
    assert open_meta(root)[1].format_version == 1
    dst = tmp_path / "int8"
    copy_cache(root, dst, feature_codec="int8", quiet=True)  # the latents byte for byte, the teacher written anew
    assert open_meta(dst)[1].format_version == 2  # readers older than v2 (and than the int8 codec) refuse it
    r = CacheReader(dst, verify_checksums=True)
    assert r.group(LATENTS).chunk_checked is False and r.group(TEACHER).chunk_checked is True
    assert r.read([0, 4])["teachers/t/patch"].shape == (2, 2, 4, 8)
    assert verify_cache(dst, quiet=True).ok
    v1_group = _groups()[1]
    assert fingerprint_diff(v1_group.fingerprint | {"format_version": 1, "base": {"format_version": 1, "x": 1}},
                            v1_group.fingerprint | {"format_version": 2, "base": {"format_version": 2, "x": 1}}) == []


def test_a_newer_format_is_refused(cache):
    root, _ = cache
    z = zarr.open_group(str(root), mode="r+")
    z.attrs[ROOT_ATTR] = z.attrs[ROOT_ATTR] | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(CacheError, match=f"has cache format v{FORMAT_VERSION + 1}; this version reads v{FORMAT_VERSION}"):
        CacheReader(root)
    assert N == 10
