"""What a training method is, and the objective they share.

A method is a component: one file under :mod:`repa_cache.train.methods` with a :class:`Method`
subclass that says

* which cached teacher fields it reads (:meth:`Method.teacher_fields`), and refuses a cache that
  lacks them (:meth:`Method.check_cache`);
* which student it trains (:meth:`Method.build_student`: the SiT with its projectors, or a
  subclass with extra modules);
* what the projected tokens are aligned to (:meth:`Method.targets`);
* which extra state the student denoises next to the latent (:meth:`Method.extras`: REG's CLS
  token), with the weight of each extra denoising term; sampling integrates the same state.

The objective is the same function for every method (:meth:`Method.losses`)::

    main phase:   denoise(latent) + coeff * align(zs, targets) + sum_k w_k * denoise(extra_k)
    no alignment: denoise(latent) + sum_k w_k * denoise(extra_k)       (projectors do not run)
    warm-up:      coeff * align(zs, targets)  on clean inputs (t = 0), blocks 1..encoder_depth only

where ``coeff`` comes from the alignment schedule (:mod:`repa_cache.train.schedule`). The loop
calls it and knows no method by name. Method options are a dataclass per method; the run's
``config.json`` and every checkpoint carry ``{"name", "options"}`` (:meth:`Method.card`), from
which :func:`repa_cache.train.methods.method_from_card` rebuilds the method for sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import SamplingDefaults
from repa_cache.train.loss import repa_loss
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.schedule import MAIN_NO_ALIGN, WARMUP
from repa_cache.train.transport import Draws, Transport
from repa_cache.train.usit import build_student_model


@dataclass
class StepBatch:
    """One step's inputs on the device. Every field after ``x`` and ``y`` is a teacher array of the
    cache under its own name (:data:`TEACHER_ARRAYS`, the one table from cache to step): one tensor
    per teacher of the run, in teacher order, built by :func:`train.data.to_device`.

    Attributes:
        x: clean latents in the model's space (B, C, H, W).
        y: class labels (B,).
        patch: one (B, T, Z) patch-token tensor per teacher; empty when the step reads none.
        cls: one (B, Z) CLS token per teacher; empty unless the method reads CLS tokens.
        hidden: one (B, P + T, Z) tensor of hidden tokens per teacher (``--teacher-layers``: what
            enters the teacher's first aligned block); empty unless the method reads them.
        registers: one (B, R, Z) tensor of final-norm register tokens per teacher (``repa
            precompute --registers``); empty unless the method reads them.
    """

    x: Tensor
    y: Tensor
    patch: list[Tensor] = dataclasses.field(default_factory=list)
    cls: list[Tensor] = dataclasses.field(default_factory=list)
    hidden: list[Tensor] = dataclasses.field(default_factory=list)
    registers: list[Tensor] = dataclasses.field(default_factory=list)

    def slice(self, rows: slice) -> StepBatch:
        """Rows ``rows`` of every tensor (a gradient-accumulation micro-batch)."""
        return StepBatch(self.x[rows], self.y[rows], **{name: [t[rows] for t in getattr(self, name)] for name in TEACHER_ARRAYS})


#: The teacher arrays a step can receive: the cache's array names, which are StepBatch's fields.
TEACHER_ARRAYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StepBatch) if f.name not in ("x", "y"))


@dataclass
class AlignTargets:
    """What a step aligns the student to: ``tokens``, one (B, T, Z) tensor per projector (the
    teachers' tokens, possibly transformed by the method), and ``attention``, one (B, heads, T, T)
    logits tensor per aligned block for methods that align attention maps (HASTE)."""

    tokens: list[Tensor]
    attention: list[Tensor] = dataclasses.field(default_factory=list)


@dataclass
class AlignContext:
    """The step an alignment loss belongs to: its (micro-)batch and the times of its samples (B,)
    (zeros during the encoder warm-up, whose inputs are clean)."""

    batch: StepBatch
    t: Tensor


@dataclass(frozen=True)
class CacheContext:
    """What a method may read about the cache of a run besides the batches (:meth:`Method.bind`).

    Attributes:
        teachers: the run's teachers, in order.
        models: each teacher group's model record (the cache metadata: timm id, geometry, and
            ``hidden`` for a group with ``--teacher-layers``).
        weights: the sha256 of the weights that wrote each teacher's group.
        resolution: the cache's crop size in pixels.
    """

    teachers: tuple[str, ...]
    models: dict[str, dict[str, Any]]
    weights: dict[str, str]
    resolution: int


@dataclass
class Losses:
    """A step's objective: ``total`` (what is minimised), named fp32 terms for the log (each an
    unweighted scalar), and the mean cosine per teacher (empty when nothing was aligned)."""

    total: Tensor
    terms: dict[str, Tensor]
    cos: list[Tensor]


#: how an option's type reads in a message
_WORDS: dict[type, str] = {int: "an integer", float: "a number", str: "a string"}


@dataclass
class MethodOptions:
    """Options every method has; a method's own options subclass this."""

    proj_coeff: float = 0.5  # weight of the alignment loss (the schedule may change it over the run)

    def validate(self) -> None:
        if not self.proj_coeff >= 0 or self.proj_coeff == float("inf"):
            raise UsageError(f"proj_coeff must be a finite number >= 0, got {self.proj_coeff}")


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


