"""When the alignment terms weigh what: the alignment schedule and the encoder warm-up.

A run has up to two phases, decided by the global step alone (so a resume lands in the right one):

* **warm-up** (``--warmup-steps K``, ERW, arXiv 2504.10188): steps ``0 .. K-1`` train only the
  embedders, blocks ``1..encoder_depth`` and the projectors, on clean latents (t = 0), with the
  alignment loss alone;
* **main**: the method's full objective, whose alignment terms are scaled by the schedule.

The schedule is evaluated at the step counted from the start of the main phase (``step - K``),
as ERW counts its decay from the end of its warm-up:

* ``const``: the method's projection coefficient throughout (REPA);
* ``stop:N``: that coefficient until step N, then 0 (HASTE, arXiv 2505.16792: every alignment term
  off at N; 250K steps for SiT-XL/2 at batch 256). From N on the data path reads no teacher
  tokens that only alignment uses and the projectors do not run;
* ``exp-decay:C0,HALF_LIFE``: ``C0 * 2^(-step / HALF_LIFE)`` (ERW's coefficient: C0 = 1 for
  SiT-B, 3 for SiT-L, 6 for SiT-XL, half-life 50K steps). It replaces the projection coefficient.

This module imports no torch, so the CLI can parse a schedule for ``--help`` and errors quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

from repa_cache.cache.errors import UsageError

SCHEDULES = ("const", "stop:N", "exp-decay:C0,HALF_LIFE")

#: training phases, in order
WARMUP, MAIN, MAIN_NO_ALIGN = "warmup", "main", "main-no-align"


@dataclass(frozen=True)
class AlignSchedule:
    """A parsed ``--align-schedule``; ``kind`` is ``const``, ``stop`` or ``exp-decay``."""

    kind: str = "const"
    stop: int = 0  # stop: the first main-phase step without alignment
    c0: float = 0.0  # exp-decay: coefficient at step 0
    half_life: float = 0.0  # exp-decay: steps over which it halves

    @classmethod
    def parse(cls, text: str) -> AlignSchedule:
        """``const``, ``stop:N`` or ``exp-decay:C0,HALF_LIFE``; anything else is a usage error."""
        text = text.strip()
        usage = f"--align-schedule '{text}' is not one of: {', '.join(SCHEDULES)}"
        if text == "const":
            return cls()
        kind, sep, arg = text.partition(":")
        if not sep:
            raise UsageError(usage)
        try:
            if kind == "stop":
                n = int(arg)
                if n < 0:
                    raise UsageError(f"--align-schedule stop:N needs N >= 0, got {n}")
                return cls("stop", stop=n)
            if kind == "exp-decay":
                c0_text, half_text = arg.split(",")
                c0, half = float(c0_text), float(half_text)
                if not (c0 >= 0 and half > 0) or c0 == float("inf") or half == float("inf"):
                    raise UsageError(f"--align-schedule exp-decay:C0,HALF_LIFE needs C0 >= 0 and HALF_LIFE > 0, got {arg}")
                return cls("exp-decay", c0=c0, half_life=half)
        except ValueError:
            raise UsageError(usage) from None
        raise UsageError(usage)

    def __str__(self) -> str:
        if self.kind == "stop":
            return f"stop:{self.stop}"
        if self.kind == "exp-decay":
            return f"exp-decay:{self.c0:g},{self.half_life:g}"
        return "const"

    def coeff(self, main_step: int, base: float) -> float:
        """The alignment coefficient at main-phase step ``main_step``; ``base`` is the method's
        projection coefficient (used by ``const`` and ``stop``)."""
        if self.kind == "stop":
            return base if main_step < self.stop else 0.0
        if self.kind == "exp-decay":
            return self.c0 * 2.0 ** (-main_step / self.half_life)
        return base


@dataclass(frozen=True)
class Phases:
    """The phase of every global step of a run: warm-up, then main (with or without alignment)."""

    schedule: AlignSchedule = AlignSchedule()
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must not be negative, got {self.warmup_steps}")

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return WARMUP
        if self.schedule.kind == "stop" and step - self.warmup_steps >= self.schedule.stop:
            return MAIN_NO_ALIGN
        return MAIN

    def coeff(self, step: int, base: float) -> float:
        """Alignment coefficient of global step ``step`` (the warm-up uses ``base``)."""
        if step < self.warmup_steps:
            return base
        return self.schedule.coeff(step - self.warmup_steps, base)

    def boundaries(self) -> list[tuple[int, str]]:
        """``(first step, phase)`` of each phase the run can enter, in order."""
        out = [(0, WARMUP)] if self.warmup_steps else []
        out.append((self.warmup_steps, MAIN))
        if self.schedule.kind == "stop":
            out.append((self.warmup_steps + self.schedule.stop, MAIN_NO_ALIGN))
            if self.schedule.stop == 0:
                out = [b for b in out if b[1] != MAIN]
        return out
