"""How long commands report progress, and the one way sizes are written.

Every command reports through :class:`Progress` (the one place the package uses tqdm). On a
terminal it is a tqdm bar. Elsewhere (a log file, a batch scheduler capturing stderr) a bar's
carriage returns make an unreadable log, so it writes one status line instead, at most every
``every_s`` seconds and at each tenth of the work, and a last one when the work is done::

    precompute: 1200/5000 img (24%), 37.5 img/s, elapsed 0:32, ETA 1:41

``quiet`` silences both. Every command writes sizes with :func:`format_bytes`, in binary units
(1 KiB = 1024 B), so numbers from ``repa stats``, ``cache copy`` and ``export-wds`` compare directly.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

#: Seconds between two status lines when stderr is not a terminal (lines also come at each tenth).
STATUS_EVERY_S = 30.0


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, one decimal above bytes: ``"512 B"``, ``"1.5 KiB"``, ``"3.0 GiB"``."""
    value = float(n)
    for unit in BINARY_UNITS:
        limit = 1023.5 if unit == "B" else 1023.95  # what would print as 1024 moves up a unit
        if abs(value) < limit or unit == BINARY_UNITS[-1]:
            return f"{round(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit takes any value")


def format_duration(seconds: float) -> str:
    """``seconds`` as ``M:SS`` or ``H:MM:SS`` (``"?"`` when unknown or infinite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Count work done towards ``total`` units: a tqdm bar on a terminal, status lines otherwise.

    Use it as a context manager (the last status line is written only when the block ends without
    an exception, so a failure reads as its error) or call :meth:`close`. Rates and the ETA count
    only the units done by this process (``initial`` units were done before, e.g. by a resumed run).

    Args:
        total: units of the whole job.
        desc: what is being done, the line's prefix (``"precompute"``, ``"copy latents"``).
        unit: the name of a unit as it reads after a count and before ``/s`` (``"img"``, ``"shards"``).
        quiet: write nothing.
        initial: units already done when this starts.
        stream: where to write (default: ``sys.stderr`` at construction time).
        every_s: seconds between status lines when ``stream`` is not a terminal.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, quiet: bool = False, initial: int = 0,
                 stream: TextIO | None = None, every_s: float = STATUS_EVERY_S) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.initial = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._t0 = self._last_line = time.monotonic()
        self._next_tenth = self._tenth_after(self.n)
        self._closed = False
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.mode = "off" if quiet else ("bar" if tty else "lines")
        self._bar = (tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
                     if self.mode == "bar" else None)

    def _tenth_after(self, n: int) -> int:
        """The smallest count past ``n`` that starts a new tenth of ``total``."""
        if self.total <= 0:
            return 1 << 62
        k = (10 * n) // self.total + 1
        return -(-k * self.total // 10)  # ceil(k * total / 10)

    def update(self, n: int = 1) -> None:
        """Add ``n`` units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self.n < self.total:  # the last line is close()'s
            now = time.monotonic()
            if self.n >= self._next_tenth or now - self._last_line >= self.every_s:
                self._write(self.status(now))
                self._last_line = now
                self._next_tenth = self._tenth_after(self.n)

    def status(self, now: float | None = None) -> str:
        """The one-line status: count, share, rate, elapsed time and (until done) the ETA."""
        elapsed = (time.monotonic() if now is None else now) - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        line = f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}"
        if self.n < self.total:
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            line += f", ETA {format_duration(eta)}"
        return line

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """Print a line of the command's own output (default: stdout) without breaking the bar."""
        out = stream if stream is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=out)
        else:
            print(line, file=out, flush=True)

    def close(self, finished: bool = True) -> None:
        """End the bar, or write the last status line (only when ``finished`` and there was work)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and finished and self.total > 0:  # no line for an empty job
            self._write(self.status())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=exc_type is None)


__all__ = ["BINARY_UNITS", "STATUS_EVERY_S", "Progress", "format_bytes", "format_duration"]
