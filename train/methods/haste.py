"""``--method haste``: HASTE (Wang et al., arXiv 2505.16792, github.com/NUS-HPC-AI-Lab/HASTE).

REPA plus attention alignment, both switched off together at a step N (``--align-schedule stop:N``;
the paper stops at 250k steps for SiT-XL/2):

* the feature term is REPA's (MLP projector after block ``encoder_depth``, cosine to the teacher's
  patch tokens);
* the attention term is a cross-entropy, row by row, between the softmax of the teacher's
  pre-softmax attention logits ``q k^T / sqrt(d)`` (patch to patch: the CLS and register rows and
  columns removed) and the softmax of the student's, for the first ``heads`` heads of each aligned
  block pair, averaged over rows, heads, pairs and samples;
* the pairs are the teacher blocks FIRST..LAST that the cache's group was made for
  (``repa precompute --teacher-layers FIRST-LAST``; DINOv2-B: 9-12) and as many student blocks
  ending at ``student_last_block`` (default ``encoder_depth``; SiT-XL/2: blocks 5-8);
* objective ``denoise + proj_coeff * (repa + attn_weight * attn)`` = ``0.5 repa + 0.5 attn`` with the
  defaults, as HASTE's ``--proj-coeff 0.5 --attn-coeff 0.5``.

The attention maps are not stored (about 6 MiB per view for DINOv2-B). The cache holds the hidden
tokens entering teacher block FIRST, and the trainer runs blocks FIRST..LAST of the same teacher on
the device (:class:`~repa_cache.stages.teachers.TeacherTail`), loaded through the teacher registry
on the first aligned step, with its weights checked against those that wrote the cache. After the
stop step the hidden tokens are no longer read and no teacher block runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.train.config import SamplingDefaults
from repa_cache.train.loss import repa_loss
from repa_cache.train.methods.base import AlignContext, AlignTargets, CacheContext, Method, MethodOptions, StepBatch
from repa_cache.train.model import SiT, SiTBlock, SiTConfig

if TYPE_CHECKING:  # the teacher registry imports timm: only a HASTE run that builds its tail needs it
    from repa_cache.stages.teachers import TeacherTail


@dataclass
class HasteOptions(MethodOptions):
    proj_coeff: float = 0.5
    attn_weight: float = 1.0  # weight of the attention term inside the alignment term (0.5 * 1.0 = HASTE's 0.5)
    student_last_block: int = 0  # last aligned student block, 1-based; 0: the model's encoder_depth
    heads: int = 0  # heads aligned per block pair (the first ones on both sides); 0: all of the teacher's
    teacher_checkpoint: str = ""  # local weights of the teacher; "": the file the cache records, else the hub

    def validate(self) -> None:
        super().validate()
        if not (self.attn_weight >= 0 and math.isfinite(self.attn_weight)):
            raise UsageError(f"haste attn_weight must be a finite number >= 0, got {self.attn_weight}")
        if self.student_last_block < 0 or self.heads < 0:
            raise UsageError("haste student_last_block and heads must not be negative (0: the default)")


def attention_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy between attention distributions, row by row.

    ``mean over (b, h, i) of -sum_j softmax(teacher)[b, h, i, j] * log_softmax(student)[b, h, i, j]``,
    in fp32 with autocast off; the teacher side carries no gradient.

    student, teacher: pre-softmax logits (B, H, T, T) -> scalar."""
    if student.shape != teacher.shape:
        raise ValueError(f"student attention {tuple(student.shape)} does not match the teacher's {tuple(teacher.shape)}")
    with torch.autocast(device_type=student.device.type, enabled=False):
        p = teacher.detach().float().softmax(dim=-1)  # (B, H, T, T)
        log_q = student.float().log_softmax(dim=-1)  # (B, H, T, T)
        return -(p * log_q).sum(dim=-1).mean()


