"""repa-cache: encode a dataset once into VAE latents and teacher features, then train REPA
diffusion transformers from that cache.

The command line (``repa --help``) is the main interface; the same jobs are plain functions::

    import repa_cache as rc

    rc.precompute(rc.PrecomputeConfig(data="images/", out="cache", teachers=("dinov2-vit-b",)))
    run = rc.train_run(rc.TrainConfig(cache="cache", out="runs/b2", model="SiT-B/2", max_steps=400_000))
    rc.sample(run.run, "samples", rc.SampleConfig(num=50_000))

    reader = rc.open_cache("cache")            # a zarr cache or its webdataset export
    batch = reader.read([0, 1, 2])             # {"latents/mean": ..., "dinov2-vit-b/patch": ...}

Names are imported on first use, so ``import repa_cache`` costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> "module:attribute" that defines it, the module relative to this package. Training
#: is ``train_run``: ``repa_cache.train`` is the sub-package, which would shadow a function.
_API = {
    "PrecomputeConfig": "pipeline.plan:PrecomputeConfig",
    "precompute": "pipeline.precompute:precompute",
    "TrainConfig": "train.config:TrainConfig",
    "train_run": "eval.grid:train_run",
    "SampleConfig": "eval.config:SampleConfig",
    "sample": "eval.sample:sample",
    "open_cache": "cache.open:open_reader",
}

__all__ = ["__version__", *sorted(_API)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("repa-cache")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
