"""What a new user meets: quiet commands and typos reported at once, by the installed ``repa``
script run as a user runs it (a clean environment, not this suite's, which quiets dask for the
tests in its own process)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HUNG

REPA = Path(sys.executable).with_name("repa")


def clean_env(tmp_path: Path) -> dict[str, str]:
    """A login shell's environment: no DASK_*, no PYTHON* or test settings of this process."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    assert not any(k.startswith("DASK") for k in env)
    return env


def repa(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPA), *args], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=HUNG)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"], ids=["in-process", "local-cluster"])
def test_quiet_commands_print_nothing_to_stderr(demo_images, tmp_path, workers):
    """With -q a precompute (one worker: in this process; two: a local dask cluster), stats, verify
    and a short training run write nothing to stderr: no dask scheduler or nanny lines."""
    pre = repa(tmp_path, "precompute", str(demo_images), "c", "--vae", "tiny", "--teacher", "tiny", "--shard-size", "8",
               "--batch-size", "8", "--no-flip", "--device", "cpu", "--workers", workers, "-q")
    assert (pre.returncode, pre.stderr) == (0, "")
    assert pre.stdout.startswith("cache c: 22 samples (1 skipped), 3 shard tasks run in ")
    for args in (("stats", "c"), ("verify", "c", "-q")):
        res = repa(tmp_path, *args)
        assert (res.returncode, res.stderr) == (0, ""), args
    res = repa(tmp_path, "train", "--cache", "c", "--out", "run", "--model", "SiT-tiny/2", "--batch-size", "4", "--max-steps", "1",
               "--log-every", "1", "--workers", "0", "--device", "cpu", "-q")
    assert (res.returncode, res.stderr) == (0, "")


def test_a_usage_error_is_one_line(tmp_path):
    res = repa(tmp_path, "stats", str(tmp_path / "nothing"))
    assert (res.returncode, res.stderr) == (2, f"error: no cache at {tmp_path / 'nothing'}\n")


#: Runs the command line in a fresh interpreter, then says whether torch was imported on the way.
PROBE = """
import json, sys
from repa_cache import cli
sys.argv = ["repa", *json.loads(sys.argv[1])]
try:
    cli.main()
finally:
    print(json.dumps({"torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("args, message", [
    (["precompute", "DATA", "OUT", "--resolution", "250"], "error: --resolution must be a multiple of 8 in [64, 4096], not 250"),
    (["precompute", "DATA", "OUT", "--teacher", "dinov2-vitb"],
     "error: unknown teacher 'dinov2-vitb' (did you mean 'dinov2-vit-b'?); known teachers: clip-vit-l, dinov1-vit-b, "),
    (["precompute", "DATA", "OUT", "--teacher", "DINOv2-ViT-L"], "error: unknown teacher 'DINOv2-ViT-L' (did you mean 'dinov2-vit-l'?); "),
    (["precompute", "DATA", "OUT", "--teacher", "timm:"], "error: teacher 'timm:' names no timm model: timm:MODEL_ID"),
    (["precompute", "DATA", "DATA/cache"], "error: output folder DATA/cache is inside the data folder DATA"),
    (["train", "--cache", "C", "--out", "R", "--model", "SiT-XXL/2"],
     "error: unknown model 'SiT-XXL/2' (did you mean 'SiT-XL/2'?); known models: SiT-S/1, "),
    (["train", "--cache", "C", "--out", "R", "--method", "rpa"],
     "error: unknown method 'rpa' (did you mean 'repa'?); known methods: repa, irepa, reg, urepa, gmem, haste"),
    (["train", "--cache", "C", "--out", "R", "--method", "dino"], "error: unknown method 'dino'; known methods: repa, "),
    (["train", "--cache", "C", "--out", "R", "--ema-decay", "1"], "error: --ema-decay must be in [0, 1), not 1.0"),
    (["train", "--cache", "C", "--out", "R", "--adam-betas", "0.9"], "error: --adam-betas takes 2 comma-separated numbers, got '0.9'"),
    (["train", "--cache", "C", "--out", "R", "--grad-clip", "-1"], "error: --grad-clip must be a number at least 0 (0: no clipping), not -1.0"),
    (["train", "--cache", "C", "--out", "R", "--keep-checkpoints", "0"], "error: --keep-checkpoints must be at least 1, not 0"),
])
def test_a_typo_is_reported_before_torch_is_imported(tmp_path, args, message):
    """Names and numbers that can be checked without torch, models or data are, first: one line,
    exit 2, torch never imported (it costs seconds); a close known name is suggested."""
    (tmp_path / "DATA").mkdir()
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=tmp_path, env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(message), res.stderr
    assert json.loads(res.stdout) == {"torch": False}


def test_version(tmp_path):
    from importlib.metadata import version

    from repa_cache.cache.format import FORMAT_VERSION

    res = repa(tmp_path, "--version")
    assert (res.returncode, res.stdout, res.stderr) == (0, f"repa-cache {version('repa-cache')} (cache format v{FORMAT_VERSION})\n", "")


@pytest.mark.parametrize("command", [["stats"], ["verify", "-q"], ["cache", "copy", "LOCAL"]])
def test_an_object_store_without_its_package_is_one_line(tmp_path, command):
    """gs:// needs gcsfs, an optional package: the error names the install command, not a traceback."""
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    args = [a if a != "LOCAL" else str(tmp_path / "copy") for a in command]
    args.insert(2 if command[0] == "cache" else 1, "gs://bucket/cache")
    res = repa(tmp_path, *args)
    assert (res.returncode, res.stderr) == (2, "error: gs://bucket/cache: gs:// needs a package that is not installed (pip install gcsfs)\n")
    res = repa(tmp_path, "stats", "foo://bucket/cache")
    assert (res.returncode, res.stderr) == (2, "error: foo://bucket/cache: Protocol not known: foo\n")


@pytest.mark.parametrize("flag, package", [(["--tensorboard"], "tensorboard"), (["--wandb", "proj"], "wandb")])
def test_a_tracker_without_its_package_is_refused_before_the_run_is_written(tmp_path, monkeypatch, run_cli, flag, package):
    """Here both packages are installed: the lookup is made to miss one of them."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    code, _, err = run_cli(["train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"), *flag])
    assert (code, err) == (2, f"error: --{flag[0][2:]} needs the {package} package: pip install 'repa-cache[track]' (or pip install {package})\n")
    assert not (tmp_path / "run").exists()
