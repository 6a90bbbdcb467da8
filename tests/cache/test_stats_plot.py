"""``repa stats --plot``: the figure's panels, labels, title and ticks, and the path printed."""

from __future__ import annotations

import json

import numpy as np

from repa_cache.cache.stats import cache_stats, plot_stats, stats_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _by_title(fig) -> dict[str, object]:
    return {ax.get_title().split(":")[0].split(" (")[0]: ax for ax in fig.axes}


def test_figure_panels_labels_and_title(tiny_cache):
    s = cache_stats(tiny_cache, with_histograms=True)
    fig = stats_figure(s)
    axes = _by_title(fig)
    assert sorted(axes) == ["latents", "outcomes", "teachers/tiny", "valid samples per class"]
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()

    latents = axes["latents"]
    assert [t.get_text() for t in latents.get_legend().get_texts()] == ["ch 0", "ch 1", "ch 2", "ch 3"]
    assert "latent mean per channel (21 samples)" in latents.get_title()  # 22 inputs, 1 skipped
    values = s["_histograms"]["latents"]["channels"]
    assert values.shape == (4, 21 * 2 * 32 * 32)  # (C, samples * views * h * w)

    teacher = axes["teachers/tiny"]
    assert [t.get_text() for t in teacher.get_legend().get_texts()] == ["patch tokens", "CLS token"]
    assert teacher.get_xlabel() == "token L2 norm"

    outcomes = axes["outcomes"]
    assert [t.get_text() for t in outcomes.get_xticklabels()] == ["ok", "converted", "skipped"]
    assert [int(p.get_height()) for p in outcomes.patches] == [s["outcomes"].get(k, 0) for k in ("ok", "converted", "skipped")]
    assert [int(p.get_height()) for p in outcomes.patches] == [19, 2, 1]

    classes = axes["valid samples per class"]
    assert [t.get_text() for t in classes.get_xticklabels()] == list(s["per_class"])
    assert [int(p.get_height()) for p in classes.patches] == list(s["per_class"].values())
    assert all(float(v).is_integer() for v in classes.get_yticks())

    title = fig._suptitle.get_text()
    assert title == "cache c  |  VAE tiny  |  teacher tiny (tiny-random-vit)  [TINY random-init preset]"


def test_many_classes_get_integer_index_ticks():
    per_class = {f"n{k:08d}": 1 + k % 3 for k in range(40)}
    s = {"path": "s3://bucket/imagenet-256/", "groups": {}, "outcomes": {"ok": 60, "skipped": 1}, "per_class": per_class,
         "_histograms": {}}
    fig = stats_figure(s)
    assert len(fig.axes) == 2
    classes = _by_title(fig)["valid samples per class"]
    assert classes.get_xlabel() == "class index"
    fig.canvas.draw()  # ticks are placed at draw time
    assert all(float(v).is_integer() for v in classes.get_xticks()) and all(float(v).is_integer() for v in classes.get_yticks())
    assert fig._suptitle.get_text() == "cache imagenet-256"
    assert [int(p.get_height()) for p in _by_title(fig)["outcomes"].patches] == [60, 0, 1]


def test_plot_written_and_path_printed(tiny_cache, tmp_path, run_cli):
    target = tmp_path / "s.png"
    code, out, err = run_cli(["stats", str(tiny_cache), "--plot", str(target)])
    assert code == 0, err
    assert out.splitlines()[-1] == f"plot: {target}"
    assert target.read_bytes()[:8] == PNG_MAGIC
    code, out, err = run_cli(["stats", str(tiny_cache), "--json", "--plot", str(tmp_path / "j.svg")])
    assert code == 0 and json.loads(out)["samples"] == 22  # stdout stays JSON; the path goes to stderr
    assert err.splitlines()[-1] == f"plot: {tmp_path / 'j.svg'}"
    assert (tmp_path / "j.svg").read_bytes().lstrip().startswith(b"<?xml")


def test_plot_stats_returns_its_path(tiny_cache, tmp_path):
    s = cache_stats(tiny_cache, max_samples=3, with_histograms=True)
    assert plot_stats(s, tmp_path / "p.png") == tmp_path / "p.png"
    assert np.asarray(s["_histograms"]["teachers/tiny"]["cls"]).shape == (3 * 2,)  # (samples * views,)