class HasteSiT(SiT):
    """SiT that also returns the attention logits of its aligned blocks.

    With ``align``, ``run_blocks`` gives ``zs = [projected tokens per teacher] + [logits per aligned
    block]``, each logits tensor (B, heads, T, T) of the first ``heads`` heads. Without aligned
    blocks (a model built for sampling) it is a plain SiT.
    """

    def __init__(self, config: SiTConfig, blocks: tuple[int, ...] = (), heads: int = 0) -> None:
        super().__init__(config)
        self.attn_blocks = frozenset(blocks)  # 1-based
        self.attn_heads = heads
        self.last_attn_block = max(blocks, default=0)

    def run_blocks(self, h: Tensor, c: Tensor, align: bool = True,
                   encoder_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        zs: list[Tensor] = []
        logits: list[Tensor] = []
        stop = max(self.config.encoder_depth, self.last_attn_block) if align else self.config.encoder_depth
        for i, block in enumerate(self.blocks, start=1):
            assert isinstance(block, SiTBlock)
            if align and i in self.attn_blocks:
                h, a = block.forward_with_logits(h, c)  # (B, T, D), (B, N, T, T)
                logits.append(a[:, :self.attn_heads])
            else:
                h = block(h, c)  # (B, T, D)
            if align and i == self.config.encoder_depth:
                zs = [projector(h) for projector in self.projectors]  # each (B, T, z_dim)
            if encoder_only and i == stop:
                break
        return h, zs + logits


class Haste(Method[HasteOptions]):
    name = "haste"
    summary = ("HASTE: REPA plus attention alignment (teacher blocks from --teacher-layers, student blocks ending "
               "at encoder_depth), 0.5 REPA + 0.5 attention; stop both with --align-schedule stop:N")
    source = "arXiv 2505.16792; github.com/NUS-HPC-AI-Lab/HASTE (loss.py, train.py, modify_dinov2/layers/attention.py)"
    Options = HasteOptions
    repa_weights = True  # the attention term adds no parameter
    sampling = SamplingDefaults(sampler="sde", steps=250, cfg_scale=1.65, guidance_interval=(0.0, 0.72))
    sampling_source = "HASTE's README (generate.py --mode sde --num-steps 250 --cfg-scale 1.65 --guidance-low 0 --guidance-high 0.72)"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self._cache: CacheContext | None = None
        self._tail: TeacherTail | None = None

    # ---------------------------------------------------------------- the cache

    def teacher_fields(self, align: bool = True) -> tuple[str, ...]:
        return ("patch", "hidden") if align else ()

    def check_cache(self, arrays: dict[str, Sequence[str]]) -> None:
        if len(arrays) != 1:
            raise UsageError(f"--method haste aligns the attention of one teacher; name one --teacher "
                             f"(got {', '.join(arrays) or 'none'})")
        teacher, names = next(iter(arrays.items()))
        if "hidden" not in names:
            raise UsageError(f"--method haste needs the hidden tokens of teacher '{teacher}', which the cache does not "
                             "hold; precompute it with --teacher-layers FIRST-LAST (DINOv2-B: 9-12)")
        super().check_cache(arrays)

    def bind(self, cache: CacheContext) -> None:
        """Keep the cache's record of the teacher's hidden tokens; refuse one that is not a sane
        block range (the record comes from a file)."""
        teacher = cache.teachers[0]
        h = cache.models[teacher].get("hidden")
        fields = ("first_block", "last_block", "heads", "depth")
        if not (isinstance(h, dict) and all(type(h.get(k)) is int and 1 <= h[k] <= 1024 for k in fields)
                and h["first_block"] <= h["last_block"] <= h["depth"]):
            raise UsageError(f"teacher group '{teacher}' has an unreadable record of its hidden tokens ({h!r:.120}); "
                             "precompute it again with --teacher-layers")
        self._cache = cache

    @property
    def _hidden(self) -> dict[str, Any]:
        assert self._cache is not None, "Haste.bind must run before training"
        return dict(self._cache.models[self._cache.teachers[0]]["hidden"])

    # ---------------------------------------------------------------- the student

    def student_blocks(self, config: SiTConfig) -> tuple[tuple[int, ...], int]:
        """The aligned student blocks (1-based) and heads per block for a bound cache.

        Raises:
            UsageError: the student has too few blocks or heads, or another token grid."""
        h = self._hidden
        opts = self.options
        pairs = int(h["last_block"]) - int(h["first_block"]) + 1
        last = opts.student_last_block or config.encoder_depth
        first = last - pairs + 1
        if first < 1 or last > config.depth:
            raise UsageError(f"--method haste aligns {pairs} teacher blocks ({h['first_block']}-{h['last_block']}) with student "
                             f"blocks ending at {last}, outside the model's blocks 1..{config.depth}; "
                             "set -O student_last_block")
        heads = opts.heads or int(h["heads"])
        if heads > int(h["heads"]) or heads > config.num_heads:
            raise UsageError(f"--method haste aligns {heads} heads per block, but the teacher has {h['heads']} and the student "
                             f"{config.num_heads}; set -O heads to at most {min(int(h['heads']), config.num_heads)}")
        teacher = self._cache.models[self._cache.teachers[0]] if self._cache else {}
        if int(teacher.get("num_tokens", config.num_tokens)) != config.num_tokens:
            raise UsageError(f"--method haste compares attention maps token by token: the teacher has {teacher['num_tokens']} "
                             f"patch tokens, the student {config.num_tokens}; pick a model with the teacher's grid")
        return tuple(range(first, last + 1)), heads

    def check_student(self, config: SiTConfig) -> None:
        if config.layout != "flat":
            raise UsageError("--method haste trains a flat SiT (SiT-*), not a U-shaped one")
        if self._cache is not None:
            self.student_blocks(config)

    def build_student(self, config: SiTConfig) -> SiT:
        """A :class:`HasteSiT`; without a bound cache (sampling) one with no aligned blocks."""
        self.check_student(config)
        if self._cache is None:
            return HasteSiT(config)
        blocks, heads = self.student_blocks(config)
        return HasteSiT(config, blocks, heads)

    # ---------------------------------------------------------------- the targets

    def teacher_tail(self, device: torch.device) -> TeacherTail:
        """Teacher blocks FIRST..LAST on ``device``, loaded on first use through the teacher
        registry; refused when the loaded weights differ from those that wrote the cache."""
        if self._tail is not None:
            return self._tail
        assert self._cache is not None, "Haste.bind must run before training"
        name = self._cache.teachers[0]
        record = self._cache.models[name]
        opts = self.options
        checkpoint = opts.teacher_checkpoint or record.get("checkpoint") or None
        from repa_cache.stages.teachers import get_teacher, load_teacher

        spec = get_teacher(str(record["name"]))
        return self.attach_teacher(load_teacher(spec, self._cache.resolution, device=device, checkpoint=checkpoint))

    def attach_teacher(self, model: torch.nn.Module) -> TeacherTail:
        """Use blocks FIRST..LAST of ``model`` (a loaded teacher, on the training device) from now on.

        Raises:
            UsageError: its weights are not those that wrote the cache."""
        assert self._cache is not None, "Haste.bind must run before training"
        name = self._cache.teachers[0]
        weights = state_dict_sha256(model)
        if weights != self._cache.weights[name]:
            raise UsageError(f"the weights loaded for teacher '{name}' (sha256 {weights[:12]}) are not those that wrote the "
                             f"cache ({self._cache.weights[name][:12]}); pass -O teacher_checkpoint=FILE with the same weights")
        from repa_cache.stages.teachers import TeacherTail

        h = self._hidden
        self._tail = TeacherTail(model, int(h["first_block"]), int(h["last_block"]))
        return self._tail

    def targets(self, batch: StepBatch) -> AlignTargets:
        """The patch tokens, and the teacher's attention logits (B, heads, T, T) of each aligned
        block, of the first ``heads`` heads (when the batch carries hidden tokens)."""
        if not batch.hidden:
            return AlignTargets(list(batch.patch))
        tail = self.teacher_tail(batch.hidden[0].device)
        heads = self.options.heads or int(self._hidden["heads"])
        return AlignTargets(list(batch.patch), [a[:, :heads] for a in tail(batch.hidden[0])])

    def alignment(self, zs: Sequence[Tensor], targets: AlignTargets,
                  ctx: AlignContext) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """REPA on the projected tokens plus ``attn_weight`` times the attention cross-entropy
        (mean over block pairs); the attention part is logged on its own as ``attn``. The
        student's outputs are its one teacher's projection (check_cache), then its attention maps."""
        repa, cos = repa_loss(zs[:1], targets.tokens)
        pairs = list(zip(zs[1:], targets.attention))
        if not pairs:
            return repa, cos, {}
        attn = torch.stack([attention_loss(s, t) for s, t in pairs]).mean()
        return repa + self.options.attn_weight * attn, cos, {"attn": attn}
