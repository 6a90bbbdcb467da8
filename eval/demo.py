"""``repa demo``: the whole pipeline, offline, on generated images with tiny random-init models.

Images (:mod:`repa_cache.pipeline.demo`) -> stage one with the tiny presets -> cache statistics
-> a short REPA run from the cache -> a sampled grid from the run folder. It sits at the end of
the data flow because it drives every stage.
"""

from __future__ import annotations

from pathlib import Path

from repa_cache.cache.stats import cache_stats, format_stats
from repa_cache.eval.config import DemoConfig, SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.pipeline.demo import DEMO_CLASSES, make_demo_images
from repa_cache.pipeline.plan import PrecomputeConfig
from repa_cache.pipeline.precompute import describe_result, precompute
from repa_cache.train.config import OptimConfig, TrainConfig
from repa_cache.train.loop import describe_run


def run_demo(demo: DemoConfig | None = None) -> None:
    """Generate images, precompute a cache with the tiny presets, print its statistics, train a few
    hundred steps from it and sample a grid from the EMA weights."""
    demo = demo if demo is not None else DemoConfig()
    per_class, train_steps, quiet = demo.per_class, demo.train_steps, demo.quiet
    out = Path(demo.out)
    images = out / "images"
    if not images.exists():
        make_demo_images(images, per_class=per_class)
    print(f"[1/4] demo images in {images} ({len(DEMO_CLASSES)} classes, {per_class} per class, 2 bad inputs)")
    cfg = PrecomputeConfig(
        data=str(images),
        out=str(out / "cache"),
        vae="tiny",
        teachers=("tiny",),
        flip=True,
        shard_size=16,
        batch_size=16,
        device="cpu",
        workers=1,
        quiet=quiet,
    )
    print(describe_result(precompute(cfg)))
    print("[2/4] cache statistics")
    print(format_stats(cache_stats(cfg.out)))

    print("[3/4] train SiT-tiny/2 with REPA from the cache (no teacher, no image decoding)")
    tcfg = TrainConfig(
        cache=cfg.out, out=str(out / "run"), model="SiT-tiny/2", batch_size=16, max_steps=train_steps,
        ckpt_every=train_steps, log_every=max(1, train_steps // 5), num_workers=0, device="cpu",
        optim=OptimConfig(lr=1e-3, ema_decay=0.99), quiet=quiet,
    )
    print(describe_run(tcfg))
    print("[4/4] sample a grid from the EMA weights (the run folder alone: its checkpoint names the VAE)")
    res = sample(out / "run", out / "samples", SampleConfig(num=16, sampler="ode", steps=20, heun=True, batch_size=16, device="cpu", quiet=quiet))
    print(res.describe())
    print("    (the tiny VAE is random-initialised, so the decoded grid is texture, not pictures)")
    print(f"demo done: images {images}, cache {cfg.out}, run {out / 'run'}, samples {out / 'samples'}")
