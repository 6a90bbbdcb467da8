"""``repa plot RUN``: reading metrics.jsonl (torn last line, resumed steps, missing keys) and the curves."""

from __future__ import annotations

import json

import pytest

from repa_cache.cache.errors import UsageError
from repa_cache.eval.plot import curves_figure, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(step: int, **extra) -> dict:
    row = {"step": step, "loss": 2.0 / step, "denoise": 1.5 / step, "repa": -0.1 * step, "cos/dinov2-b": 0.01 * step,
           "grad_norm": 1.0 + step, "img_per_sec": 100.0 + step, "data_wait": 0.1, "world_size": 1}
    row.update(extra)
    return row


def _write(run, rows: list[dict], tail: str = "") -> None:
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_read_torn_last_line_resumed_steps_and_missing_keys(tmp_path):
    rows = [_row(10), _row(20, **{"align/cknna/dinov2-b": 0.4, "align/num": 64.0}), _row(30), _row(40)]
    resumed = [_row(30, loss=9.0), {"step": 40, "loss": 8.0, "note": "text"}]  # resumed from step 20; fewer keys
    _write(tmp_path / "run", rows + resumed, tail='{"step": 50, "loss": 0.')
    got = read_metrics(tmp_path / "run")
    assert [r["step"] for r in got] == [10, 20, 30, 40]
    assert got[2]["loss"] == 9.0 and got[3] == {"step": 40.0, "loss": 8.0}  # the later row wins, text dropped
    assert got[1]["align/cknna/dinov2-b"] == 0.4
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == got  # the file itself works too


def test_bad_middle_line_and_empty_file_are_usage_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo\n{"step": 3, "loss": 1}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl: line 2 is not JSON$"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UsageError, match=r"line 2 is not a JSON object$"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')  # only a torn line
    with pytest.raises(UsageError, match=r"has no logged step yet$"):
        read_metrics(run)


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_figure_panels_and_series(tmp_path):
    rows = [_row(s, lr=1e-4, **{"loss/proj": 0.5}) for s in (10, 20, 30, 40)]
    rows[1].update({"align/cknna/dinov2-b": 0.4, "align/cos/dinov2-b": 0.3, "align/num": 64.0, "align/t": 0.5})
    rows[3].update({"align/cknna/dinov2-b": 0.6, "align/cos/dinov2-b": 0.5, "align/num": 64.0, "align/t": 0.5})
    fig = curves_figure(rows, "run")
    loss_ax, align_ax, speed_ax, optim_ax, wait_ax, lr_ax = fig.axes  # two right axes: data wait, learning rate
    assert _legend(loss_ax) == ["loss", "denoise", "repa", "loss/proj"]
    assert _legend(align_ax) == ["cos/dinov2-b", "align/cknna/dinov2-b", "align/cos/dinov2-b"]
    cknna = align_ax.get_lines()[1]
    assert list(cknna.get_xdata()) == [20, 40] and list(cknna.get_ydata()) == [0.4, 0.6]
    assert list(loss_ax.get_lines()[0].get_ydata()) == [r["loss"] for r in rows]
    assert _legend(speed_ax) == ["img_per_sec"] and _legend(optim_ax) == ["grad_norm"]
    assert wait_ax.get_ylabel() == "data wait (share of step time)" and lr_ax.get_ylabel() == "learning rate"
    assert list(lr_ax.get_lines()[0].get_ydata()) == [1e-4] * 4
    for ax in (loss_ax, align_ax, speed_ax, optim_ax):
        assert ax.get_ylabel() and ax.get_title()
    assert speed_ax.get_xlabel() == optim_ax.get_xlabel() == "step"

    bare = curves_figure([{"step": 1.0, "loss": 1.0}], "bare")  # nothing else logged: no right axes, marked panels
    assert len(bare.axes) == 4
    assert [t.get_text() for t in bare.axes[1].texts] == ["not logged"]


def test_cli_plot(tmp_path, run_cli):
    run = tmp_path / "run"
    _write(run, [_row(s) for s in (10, 20, 30)], tail='{"step"')
    code, out, err = run_cli(["plot", str(run)])
    assert code == 0, err
    assert out == f"{run / 'curves.png'}\n"
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    code, out, err = run_cli(["plot", str(run), "--out", str(tmp_path / "c.pdf")])
    assert code == 0 and out == f"{tmp_path / 'c.pdf'}\n" and (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"


def test_cli_plot_missing_metrics_is_one_line(tmp_path, run_cli):
    code, out, err = run_cli(["plot", str(tmp_path / "nope")])
    assert (code, out) == (2, "")
    assert err == f"error: no metrics.jsonl in {tmp_path / 'nope'} (is it a run folder of `repa train`?)\n"
    _write(tmp_path / "run", [_row(1)])
    code, _, err = run_cli(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.xyz")])
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'c.xyz'}: unsupported file type '.xyz'; ")
