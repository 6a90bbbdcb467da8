"""The project installs as one package, ``repa_cache``, and works from any folder.

The top-level folders (cache/, train/, eval/, ...) and cli.py are sub-modules of ``repa_cache``;
nothing else may land in site-packages (a top-level ``cache`` or ``cli`` would overwrite or be
shadowed by other projects' modules).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import HUNG

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources, so that no build/ folder of an earlier build can add stale modules.
    src = tmp_path_factory.mktemp("src") / "repa-cache"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                                             "demo-out", "runs", ".whl"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=HUNG)
    (found,) = out.glob("repa_cache-*.whl")
    return found


def test_wheel_holds_exactly_the_repa_cache_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert top == {"repa_cache", *dist_info} and len(dist_info) == 1, top
    for module in ("repa_cache/__init__.py", "repa_cache/cli.py", "repa_cache/cache/format.py", "repa_cache/train/loop.py",
                   "repa_cache/eval/sample.py", "repa_cache/pipeline/precompute.py", "repa_cache/stages/vae.py"):
        assert module in names
    assert not [n for n in names if n.startswith(("repa_cache/tests/", "repa_cache/bench/"))]
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "repa = repa_cache.cli:main" in entry_points


def test_the_repa_script_works_from_a_fresh_venv(wheel, tmp_path):
    """A new venv holding only the wheel (its dependencies are borrowed from the test venv through a
    path entry, which does not run the test venv's editable-install hook)."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=HUNG)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=HUNG)
    where = subprocess.run([str(python), "-c", "import repa_cache.cli as c; print(c.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=HUNG)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's copy, not this checkout
    res = subprocess.run([str(venv / "bin" / "repa"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr
    for command in ("precompute", "train", "sample", "verify", "stats"):
        assert command in res.stdout


@pytest.mark.slow
def test_commands_work_from_a_folder_with_modules_of_the_same_names(demo_images, tmp_path):
    """A research checkout has its own train.py, eval.py, cache/ and cli.py: none of them may be
    imported instead of ours (each raises if it is)."""
    work = tmp_path / "checkout"
    (work / "cache").mkdir(parents=True)
    for name in ("train.py", "eval.py", "cli.py", "cache/__init__.py", "pipeline.py", "stages.py"):
        (work / name).write_text(f"raise RuntimeError('the checkout\\'s own {name} was imported')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def repa(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "repa_cache.cli", *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=HUNG)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    assert "precompute" in repa("--help").stdout
    repa("precompute", str(demo_images), "c", "--vae", "tiny", "--teacher", "tiny", "--shard-size", "8", "--batch-size", "8",
         "--device", "cpu", "--workers", "1", "-q")
    repa("train", "--cache", "c", "--out", "run", "--model", "SiT-tiny/2", "--batch-size", "4", "--max-steps", "2",
         "--ckpt-every", "2", "--log-every", "1", "--workers", "0", "--device", "cpu", "-q")
    repa("sample", "--ckpt", "run", "--out", "s", "--num", "2", "--sampler", "ode", "--steps", "2", "--batch-size", "2",
         "--device", "cpu", "-q")
    assert sorted(p.name for p in (work / "s" / "images").iterdir()) == ["000000.png", "000001.png"]


def test_import_repa_cache_gives_the_version_and_imports_no_torch(tmp_path):
    """``import repa_cache`` costs no torch import; ``__version__`` is the installed version; every
    public name resolves to the function or class the docs name."""
    probe = ("import sys, json, repa_cache as rc; before = 'torch' in sys.modules; "
             "names = {n: getattr(rc, n).__module__ + '.' + getattr(rc, n).__qualname__ for n in rc.__all__ if n != '__version__'}; "
             "print(json.dumps([rc.__version__, before, names]))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr
    version, torch_before, names = json.loads(res.stdout)
    assert version == importlib.metadata.version("repa-cache") == re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert torch_before is False
    assert names == {
        "PrecomputeConfig": "repa_cache.pipeline.plan.PrecomputeConfig",
        "precompute": "repa_cache.pipeline.precompute.precompute",
        "TrainConfig": "repa_cache.train.config.TrainConfig",
        "train_run": "repa_cache.eval.grid.train_run",
        "SampleConfig": "repa_cache.eval.config.SampleConfig",
        "sample": "repa_cache.eval.sample.sample",
        "open_cache": "repa_cache.cache.open.open_reader",
    }
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        import repa_cache

        repa_cache.nothing  # noqa: B018


@pytest.mark.slow
def test_the_python_api_example_in_the_docs_runs_as_written(tmp_path):
    """The code block of docs/python-api.md, run in a fresh interpreter in an empty folder."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "24 samples cached"
    assert lines[-1] == "4 images in samples"
    assert sorted(p.name for p in (tmp_path / "samples" / "images").iterdir()) == [f"00000{i}.png" for i in range(4)]
