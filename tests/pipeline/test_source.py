"""The source listing (list_source) and item reads (read_bytes) on generated image folders and
webdataset shards."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from repa_cache.cache.errors import UsageError
from repa_cache.pipeline.source import FLAT_CLASS_NAME, ItemTable, SourceItem, SourceListing, list_source, read_bytes
from repa_cache.stages.images import decode_and_crop

from ..stages.conftest import encode, random_rgb


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.fixture
def image_folder(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict[str, bytes]]:
    """cat/ and dog/ classes with nested, hidden and non-image files."""
    root = tmp_path / "folder"
    files = {
        "cat/b.png": encode(random_rgb(rng, 20, 20), "PNG"),
        "cat/a.jpg": encode(random_rgb(rng, 30, 20), "JPEG"),
        "cat/sub/c.png": encode(random_rgb(rng, 10, 40), "PNG"),
        "dog/d.webp": encode(random_rgb(rng, 20, 20), "WEBP"),
        "dog/notes.txt": b"not an image\n",
        "dog/empty.jpg": b"",
    }
    for rel, data in files.items():
        write(root / rel, data)
    # Everything below must be ignored.
    write(root / "cat" / ".DS_Store", b"junk")
    write(root / "dog" / ".cache" / "x.png", files["cat/b.png"])
    write(root / ".hidden_class" / "y.png", files["cat/b.png"])
    write(root / "README.txt", b"top-level files are not classes")
    return root, files


def test_image_folder(image_folder: tuple[Path, dict[str, bytes]]) -> None:
    root, files = image_folder
    listing = list_source(root)
    assert listing.kind == "imagefolder"
    assert listing.root == str(root.resolve())
    assert listing.class_names == ("cat", "dog")
    assert [item.key for item in listing.items] == sorted(files)
    assert [item.key for item in listing.items] == [
        "cat/a.jpg",
        "cat/b.png",
        "cat/sub/c.png",
        "dog/d.webp",
        "dog/empty.jpg",
        "dog/notes.txt",
    ]
    for item in listing.items:
        assert item.label == (0 if item.key.startswith("cat/") else 1)
        assert item.offset == -1
        assert item.size == len(files[item.key])
        assert Path(item.path) == root.resolve() / item.key
        assert read_bytes(item) == files[item.key]
    assert listing.describe() == {
        "kind": "imagefolder",
        "root": str(root.resolve()),
        "num_items": 6,
        "num_classes": 2,
    }


def test_non_images_are_listed_and_skipped_at_decode(
    image_folder: tuple[Path, dict[str, bytes]],
) -> None:
    root, _ = image_folder
    outcomes = {
        item.key: decode_and_crop(read_bytes(item), 16).reason for item in list_source(root).items
    }
    assert outcomes["dog/notes.txt"] == "not an image"
    assert outcomes["dog/empty.jpg"] == "empty file"
    assert outcomes["cat/b.png"] == ""


def test_fingerprint(image_folder: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, _ = image_folder
    first = list_source(root).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    assert list_source(root).fingerprint() == first

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, moved)
    (moved / "cat" / "a.jpg").touch()  # a new mtime changes nothing either
    assert list_source(moved).fingerprint() == first

    (moved / "dog" / "notes.txt").write_bytes(b"a different size")
    assert list_source(moved).fingerprint() != first

    shutil.rmtree(moved)
    shutil.copytree(root, moved)
    (moved / "dog").rename(moved / "bird")  # same files, labels and class names change
    assert list_source(moved).fingerprint() != first


def test_fingerprint_covers_kind_labels_and_order() -> None:
    items = (SourceItem("a", 0, "/x/a", size=3), SourceItem("b", 1, "/x/b", size=4))
    base = SourceListing("imagefolder", "/x", ("c0", "c1"), items)
    assert SourceListing("imagefolder", "/elsewhere", ("c0", "c1"), items).fingerprint() == (
        base.fingerprint()
    )
    variants = [
        SourceListing("webdataset", "/x", ("c0", "c1"), items),
        SourceListing("imagefolder", "/x", ("c0", "c2"), items),
        SourceListing("imagefolder", "/x", ("c0", "c1"), items[::-1]),
        SourceListing(
            "imagefolder", "/x", ("c0", "c1"), (items[0], SourceItem("b", 0, "/x/b", size=4))
        ),
    ]
    assert len({v.fingerprint() for v in variants} | {base.fingerprint()}) == 5


def test_fingerprint_is_json_lines() -> None:
    """The digest is sha256 over a JSON header and one ``json.dumps([key, label, size])`` line per
    item; caches store it, so this is fixed for good (odd keys, large numbers, many items)."""
    odd = ['q"uote\\back', "tab\there\nline", "é ü", "bad\udcff.jpg", "cat 🐈", "\x00\x1f", "/"]
    keys = odd + [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(70_000)]
    items = [SourceItem(k, (i * 7919) % 1000, f"/x/{k}", size=(i * 104_729) % 300_000) for i, k in enumerate(keys)]
    listing = SourceListing("imagefolder", "/x", tuple(f"c{i}" for i in range(1000)), tuple(items))
    reference = hashlib.sha256()
    reference.update(json.dumps({"kind": "imagefolder", "class_names": list(listing.class_names)}, sort_keys=True).encode() + b"\n")
    for it in items:
        reference.update(json.dumps([it.key, it.label, it.size]).encode() + b"\n")
    assert listing.fingerprint() == reference.hexdigest()


def test_items_are_a_table(image_folder: tuple[Path, dict[str, bytes]]) -> None:
    """A listing's items are columns: an item, a slice, a selection and a pickled slice give back
    the items the listing lists (paths derived from the root), and a pickled slice holds only its
    own rows."""
    root, _ = image_folder
    items = list_source(root).items
    assert isinstance(items, ItemTable)
    every = list(items)
    assert [items[i] for i in range(len(items))] == every == [items[i - len(items)] for i in range(len(items))]
    assert all(Path(it.path) == root.resolve() / it.key for it in every)
    assert list(items[1:4]) == every[1:4] and list(items.take(np.array([4, 0, 2]))) == [every[4], every[0], every[2]]
    assert pickle.loads(pickle.dumps(items[2:], protocol=5)) == items[2:]
    with pytest.raises(IndexError):
        items[len(items)]

    n = 100_000
    big = ItemTable("/data", [f"c/{i}.jpg" for i in range(n)], np.zeros(n), np.full(n, -1), np.ones(n))
    assert len(pickle.dumps(big[:256], protocol=5)) * 200 < len(pickle.dumps(big, protocol=5))
    # Items whose paths are not root/key keep them.
    elsewhere = SourceListing("flat", "/x", ("c",), (SourceItem("a", 0, "/elsewhere/a", size=1), SourceItem("b", 0, "/x/b", size=2)))
    assert [it.path for it in elsewhere.items] == ["/elsewhere/a", "/x/b"] and elsewhere.items.take([1])[0].path == "/x/b"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict[str, tuple[bytes, int]]]:
    """Two webdataset shards (written out of name order) with incomplete samples."""
    import webdataset as wds

    root = tmp_path / "shards"
    root.mkdir()
    expected: dict[str, tuple[bytes, int]] = {}

    # Shard 1 through webdataset's own writer.
    with wds.TarWriter(str(root / "train-000001.tar")) as sink:
        for index, label in enumerate([7, 2]):
            data = encode(random_rgb(rng, 24, 24), "JPEG")
            sink.write({"__key__": f"s{index:03d}", "jpg": data, "cls": label})
            expected[f"train-000001.tar/s{index:03d}"] = (data, label)

    # Shard 0 by hand, with the awkward cases.
    png = encode(random_rgb(rng, 24, 24), "PNG")
    webp = encode(random_rgb(rng, 24, 24), "WEBP")
    jpeg = encode(random_rgb(rng, 24, 24), "JPEG")
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        add_member(tar, "b/0005.cls", b"3\n")  # label before image, key with a folder
        add_member(tar, "b/0005.png", png)
        add_member(tar, "b/0005.json", b"{}")
        add_member(tar, "0001.webp", webp)
        add_member(tar, "0001.jpeg", jpeg)  # jpeg is preferred to webp
        add_member(tar, "0001.cls", b"0")
        add_member(tar, "0002.jpg", jpeg)  # no label
        add_member(tar, "0003.cls", b"1")  # no image
        add_member(tar, "0004.jpg", jpeg)
        add_member(tar, "0004.cls", b"cat")  # not an integer
        add_member(tar, "._0001.jpg", b"resource fork")  # hidden
    expected["train-000000.tar/b/0005"] = (png, 3)
    expected["train-000000.tar/0001"] = (jpeg, 0)

    # Not part of the dataset.
    (root / ".partial.tar").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    return root, expected


def test_webdataset(
    shards: tuple[Path, dict[str, tuple[bytes, int]]], caplog: pytest.LogCaptureFixture
) -> None:
    root, expected = shards
    with caplog.at_level(logging.WARNING, logger="repa_cache.pipeline.source"):
        listing = list_source(root)
    assert listing.kind == "webdataset"
    assert listing.root == str(root.resolve())
    assert listing.class_names == tuple(str(i) for i in range(8))
    assert [item.key for item in listing.items] == [
        "train-000000.tar/b/0005",
        "train-000000.tar/0001",
        "train-000001.tar/s000",
        "train-000001.tar/s001",
    ]
    for item in listing.items:
        data, label = expected[item.key]
        assert item.label == label
        assert item.size == len(data)
        assert item.offset > 0 and item.offset % 512 == 0
        assert item.path == str(root.resolve() / item.key.split("/")[0])
        assert read_bytes(item) == data
        assert decode_and_crop(read_bytes(item), 16).status == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("3 webdataset samples")
    assert listing.describe()["num_items"] == 4


def test_webdataset_agrees_with_webdataset_reader(
    shards: tuple[Path, dict[str, tuple[bytes, int]]],
) -> None:
    import webdataset as wds

    root, _ = shards
    shard = root / "train-000001.tar"
    ours = {
        item.key.split("/", 1)[1]: (read_bytes(item), item.label)
        for item in list_source(root).items
        if item.path == str(shard.resolve())
    }
    theirs = {
        sample["__key__"]: (sample["jpg"], int(sample["cls"]))
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)
    }
    assert ours == theirs


def test_tars_take_precedence_over_folders(
    shards: tuple[Path, dict[str, tuple[bytes, int]]], rng: np.random.Generator
) -> None:
    root, _ = shards
    write(root / "someclass" / "x.png", encode(random_rgb(rng, 8, 8), "PNG"))
    assert list_source(root).kind == "webdataset"


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError) as info:
        list_source(missing)
    assert str(info.value) == f"data folder {missing} does not exist"
    assert info.value.exit_code == 2


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write(path, b"x")
    with pytest.raises(UsageError, match=r"^data folder .*a\.png is a file"):
        list_source(path)


@pytest.mark.parametrize("layout", ["empty", "empty-classes", "hidden-only", "flat-hidden-only", "classes-and-loose-files"])
def test_no_images(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if layout == "empty-classes":
        (root / "a").mkdir()
        (root / "b" / "c").mkdir(parents=True)
    elif layout == "hidden-only":
        write(root / "a" / ".x.png", b"data")
    elif layout == "flat-hidden-only":
        write(root / ".x.png", b"data")
    elif layout == "classes-and-loose-files":  # with a sub-folder, loose files are not a class
        (root / "a").mkdir()
        write(root / "x.png", b"data")
    with pytest.raises(UsageError) as info:
        list_source(str(root))
    assert str(info.value) == (
        f"no images found in {root} (expected image files, one sub-folder per class, or webdataset .tar shards)"
    )


def test_flat_folder_is_one_unconditional_class(tmp_path: Path, rng: np.random.Generator) -> None:
    root = tmp_path / "flat"
    files = {name: write(root / name, encode(random_rgb(rng, 12, 16), fmt))
             for name, fmt in (("b.png", "PNG"), ("a.jpg", "JPEG"), ("c.webp", "WEBP"))}
    write(root / ".DS_Store", b"junk")
    (root / ".thumbs").mkdir()  # a hidden folder is no class
    write(root / ".thumbs" / "t.png", files["b.png"])
    (root / "link.png").symlink_to(root / "missing.png")  # a broken link is no file
    listing = list_source(root)
    assert listing.kind == "flat" and listing.class_names == (FLAT_CLASS_NAME,) == ("unconditional",)
    assert [(it.key, it.label, it.size, it.offset) for it in listing.items] == [
        ("a.jpg", 0, len(files["a.jpg"]), -1), ("b.png", 0, len(files["b.png"]), -1), ("c.webp", 0, len(files["c.webp"]), -1)]
    assert [read_bytes(it) for it in listing.items] == [files["a.jpg"], files["b.png"], files["c.webp"]]
    assert listing.describe() == {"kind": "flat", "root": str(root.resolve()), "num_items": 3, "num_classes": 1}
    # Not the same dataset as a one-class image folder holding the same files.
    nested = tmp_path / "nested"
    for name, data in files.items():
        write(nested / "unconditional" / name, data)
    assert list_source(nested).fingerprint() != listing.fingerprint()
    # The fingerprint ignores where the folder is and what it is called.
    shutil.copytree(root, tmp_path / "elsewhere", symlinks=True)
    assert list_source(tmp_path / "elsewhere").fingerprint() == listing.fingerprint()


def test_a_cache_of_a_flat_folder_records_it(tmp_path: Path) -> None:
    from repa_cache.cache.reader import CacheReader
    from repa_cache.pipeline.demo import make_demo_images
    from repa_cache.pipeline.precompute import precompute

    from ..conftest import tiny_config

    demo = make_demo_images(tmp_path / "demo", per_class=2, seed=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(demo.rglob("*.png")):
        shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    precompute(tiny_config(flat, tmp_path / "cache", flip=False))
    reader = CacheReader(tmp_path / "cache")
    assert reader.meta.class_names == ("unconditional",)
    assert reader.meta.source["kind"] == "flat" and reader.meta.source["num_classes"] == 1
    assert reader.num_samples == len(list(flat.iterdir())) and set(reader.labels.tolist()) == {0}


def test_tar_without_samples(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:
        add_member(tar, "1.txt", b"hi")
    with pytest.raises(UsageError, match="^no images found in "):
        list_source(root)


def test_broken_tar(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.tar").write_bytes(b"\x1f\x8b" + bytes(2000))
    with pytest.raises(UsageError, match="^cannot read tar shard "):
        list_source(root)


def test_read_bytes_short_tar_gives_truncated_outcome(
    shards: tuple[Path, dict[str, tuple[bytes, int]]],
) -> None:
    root, _ = shards
    item = list_source(root).items[0]
    short = SourceItem(item.key, item.label, item.path, item.offset, item.size)
    with open(item.path, "r+b") as handle:
        handle.truncate(item.offset + item.size // 2)
    data = read_bytes(short)
    assert len(data) == item.size // 2
    assert decode_and_crop(data, 16).status == "skipped"


# --- hostile webdataset shards: every number read from a tar is bounded --------------------------


def _wds(root: Path, members: list[tuple[str, bytes]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "s-000000.tar", "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return root


def test_huge_label_is_not_listed_and_the_class_table_stays_small(tmp_path: Path, rng: np.random.Generator) -> None:
    """Memory bound: listing runs in a process capped at 1 GiB of address space (a class table of
    99999999999 names would need terabytes)."""
    from repa_cache.pipeline.source import MAX_CLASSES

    from ..stages.conftest import run_with_memory_limit

    jpeg = encode(random_rgb(rng, 24, 24), "JPEG")
    root = _wds(tmp_path / "wds", [("a.jpg", jpeg), ("a.cls", b"99999999999"), ("b.jpg", jpeg), ("b.cls", b"4"),
                                   ("c.jpg", jpeg), ("c.cls", str(MAX_CLASSES).encode()),
                                   ("d.jpg", jpeg), ("d.cls", str(MAX_CLASSES - 1).encode())])
    code = f"""