class Method(Generic[OptionsT]):
    """Base class of the training methods; plain REPA is this class unchanged. A method names its
    options class twice: as the type argument (``Method[IRepaOptions]``, so that ``self.options``
    is typed) and as ``Options`` (the class built from the command line's ``-O`` pairs)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help
    source: ClassVar[str] = ""  # paper and public code the facts come from
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: name of the log term of each extra state component (see :meth:`extras`)
    extra_terms: ClassVar[tuple[str, ...]] = ()
    #: the student's weights are a REPA SiT's, key for key (``repa export-ckpt`` may write them)
    repa_weights: ClassVar[bool] = False
    #: the sampling settings the method is evaluated with (recorded in every checkpoint's model
    #: card; ``repa sample`` uses those its command line does not set), and where they come from
    sampling: ClassVar[SamplingDefaults] = SamplingDefaults()
    sampling_source: ClassVar[str] = "REPA's settings as repa sample has always used them"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        known = {f.name: f for f in dataclasses.fields(self.Options)}
        given = dict(options or {})
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"method '{self.name}' has no option {', '.join(unknown)}; "
                             f"its options: {', '.join(sorted(known))}")
        typed: dict[str, Any] = {}
        for key, value in given.items():
            kind: Any = type(known[key].default)  # every option has a scalar default: float, int or str
            try:
                typed[key] = kind(value) if not isinstance(value, kind) else value
            except (TypeError, ValueError):
                raise UsageError(f"method '{self.name}': option {key} takes {_WORDS.get(kind, kind.__name__)}, got {value!r}") from None
        self.options: OptionsT = cast(OptionsT, self.Options(**typed))
        self.options.validate()

    # ---------------------------------------------------------------- description

    def card(self) -> dict[str, Any]:
        """``{"name", "options"}`` as recorded in config.json and in every checkpoint."""
        return {"name": self.name, "options": dataclasses.asdict(self.options)}

    @property
    def proj_coeff(self) -> float:
        return self.options.proj_coeff

    # ---------------------------------------------------------------- the cache

    def teacher_fields(self, align: bool = True) -> tuple[str, ...]:
        """Arrays read from every teacher group: while aligning (``align``) and after the
        alignment is switched off. REPA needs the patch tokens for alignment only."""
        return ("patch",) if align else ()

    def check_cache(self, arrays: dict[str, Sequence[str]]) -> None:
        """Refuse a cache whose teacher groups lack a field this method reads. ``arrays`` maps
        each chosen teacher to the arrays its group holds."""
        for teacher, names in arrays.items():
            missing = [f for f in self.teacher_fields(True) if f not in names]
            if missing:
                raise UsageError(f"--method {self.name} reads the {' and '.join(missing)} tokens of teacher "
                                 f"'{teacher}', which the cache does not hold")

    def bind(self, cache: CacheContext) -> None:
        """Read what the method needs from the run's cache (after :meth:`check_cache`, before the
        student is built); most methods need nothing. Raises UsageError for a cache it cannot use."""

    # ---------------------------------------------------------------- the student

    def check_student(self, config: SiTConfig) -> None:
        """Refuse, in one line, a student shape this method cannot train (checked when the run is
        planned, before any model is built); :meth:`build_student` does the same checks."""

    def build_student(self, config: SiTConfig) -> SiT:
        """The student this method trains, with fresh weights from torch's global RNG: a SiT, or a
        U-shaped one (:class:`~repa_cache.train.usit.USiT`) when the config's layout is ``"u"``."""
        self.check_student(config)
        return build_student_model(config)

    def student_tokens(self, config: SiTConfig) -> int:
        """Tokens of each projector output (and so of each alignment target)."""
        return config.num_tokens

    def targets(self, batch: StepBatch) -> AlignTargets:
        """What the projectors are aligned to: the teachers' patch tokens."""
        return AlignTargets(list(batch.patch))

    def extras(self, batch: StepBatch) -> list[Tensor]:
        """Clean values of the state the student denoises besides the latent (none for REPA)."""
        return []

    def extra_shapes(self, config: SiTConfig) -> list[tuple[int, ...]]:
        """Per-sample shape of each extra state component (for the sampler's initial noise)."""
        return []

    def extra_weights(self) -> list[float]:
        """Loss weight of each extra component's denoising term."""
        return []

    # ---------------------------------------------------------------- the objective

    def draw(self, transport: Transport, batch: StepBatch, phase: str) -> Draws:
        """The step's randomness for the whole (local) batch, drawn before any forward pass so that
        gradient-accumulation micro-batches see exactly the draws of one full batch. The order is
        fixed: times, latent noise, label dropout, then the noise of each extra component (so REPA
        draws exactly what it always did); the warm-up draws the label dropout only."""
        if phase == WARMUP:
            t = torch.zeros(batch.x.shape[0], device=batch.x.device)  # (B,) clean inputs
            return Draws(t, None, transport.drop_labels(batch.y), [])
        return transport.draw(batch.x, batch.y, self.extras(batch))

    def losses(self, fwd: torch.nn.Module, transport: Transport, batch: StepBatch, coeff: float,
               phase: str, draws: Draws) -> Losses:
        """The objective on ``batch`` (a full batch or a micro-batch of it, with the matching
        ``draws``) in phase ``phase`` with alignment coefficient ``coeff``."""
        if phase == WARMUP:
            return self._warmup(fwd, batch, coeff, draws)
        align = phase != MAIN_NO_ALIGN
        out = transport.training_losses(fwd, batch.x, batch.y, extras=self.extras(batch), align=align, draws=draws)
        denoise = out.denoise.float()
        terms = {"denoise": denoise}
        cos: list[Tensor] = []
        total = denoise
        if align:
            repa, cos, more = self.alignment(out.zs, self.targets(batch), AlignContext(batch, draws.t))
            total = denoise + coeff * repa
            terms["repa"] = repa
            terms.update(more)
        for name, weight, value in zip(self.extra_terms, self.extra_weights(), out.denoise_extras):
            total = total + weight * value.float()
            terms[name] = value.float()
        return Losses(total, terms, cos)

    def _warmup(self, fwd: torch.nn.Module, batch: StepBatch, coeff: float, draws: Draws) -> Losses:
        """ERW's encoder warm-up: clean inputs at t = 0 through blocks 1..encoder_depth, the
        alignment loss alone, every sample of the batch (see docs/methods.md)."""
        out = fwd(batch.x, draws.t, draws.y_used, *self.extras(batch), encoder_only=True)
        repa, cos, more = self.alignment(out[1], self.targets(batch), AlignContext(batch, draws.t))
        return Losses(coeff * repa, {"repa": repa, **more}, cos)

    def alignment(self, zs: Sequence[Tensor], targets: AlignTargets,
                  ctx: AlignContext) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """The alignment loss (weighted by the schedule's coefficient), the mean cosine per teacher,
        and any named parts of it to log, for the projections ``zs`` of the step ``ctx``. REPA's:
        the mean negative cosine per token."""
        repa, cos = repa_loss(zs, targets.tokens)
        return repa, cos, {}

    # ---------------------------------------------------------------- conditioning and sampling

    def condition(self, batch: StepBatch) -> Tensor:
        """What the student is conditioned on, before any dropout: the class labels (B,) (GMem: a
        (B, Z) vector). The model's third argument takes it (``model(x, t, condition)``)."""
        return batch.y

    def null_condition(self, y: Tensor, null_class: int) -> Tensor:
        """The unconditional input of classifier-free guidance for conditions ``y``: the null class."""
        return torch.full_like(y, null_class)

    def samples_from_bank(self) -> bool:
        """Whether sampling conditions each sample on a memory-bank entry (``repa sample --bank``)
        instead of a class label."""
        return False
