"""Devices and arithmetic precision: the one place that turns ``--device`` and ``--precision``
into a ``torch.device`` and an autocast context, for stage one, training and evaluation alike."""

from __future__ import annotations

import contextlib

import torch

from repa_cache.cache.errors import UsageError

#: ``--precision`` values: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def parse_device(name: str) -> torch.device | None:
    """The device a ``--device`` name stands for, without asking whether this machine has it
    (None for ``auto``). UsageError for a name that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str, index: int = 0) -> torch.device:
    """The device named by ``--device``.

    ``auto`` is ``cuda:index`` (modulo the number of GPUs) when CUDA is available, else the CPU;
    a bare ``cuda`` also takes ``index`` (a rank's local GPU). ``cpu``, ``cuda:N`` are taken as
    they are.

    Raises:
        UsageError: an unknown device name, or CUDA asked for where there is none.
    """
    device = parse_device(name)
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", index % torch.cuda.device_count())
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", index % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` if it is one of ``allowed``, else a one-line :class:`UsageError`."""
    if precision not in allowed:
        raise UsageError(f"--precision must be one of {', '.join(allowed)}, not '{precision}'")
    return precision


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (``auto``: on CUDA only)."""
    check_precision(precision)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast where :func:`use_bf16` says so, else a context that does nothing."""
    if use_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
