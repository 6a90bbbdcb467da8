"""Shared fixtures: a small generated image folder and one tiny cache built from it per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")


#: Seconds after which a subprocess or a thread a test waits for counts as hung. Only a hang reaches
#: it: nothing a correct run does on a loaded machine takes a fraction of it, and no assertion
#: depends on how long the work took.
HUNG = 1800


def tiny_config(data: Path, out: Path, **overrides):
    """Precompute config with the tiny presets, run in this process (fast, for tests)."""
    from repa_cache.pipeline.plan import PrecomputeConfig

    kw = dict(
        data=str(data), out=str(out), vae="tiny", teachers=("tiny",), flip=True, shard_size=8, batch_size=8,
        device="cpu", workers=1, processes=False, quiet=True,
    )
    kw.update(overrides)
    return PrecomputeConfig(**kw)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    from repa_cache.pipeline.demo import make_demo_images

    return make_demo_images(tmp_path_factory.mktemp("images"), per_class=5, seed=1)


@pytest.fixture(scope="session")
def tiny_cache(demo_images, tmp_path_factory) -> Path:
    """4 classes x 5 images + 2 bad inputs (one converted, one skipped), both views, shards of 8."""
    from repa_cache.pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("cache") / "c"
    precompute(tiny_config(demo_images, out))
    return out


@pytest.fixture()
def run_cli(capsys):
    """Run ``repa ARGS`` in this process through the real entry point; (exit code, stdout, stderr)."""
    import sys

    from repa_cache import cli

    def run(args: list[str]) -> tuple[int, str, str]:
        old = sys.argv
        sys.argv = ["repa", *args]
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            sys.argv = old
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
