"""Typed configuration of a training run, with the REPA recipe's defaults.

Each component owns a small dataclass: :class:`TransportConfig` (path, time sampling, label
dropout), :class:`OptimConfig` (AdamW and EMA) and :class:`TrainConfig` (the run). ``repa train``
takes its option defaults from these classes, so every default is written once, here. Values that
belong to the data (latent shape and normalisation, token count, teacher dims, number of classes)
are not configuration: they are read from the cache. This module imports no torch, so the CLI's
``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from repa_cache.cache.errors import UsageError, unknown_name

PATHS: tuple[str, ...] = ("linear", "cosine")
#: The training methods: name -> "module:class" under repa_cache.train.methods, imported on first
#: use (:func:`repa_cache.train.methods.method_class`), so that --help and name checks need no torch.
#: A new method is its own module there and one line here.
METHOD_REGISTRY: dict[str, str] = {
    "repa": "repa:Repa", "irepa": "irepa:IRepa", "reg": "reg:Reg",
    "urepa": "urepa:URepa", "gmem": "gmem:Gmem", "haste": "haste:Haste",
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_REGISTRY)
TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "lognormal")
#: ``--latent-norm``: the VAE config's normalisation, or the cache's dataset statistics (repa latent-stats)
LATENT_NORMS: tuple[str, ...] = ("vae", "dataset")


def _sizes() -> dict[str, dict[str, int]]:
    """The named SiT sizes: S/B/L/XL at patch 1/2/4/8 (patch 1: for f16 latents, whose 16x16 grid at
    256 px is already the teacher's), plus tiny ones for tests."""
    widths = {  # name: (depth, width, heads, encoder_depth)
        "S": (12, 384, 6, 4),
        "B": (12, 768, 12, 4),
        "L": (24, 1024, 16, 8),
        "XL": (28, 1152, 16, 8),
    }
    sizes: dict[str, dict[str, int]] = {}
    for size, (depth, width, heads, enc) in widths.items():
        for patch in (1, 2, 4, 8):
            sizes[f"SiT-{size}/{patch}"] = dict(
                depth=depth, hidden_size=width, num_heads=heads, patch_size=patch, encoder_depth=enc)
    # Tests and demos: small enough to train for a few hundred steps on a laptop CPU.
    for patch in (1, 2):
        sizes[f"SiT-tiny/{patch}"] = dict(
            depth=4, hidden_size=64, num_heads=4, patch_size=patch, encoder_depth=2, projector_dim=256)
    return sizes


SIT_SIZES: dict[str, dict[str, int]] = _sizes()

#: U-shaped sizes (layout "u"): SiT's width, heads and depth; ``encoder_depth`` ends the middle stage,
#: so the full-grid stages have ``depth - encoder_depth`` blocks each (B: 4+4+4, L: 8+8+8, XL: 8+12+8).
#: Patch 1 is for f16 latents: at 256 px their 16x16 grid is the teacher's, as /2 makes of f8's 32x32.
USIT_SIZES: dict[str, dict[str, int]] = {
    f"USiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch, encoder_depth=enc)
    for patch in (2, 1)
    for size, (depth, width, heads, enc) in {"B": (12, 768, 12, 8), "L": (24, 1024, 16, 16), "XL": (28, 1152, 16, 20)}.items()
} | {
    f"USiT-tiny/{patch}": dict(depth=4, hidden_size=64, num_heads=4, patch_size=patch, encoder_depth=3, projector_dim=256)
    for patch in (2, 1)
}


def check_model_name(name: str) -> None:
    """Refuse a model name that is not a named size (one line, with the closest name when close)."""
    if name not in SIT_SIZES and name not in USIT_SIZES:
        raise unknown_name("model", name, [*SIT_SIZES, *USIT_SIZES])


def check_method_name(name: str) -> None:
    """Refuse a method name that is not one of :data:`METHOD_NAMES`."""
    if name not in METHOD_NAMES:
        raise unknown_name("method", name, METHOD_NAMES)


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a training method is evaluated with (its paper's or its public code's,
    ``Method.sampling``). Every checkpoint records them in its model card, and ``repa sample`` uses
    each one that its command line does not set. The defaults here are REPA's settings as this
    tool has always sampled them; a model card without the record means them.

    Attributes:
        sampler: ``"sde"`` (Euler–Maruyama) or ``"ode"``.
        steps: model evaluations per sample.
        heun: Heun steps (ODE only).
        cfg_scale: classifier-free guidance scale (1: none).
        guidance_interval: ``(low, high)``: guidance applies to steps starting at ``low <= t <= high``.
        cls_cfg_scale: guidance scale of the jointly denoised CLS token (REG); None: ``cfg_scale``.
    """

    sampler: str = "sde"
    steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 0.7)
    cls_cfg_scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["guidance_interval"] = list(self.guidance_interval)
        return d

    @classmethod
    def from_json(cls, d: Any) -> SamplingDefaults:
        """The record :meth:`to_json` wrote (UsageError in one line when it is not one)."""
        hints = typing.get_type_hints(cls)
        if not isinstance(d, dict) or any(k not in hints or not _is_a(v, hints[k]) for k, v in d.items()):
            raise UsageError(f"unreadable sampling record {d!r} in the model card")
        fields: dict[str, Any] = {k: tuple(v) if k == "guidance_interval" else v for k, v in d.items()}
        return cls(**fields)

    def describe(self) -> str:
        """One line, e.g. ``SDE, 250 steps, cfg 2.3 on t in [0, 0.85], CLS cfg 2.3``."""
        low, high = self.guidance_interval
        guide = "no guidance (cfg 1)" if self.cfg_scale == 1 else f"cfg {self.cfg_scale:g} on t in [{low:g}, {high:g}]"
        cls = "" if self.cls_cfg_scale is None else f", CLS cfg {self.cls_cfg_scale:g}"
        return f"{self.sampler.upper()}{' Heun' if self.heun else ''}, {self.steps} steps, {guide}{cls}"


@dataclass
class TransportConfig:
    """How training pairs are drawn.

    Attributes:
        path: ``"linear"`` (alpha=1-t, sigma=t; the REPA default) or ``"cosine"``
            (alpha=cos(pi t/2), sigma=sin(pi t/2)).
        time_sampling: ``"uniform"`` t ~ U[0, 1), or ``"lognormal"``: s = exp(N(0, 1)) is the
            ratio sigma/alpha, so t = s/(1+s) on the linear path and (2/pi) atan(s) on the cosine one.
        label_dropout: probability that a label is replaced by the null class (for CFG).
        null_class: index of the null class; equals the model's ``num_classes``.
    """

    path: str = "linear"
    time_sampling: str = "uniform"
    label_dropout: float = 0.1
    null_class: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` on a value the transport does not know."""
        if self.path not in PATHS:
            raise UsageError(f"unknown path '{self.path}'; known paths: {', '.join(PATHS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UsageError(f"unknown time sampling '{self.time_sampling}'; known: {', '.join(TIME_SAMPLINGS)}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise UsageError(f"--label-dropout must be in [0, 1], got {self.label_dropout}")
        if self.null_class < 0:
            raise UsageError(f"null class must be a non-negative index, got {self.null_class}")


@dataclass
class OptimConfig:
    """AdamW as in REPA: constant lr 1e-4, betas (0.9, 0.999), no weight decay, clip 1.0, EMA 0.9999
    without warm-up. With ``ema_warmup`` the EMA update after ``n`` optimiser steps uses the decay
    ``min(ema_decay, (1 + n) / (10 + n))`` (latent diffusion's EMA), so a short run's EMA weights
    follow its trained weights: 0.5 after 8 steps, 0.9 after 80, 0.99 after 890."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay of the update at 0-based optimiser step ``step``."""
        if not self.ema_warmup:
            return self.ema_decay
        n = step + 1
        return min(self.ema_decay, (1 + n) / (10 + n))

    def __post_init__(self) -> None:
        b1, b2 = (float(b) for b in self.betas)
        checks = ((self.lr > 0, f"--lr must be positive, not {self.lr}"),
                  (0 <= b1 < 1 and 0 <= b2 < 1, f"--adam-betas must be in [0, 1), not {b1},{b2}"),
                  (self.weight_decay >= 0, f"--weight-decay must be at least 0, not {self.weight_decay}"),
                  (0 <= self.grad_clip < math.inf, f"--grad-clip must be a number at least 0 (0: no clipping), not {self.grad_clip}"),
                  (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), not {self.ema_decay}"))
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def changeable_fields() -> frozenset[str]:
    """The :class:`TrainConfig` fields a resumed run may change."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("may_change"))


#: ``repa train`` options whose field in :class:`TrainConfig` has another name or sits in a part.
OPTION_FIELDS: dict[str, str] = {
    "teacher": "teachers", "method_option": "method_options", "workers": "num_workers",
    "path": "transport.path", "time_sampling": "transport.time_sampling", "label_dropout": "transport.label_dropout",
    "lr": "optim.lr", "adam_betas": "optim.betas", "weight_decay": "optim.weight_decay", "grad_clip": "optim.grad_clip",
    "ema_decay": "optim.ema_decay", "ema_warmup": "optim.ema_warmup",
}
#: Options a resumed run never takes from its record: where the run is, and how this command prints.
NOT_RECORDED_OPTIONS = frozenset({"cache", "out", "init_from", "dry_run", "quiet"})


def may_change(default: Any = dataclasses.MISSING) -> Any:
    """A :class:`TrainConfig` field that a resumed run may change: where the run and its cache are,
    how long it runs, how it runs (device, workers, micro-steps, compile) and what it reports when.
    Every other field defines the run, and a resume refuses a change to it."""
    return field(default=default, metadata={"may_change": True})


@dataclass
class TrainConfig:
    """A training run (``repa train``). The fields made with :func:`may_change` may differ
    between a run and its resume (:func:`changeable_fields`); the others may not."""

    cache: str = may_change()
    out: str = may_change()
    model: str = "SiT-B/2"
    teachers: tuple[str, ...] = ()  # empty: the cache's only teacher
    encoder_depth: int | None = None  # None: the model size's default (4 for S/B, 8 for L/XL)
    method: str = "repa"  # the training method (repa_cache.train.methods)
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options (not proj_coeff)
    proj_coeff: float | None = None  # None: the method's default (0.5 for REPA)
    align_schedule: str = "const"  # const | stop:N | exp-decay:C0,HALF_LIFE (repa_cache.train.schedule)
    warmup_steps: int = 0  # encoder warm-up steps before the main objective (ERW)
    init_from: str | None = may_change(None)  # a new run starts from this checkpoint's weights (fine-tuning; ignored on resume)
    batch_size: int = 256  # global, over all ranks
    grad_accum: int = may_change(1)  # micro-steps per optimiser step on each rank (same global batch and samples)
    max_steps: int = may_change(400_000)
    seed: int = 0
    device: str = may_change("auto")
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    latent_norm: str = "vae"  # vae: the VAE config's scale/shift (REPA); dataset: the cache's per-channel statistics
    tf32: bool = may_change(True)  # TF32 matmuls and convolutions on CUDA (REPA's --allow-tf32)
    compile: bool = may_change(False)
    ckpt_every: int = may_change(10_000)
    log_every: int = may_change(100)
    keep_checkpoints: int = may_change(2)
    num_workers: int | None = may_change(None)  # DataLoader workers per rank; None: loader_workers() picks
    resample_teacher: bool = False  # resample teacher tokens to the student grid instead of refusing
    align_every: int = may_change(0)  # every N steps log CKNNA and cosine to the teacher on the held-out samples (0: off)
    holdout: int = 0  # the last N valid cache samples are held out of training (for alignment metrics)
    verify: bool = may_change(True)  # check each shard's checksum the first time a loader process reads it
    transport: TransportConfig = field(default_factory=TransportConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tensorboard: bool = may_change(False)
    wandb: str | None = may_change(None)  # Weights & Biases project to log to (None: off)
    sample_every: int = may_change(0)  # every N steps write a grid from the EMA weights to RUN/samples (0: off)
    quiet: bool = may_change(False)

    def __post_init__(self) -> None:
        check_model_name(self.model)  # names first: no torch is needed to find a typo
        check_method_name(self.method)
        if self.keep_checkpoints < 1:
            raise UsageError(f"--keep-checkpoints must be at least 1, not {self.keep_checkpoints}")
        if self.latent_norm not in LATENT_NORMS:
            raise unknown_name("latent normalisation", self.latent_norm, LATENT_NORMS)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """The config :meth:`to_json` wrote, or a user's file of the same form (UsageError naming
        the first key that is unknown or holds a value of the wrong type)."""
        check_fields(cls, d)
        try:
            fields = dict(d)
            fields["teachers"] = tuple(fields.get("teachers") or ())
            fields["transport"] = TransportConfig(**fields.get("transport", {}))
            optim = dict(fields.get("optim", {}))
            if "betas" in optim:
                optim["betas"] = tuple(optim["betas"])
            fields["optim"] = OptimConfig(**optim)
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise UsageError(f"not a training config: {e}") from None

    def with_recorded(self, recorded: dict[str, Any], untyped: Iterable[str], skip: Iterable[str] = NOT_RECORDED_OPTIONS) -> TrainConfig:
        """This config with each ``repa train`` option of ``untyped`` (not on the command line)
        taken from a run's recorded config ``recorded`` (its ``card.train``), where it has one:
        resuming a run needs only the options that may change. A config file is read the same
        way, with nothing skipped."""
        check_fields(TrainConfig, recorded)
        d = self.to_json()
        skip = frozenset(skip)
        for option in untyped:
            if option in skip:
                continue
            head, _, tail = OPTION_FIELDS.get(option, option).partition(".")
            if tail and isinstance(recorded.get(head), dict) and tail in recorded[head]:
                d[head][tail] = recorded[head][tail]
            elif not tail and head in recorded and head in d:
                d[head] = recorded[head]
        return TrainConfig.from_json(d)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"] = list(self.teachers)
        return d



def _parts() -> dict[str, type]:
    return {"transport": TransportConfig, "optim": OptimConfig}


def check_fields(cls: type, d: Any, where: str = "") -> None:
    """Refuse a config (``to_json``'s form, read from a file) with a key ``cls`` does not have or a
    value that is not of the field's type, in one line naming it (``where``: the part's name)."""
    if not isinstance(d, dict):
        raise UsageError(f"{where or 'a training config'} must be a table of options, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in d.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise unknown_name("training config key", name, [f"{where}.{k}" if where else k for k in known])
        if key in _parts() and cls is TrainConfig:
            check_fields(_parts()[key], value, key)
        elif not _is_a(value, hints[key]):
            raise UsageError(f"training config key '{name}' must be {_type_name(hints[key])}, not {value!r}")


def _is_a(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON or TOML) fits the type ``hint`` of a config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_a(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_a(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in value.items())
    return False


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "absent"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        plural = {str: "strings", int: "integers", float: "numbers"}
        return f"a list of {plural[args[0]]}" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if origin is dict:
        return "a table of options"
    return names.get(hint, str(hint))


#: The largest config file read (a training config is about 1 kB).
MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The training config in a TOML or JSON file: ``config.json``'s form (``card.train``), the
    output of ``repa train --dry-run`` (``train``), or the bare table of fields. Keys and types are
    checked; the values are not applied here (see :meth:`TrainConfig.with_recorded`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"--config {path} holds {size} bytes; a training config is at most {MAX_CONFIG_BYTES}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            d = tomllib.loads(text)
        elif path.suffix == ".json":
            d = json.loads(text)
        else:
            raise UsageError(f"--config {path}: the file must end in .toml or .json")
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if isinstance(d, dict) and isinstance(d.get("card"), dict) and "train" in d["card"]:
        d = d["card"]["train"]  # a run's config.json
    elif isinstance(d, dict) and isinstance(d.get("train"), dict):
        d = d["train"]  # repa train --dry-run
    try:
        check_fields(TrainConfig, d)
    except UsageError as e:
        raise UsageError(f"--config {path}: {e}") from None
    return d