import json, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from repa_cache.pipeline.source import list_source
listing = list_source({str(root)!r})
print(json.dumps([[i.key, i.label] for i in listing.items]))
print(json.dumps(listing.describe()["unlisted"]))
print(len(listing.class_names))
"""
    items, unlisted, num_classes = run_with_memory_limit(code, 1 << 30).splitlines()
    assert MAX_CLASSES == 100_000
    assert json.loads(items) == [["s-000000.tar/b", 4], ["s-000000.tar/d", 99_999]]
    assert json.loads(unlisted) == {"label not below 100000": 2}
    assert int(num_classes) == 100_000


def test_huge_label_warning(tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    jpeg = encode(random_rgb(rng, 24, 24), "JPEG")
    # 100000, not a bomb: before the bound this built a 100001-name class table; in-process is safe.
    root = _wds(tmp_path / "wds", [("a.jpg", jpeg), ("a.cls", b"100000"), ("b.jpg", jpeg), ("b.cls", b"1")])
    with caplog.at_level(logging.WARNING):
        listing = list_source(root)
    assert [i.key for i in listing.items] == ["s-000000.tar/b"] and listing.class_names == ("0", "1")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"1 webdataset samples in {root.resolve()} have a label of 100000 or more (at most 100000 classes); "
                        "they are not listed"]


def test_big_cls_member_is_not_read_whole(tmp_path: Path, rng: np.random.Generator) -> None:
    """Memory bound: listing a tar with a 16 MiB ``cls`` member allocates under 1 MiB at peak
    (tracemalloc); only MAX_LABEL_BYTES of a label are ever read."""
    import tracemalloc

    from repa_cache.pipeline.source import MAX_LABEL_BYTES

    jpeg = encode(random_rgb(rng, 24, 24), "JPEG")
    big = b"1" + b" " * (16 << 20)  # would parse as label 1 if read whole
    root = _wds(tmp_path / "wds", [("a.jpg", jpeg), ("a.cls", big), ("b.jpg", jpeg), ("b.cls", b"0" + b" " * (MAX_LABEL_BYTES - 1)),
                                   ("c.jpg", jpeg), ("c.cls", b"0" + b" " * MAX_LABEL_BYTES)])
    tracemalloc.start()
    try:
        listing = list_source(root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert MAX_LABEL_BYTES == 64
    assert peak < 1 << 20, peak
    assert [(i.key, i.label) for i in listing.items] == [("s-000000.tar/b", 0)]
    assert listing.describe()["unlisted"] == {"no image or no valid label": 2}


def test_duplicate_key_is_counted_and_reported(tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    a1, a2, b = (encode(random_rgb(rng, 24, 24), "PNG") for _ in range(3))
    root = _wds(tmp_path / "wds", [("a.png", a1), ("a.cls", b"0"), ("a.png", a2), ("a.cls", b"1"), ("b.png", b), ("b.cls", b"1"),
                                   ("b.png", b), ("b.cls", b"1"), ("b.png", b)])
    with caplog.at_level(logging.WARNING):
        listing = list_source(root)
    assert [(i.key, i.label) for i in listing.items] == [("s-000000.tar/a", 0), ("s-000000.tar/b", 1)]
    assert read_bytes(listing.items[0]) == a1  # the first sample of a key is the one listed
    assert listing.describe() == {"kind": "webdataset", "root": str(root.resolve()), "num_items": 2, "num_classes": 2,
                                  "unlisted": {"duplicate key": 3}}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"3 webdataset samples in {root.resolve()} repeat a key already seen in their tar shard; "
                        "only the first sample of each key is listed"]


@pytest.mark.parametrize("text", [b"+3", b"3_0", b"\xd9\xa3", b"-1", b"3.0", b""])
def test_label_must_be_plain_decimal_digits(tmp_path: Path, rng: np.random.Generator, text: bytes) -> None:
    jpeg = encode(random_rgb(rng, 24, 24), "JPEG")
    root = _wds(tmp_path / "wds", [("a.jpg", jpeg), ("a.cls", text), ("b.jpg", jpeg), ("b.cls", b" 2\n")])
    listing = list_source(root)
    assert [(i.key, i.label) for i in listing.items] == [("s-000000.tar/b", 2)]
