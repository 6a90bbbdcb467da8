"""``repa plot RUN``: a run's training curves from its ``metrics.jsonl``, in one image.

The trainer appends one JSON object per log step. Keys come and go between versions and settings
(alignment metrics only at ``--align-every`` steps, method-specific ``loss/<term>`` keys, ``lr``), so
every panel draws whatever numeric keys of its kind the rows hold, each against the steps that log it:

* loss: ``loss`` and every key starting with ``loss``, plus ``denoise`` and ``repa``;
* alignment: the training cosine ``cos/<teacher>`` and the held-out ``align/...`` measures
  (CKNNA, mutual kNN, cosine);
* throughput: ``img_per_sec`` (all ranks), with the share of time spent waiting for data;
* optimisation: ``grad_norm``, with ``lr`` when logged.

A run that is writing (or was killed while writing) can end in a torn line: the last line is
skipped when it does not parse. A resumed run rewrites the steps after its checkpoint; the row
written last wins for each step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repa_cache.cache.errors import UsageError
from repa_cache.cache.stats import check_plot_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
_NOT_CURVES = {"step", "align/num", "align/t", "world_size"}  # bookkeeping, not quantities over training


def metrics_path(run: str | Path) -> Path:
    """The metrics file of ``run``: ``RUN/metrics.jsonl``, or ``run`` itself when it is a file."""
    p = Path(run)
    return p if p.is_file() else p / METRICS_FILE


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """The logged rows of a run, one per step in step order, keeping only numeric values.

    Raises:
        UsageError: no metrics file, a line other than the last that is not a JSON object, or no
            row with a step.
    """
    path = metrics_path(run)
    if not path.is_file():
        raise UsageError(f"no {METRICS_FILE} in {run} (is it a run folder of `repa train`?)")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    by_step: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a writer that is still running or was killed
                logger.info("%s: skipping its unfinished last line", path)
                continue
            raise UsageError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}: line {number} is not a JSON object")
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = values.get("step")
        if step is None or not math.isfinite(step):
            continue
        by_step[int(step)] = values  # a resumed run's later row replaces the earlier one
    if not by_step:
        raise UsageError(f"{path} has no logged step yet")
    return [by_step[s] for s in sorted(by_step)]


def _is_loss(key: str) -> bool:
    return key.startswith("loss") or key in ("denoise", "repa")


def _is_alignment(key: str) -> bool:
    return key.startswith(("cos/", "align/")) or "cknna" in key or "mutual_knn" in key


def _series(rows: list[dict[str, float]], keep: Callable[[str], bool]) -> dict[str, tuple[list[float], list[float]]]:
    """``key -> (steps, values)`` for the keys ``keep`` accepts, in first-seen order."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k not in _NOT_CURVES and keep(k):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(v)
    return out


def _draw(ax: Axes, series: dict[str, tuple[list[float], list[float]]], n_rows: int) -> None:
    """One line per key; keys logged at few steps (held-out alignment) also get markers."""
    for k, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < n_rows or len(xs) <= 20 else None, markersize=3, linewidth=1.2, label=k)
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#777777")


def curves_figure(rows: list[dict[str, float]], title: str) -> Figure:
    """Four panels (loss terms, alignment, throughput, optimisation) of ``rows`` against the step;
    throughput and optimisation put their second quantity (data wait, learning rate) on a right axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(12, 8), layout="constrained")
    (loss_ax, align_ax), (speed_ax, optim_ax) = fig.subplots(2, 2, sharex=True)
    n = len(rows)

    _draw(loss_ax, _series(rows, _is_loss), n)
    loss_ax.set_title("loss terms", fontsize=10)
    loss_ax.set_ylabel("loss (mean over the log interval)")

    _draw(align_ax, _series(rows, _is_alignment), n)
    align_ax.set_title("alignment with the teacher(s)", fontsize=10)
    align_ax.set_ylabel("cosine / CKNNA / mutual kNN")

    _draw(speed_ax, _series(rows, lambda k: k.startswith("img_per_sec")), n)
    speed_ax.set_title("throughput", fontsize=10)
    speed_ax.set_ylabel("images / s")
    wait = _right_axis(speed_ax, rows, "data_wait", "data wait (share of step time)", "#b03a2e", "--", 1.0)
    if wait is not None:
        wait.yaxis.set_major_formatter(PercentFormatter(1.0))

    _draw(optim_ax, _series(rows, lambda k: k == "grad_norm"), n)
    optim_ax.set_title("optimisation", fontsize=10)
    optim_ax.set_ylabel("gradient norm (before clipping)")
    _right_axis(optim_ax, rows, "lr", "learning rate", "#555555", ":", 1.2)

    for ax in (speed_ax, optim_ax):
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    return fig


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run`` (a run folder or its metrics file) to ``out`` (default
    ``RUN/curves.png``); returns the path written.

    Raises:
        UsageError: no or unreadable metrics (see :func:`read_metrics`), or an ``out`` matplotlib
            cannot write.
    """
    path = metrics_path(run)
    target = Path(out) if out is not None else path.parent / CURVES_FILE
    rows = read_metrics(run)
    check_plot_path(target, flag="--out")
    title = f"{path.parent.name}: {len(rows)} log steps, step {int(rows[0]['step'])} to {int(rows[-1]['step'])}"
    curves_figure(rows, title).savefig(target, dpi=100)
    return target


__all__ = ["CURVES_FILE", "METRICS_FILE", "curves_figure", "metrics_path", "plot_run", "read_metrics"]


def _right_axis(ax: Any, rows: list[dict[str, float]], key: str, label: str, color: str, style: str, width: float) -> Any:
    """Plot ``key`` on a second y axis at the right of ``ax`` (from 0); None when no row has it."""
    series = _series(rows, lambda k: k == key)
    if not series:
        return None
    right = ax.twinx()
    xs, ys = series[key]
    right.plot(xs, ys, color=color, linestyle=style, linewidth=width)
    right.set_ylim(bottom=0)
    right.set_ylabel(label, color=color)
    return right
