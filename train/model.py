"""SiT: a latent diffusion transformer with REPA projection heads.

The student of REPA is a SiT (Scalable Interpolant Transformer): a DiT backbone of adaLN-Zero
blocks that predicts the velocity of a flow between data (t=0) and noise (t=1). REPA adds one small
MLP "projector" per teacher on the hidden tokens after block ``encoder_depth``; the projected tokens
are aligned to the frozen teacher's patch tokens by :func:`train.loss.repa_loss`.

Architecture facts (SiT/DiT/REPA papers): patchify conv, a fixed 2-D sin-cos position embedding,
a sinusoidal timestep embedding followed by an MLP, a class embedding table with one extra row
for the null class used by classifier-free guidance, adaLN-Zero conditioning, and learn_sigma
off (the output has as many channels as the input).

Shapes used in comments: B batch, C latent channels, H/W latent side, T tokens, D width,
P patch side, N heads, K head dim, Z teacher feature dim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import SIT_SIZES, USIT_SIZES, check_model_name

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class SiTConfig:
    """Shape of a SiT student and its REPA projectors.

    Attributes:
        input_size: side of the square latent the model sees (32 for 256 px with SD-VAE).
        patch_size: side of the square latent patch that becomes one token.
        in_channels: latent channels (4 for SD-VAE); also the number of output channels.
        hidden_size: transformer width D.
        depth: number of adaLN-Zero blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        num_classes: number of real classes; the null class used for classifier-free guidance is
            index ``num_classes``, so the label table has ``num_classes + 1`` rows.
        encoder_depth: REPA aligns the output of block ``encoder_depth`` (1-based), no extra norm.
        projector_dim: hidden width of each projector MLP.
        z_dims: feature dimension of each teacher; one projector per entry.
        qk_norm: LayerNorm on queries and keys per head (off in the REPA recipe).
        layout: ``"flat"`` (SiT: every block on the full token grid) or ``"u"`` (USiT,
            :mod:`repa_cache.train.usit`: blocks ``1..depth - encoder_depth`` on the full grid, then a
            2x2 token merge, blocks up to ``encoder_depth`` on the half grid (the aligned middle
            stage), a 2x2 token split and the remaining blocks on the full grid with skip connections).
            Cards written before this field existed have no ``layout`` and load as flat.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    encoder_depth: int = 8
    projector_dim: int = 2048
    z_dims: tuple[int, ...] = field(default=(768,))
    qk_norm: bool = False
    layout: str = "flat"

    def __post_init__(self) -> None:
        self.z_dims = tuple(int(z) for z in self.z_dims)
        self.validate()

    @property
    def grid(self) -> int:
        """Tokens per side of the square token grid."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per sample, ``grid ** 2``; a teacher must supply this many (or be resampled)."""
        return self.grid**2

    def approx_values(self) -> float:
        """About how many parameters and buffers the model holds (blocks, embeddings, projectors),
        computed from the config alone, so that a shape read from a file is bounded before anything
        is allocated."""
        d, p, c, mlp = float(self.hidden_size), float(self.patch_size), float(self.in_channels), float(self.mlp_ratio)
        blocks = self.depth * (10 + 2 * mlp) * d * d  # attention 4 D^2, MLP 2 r D^2, adaLN 6 D^2
        embed = (self.num_classes + 1 + self.num_tokens + 2 * c * p * p + 256) * d + 4 * d * d
        proj = sum(d * self.projector_dim + self.projector_dim * (self.projector_dim + z) for z in self.z_dims)
        return blocks + embed + proj

    def validate(self) -> None:
        """Raise :class:`UsageError` with a one-line message when the shape cannot work."""
        positive = ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                    "num_heads", "num_classes", "projector_dim")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 1 <= self.encoder_depth <= self.depth:
            raise UsageError(
                f"--encoder-depth {self.encoder_depth} is outside the model's blocks 1..{self.depth}")
        if self.input_size % self.patch_size:
            raise UsageError(
                f"latent side {self.input_size} is not divisible by the patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"hidden size {self.hidden_size} is not divisible by the number "
                             f"of heads {self.num_heads}")
        if self.hidden_size % 4:
            raise UsageError(f"hidden size {self.hidden_size} must be divisible by 4 for the "
                             "2-D sin-cos position embedding")
        if any(z < 1 for z in self.z_dims):
            raise UsageError(f"teacher feature dims must be positive, got {self.z_dims}")
        if self.approx_values() > MAX_MODEL_VALUES:
            raise UsageError(f"a SiT of depth {self.depth}, width {self.hidden_size}, {self.num_tokens} tokens, "
                             f"{self.num_classes} classes and projectors {list(self.z_dims)} would hold about "
                             f"{self.approx_values():.3g} values; at most {MAX_MODEL_VALUES:.3g} are built")
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown model layout '{self.layout}'; known: {', '.join(LAYOUTS)}")
        if self.layout == "u":
            if not self.depth < 2 * self.encoder_depth or self.encoder_depth >= self.depth:
                raise UsageError(f"a U-shaped model needs depth/2 < --encoder-depth < depth (the middle stage ends at "
                                 f"block encoder_depth), got depth {self.depth}, encoder depth {self.encoder_depth}")
            if self.grid % 2:
                raise UsageError(f"a U-shaped model halves the token grid, but {self.grid} tokens per side is odd")


#: Most parameters and buffers a SiT may hold (about 12x SiT-XL/2 with its projector): a config
#: read from a checkpoint is refused above it rather than allocated.
MAX_MODEL_VALUES = 2**33

#: the student layouts: a plain SiT, or a U-shaped one (repa_cache.train.usit)
LAYOUTS: tuple[str, ...] = ("flat", "u")


def sit_config(name: str, **overrides: object) -> SiTConfig:
    """Config of a named size (``"SiT-XL/2"``, ``"USiT-XL/2"``), with any field overridden by keyword."""
    check_model_name(name)
    known = {f.name for f in dataclasses.fields(SiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(
            f"unknown SiT option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if name in USIT_SIZES:
        return SiTConfig(**{**USIT_SIZES[name], "layout": "u", **overrides})  # type: ignore[arg-type]
    return SiTConfig(**{**SIT_SIZES[name], **overrides})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# embeddings


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid x grid`` token grid, shape (grid*grid, dim).

    The first half of the channels encodes the column index, the second half the row index; each
    half is ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``.
    Tokens are numbered row by row, matching ``flatten(2)`` of a (B, D, grid, grid) map.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (g, g) each

    def embed_1d(coord: Tensor) -> Tensor:
        angles = coord.reshape(-1, 1) * omega.reshape(1, -1)  # (g*g, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g*g, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (g*g, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of a scalar time t (used as given, t in [0, 1]) -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequencies(t: Tensor, size: int, max_period: float = 10000.0) -> Tensor:
        """``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period ** (-k / (size/2))``, (B, size)."""
        half = size // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(max_period) * k / half)  # (size/2,)
        angles = t.float().reshape(-1, 1) * freqs.reshape(1, -1)  # (B, size/2)
        emb = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, size)
        if size % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: Tensor) -> Tensor:
        """(B,) -> (B, D)."""
        freq = self.frequencies(t, self.frequency_size)
        return self.mlp(freq.to(next(self.mlp.parameters()).dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row ``num_classes`` is the null class (labels are dropped upstream)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        """(B,) long -> (B, D)."""
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------
# transformer


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample shift/scale (B, D) over tokens (B, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, N, K)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, N, T, K)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (B, N, T, K)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(out)

    def forward_with_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` written out, also returning the pre-softmax logits ``q k^T / sqrt(K)``
        (B, N, T, T) of every head (for attention alignment; the softmax is taken in fp32)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, N, K)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, N, T, K)
        logits = (self.q_norm(q) * self.head_dim**-0.5) @ self.k_norm(k).transpose(-2, -1)  # (B, N, T, T)
        out = logits.float().softmax(dim=-1).to(v.dtype) @ v  # (B, N, T, K)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(out), logits


class MLP(nn.Module):
    """Two linears with a tanh-approximated GELU, as in DiT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: the condition sets shift, scale and a gate per branch."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x

    def forward_with_logits(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` plus the attention logits (B, N, T, T) (:meth:`Attention.forward_with_logits`)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        a, logits = self.attn.forward_with_logits(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_a.unsqueeze(1) * a
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x, logits


class FinalLayer(nn.Module):
    """adaLN norm, then a linear from each token to its ``P*P*C`` output values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, T, D), c (B, D) -> (B, T, P*P*C)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _linears(seq: nn.Module) -> list[nn.Linear]:
    """The linear layers of a small MLP, in order."""
    return [m for m in seq.children() if isinstance(m, nn.Linear)]


def _zero(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: ``Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, z_dim)``."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(nn.Module):
    """SiT backbone plus one REPA projector per teacher.

    ``forward(x, t, y)`` returns the velocity prediction (B, C, H, W) and, for each projector, the
    projected tokens (B, T, z_dim) taken after block ``encoder_depth``.
    """

    #: name prefixes of the modules after the last block (not trained by the encoder warm-up)
    OUTPUT_MODULES: tuple[str, ...] = ("final_layer.",)
    #: the config layouts this class builds (a U-shaped config needs repa_cache.train.usit.USiT)
    LAYOUTS: tuple[str, ...] = ("flat",)

    def __init__(self, config: SiTConfig, projectors: nn.ModuleList | None = None) -> None:
        """``projectors``: one module per teacher mapping hidden tokens (B, T, D) to (B, T, z_dim);
        default REPA's MLP (:func:`build_projector`). A training method may bring its own."""
        super().__init__()
        config.validate()
        if config.layout not in self.LAYOUTS:
            raise UsageError(f"{type(self).__name__} cannot be built with layout '{config.layout}' "
                             f"(it builds {', '.join(self.LAYOUTS)}); this method has no student of that shape")
        self.config = config
        D, P, C = config.hidden_size, config.patch_size, config.in_channels
        self.x_embedder = nn.Conv2d(C, D, kernel_size=P, stride=P)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        # Fixed, not learned: a buffer travels with .to() and the state dict but gets no gradient.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, config.grid).unsqueeze(0))  # (1, T, D)
        self.blocks = nn.ModuleList(
            SiTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth))
        self.projectors = projectors if projectors is not None else nn.ModuleList(
            build_projector(D, config.projector_dim, z) for z in config.z_dims)
        if len(self.projectors) != len(config.z_dims):
            raise ValueError(f"{len(self.projectors)} projectors for {len(config.z_dims)} teachers")
        self.final_layer = FinalLayer(D, P, C)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier linears with zero bias, adaLN modulations and the output layer zeroed.

        With the zeroed adaLN-Zero gates and output linear, a fresh model predicts exactly 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv as a (D, C*P*P) linear
        assert self.x_embedder.bias is not None
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for linear in _linears(self.t_embedder.mlp):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            assert isinstance(block, SiTBlock)
            _zero(_linears(block.adaLN_modulation)[-1])
        _zero(_linears(self.final_layer.adaLN_modulation)[-1])
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, P*P*C) -> (B, C, H, W)."""
        B = x.shape[0]
        g, P, C = self.config.grid, self.config.patch_size, self.config.in_channels
        x = x.reshape(B, g, g, P, P, C)  # (B, gh, gw, P, P, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, P, gw, P)
        return x.reshape(B, C, g * P, g * P)  # (B, C, H, W)

    def embed(self, x: Tensor) -> Tensor:
        """Latents (B, C, H, W) -> position-embedded patch tokens (B, T, D)."""
        h = self.x_embedder(x)  # (B, D, g, g)
        return h.flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """The adaLN condition (B, D) of times t (B,) and labels y (B,)."""
        return self.t_embedder(t) + self.y_embedder(y)

    def run_blocks(self, h: Tensor, c: Tensor, align: bool = True,
                   encoder_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Tokens through the blocks: ``(h, zs)`` with zs the projected tokens after block
        ``encoder_depth`` (empty when ``align`` is False). With ``encoder_only`` the blocks after
        ``encoder_depth`` do not run and h is the aligned block's output."""
        zs: list[Tensor] = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)  # (B, T, D)
            if i == self.config.encoder_depth:
                if align:
                    zs = [projector(h) for projector in self.projectors]  # each (B, T, z_dim)
                if encoder_only:
                    break
        return h, zs

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, align: bool = True,
                encoder_only: bool = False) -> tuple[Tensor | None, list[Tensor]]:
        """Velocity prediction and projected tokens.

        Args:
            x: noisy latents (B, C, H, W).
            t: times (B,), float in [0, 1] (0 = data, 1 = noise).
            y: class labels (B,), long; ``num_classes`` is the null class.
            align: compute the projected tokens (off once the alignment loss is switched off).
            encoder_only: run only up to block ``encoder_depth`` and return no velocity (the
                encoder warm-up trains nothing else).

        Returns:
            ``(v, zs)``: v (B, C, H, W) (None with ``encoder_only``) and one (B, T, z_dim) tensor
            per projector.
        """
        c = self.condition(t, y)  # (B, D)
        h, zs = self.run_blocks(self.embed(x), c, align, encoder_only)
        if encoder_only:
            return None, zs
        out = self.final_layer(h, c)  # (B, T, P*P*C)
        return self.unpatchify(out), zs

    def warmup_parameters(self) -> Iterator[nn.Parameter]:
        """What the encoder warm-up trains: the embedders, blocks 1..encoder_depth and the
        projectors (the rest does not run in that phase)."""
        late = tuple(f"blocks.{i}." for i in range(self.config.encoder_depth, self.config.depth))
        late += self.OUTPUT_MODULES
        for name, param in self.named_parameters():
            if not name.startswith(late):
                yield param

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the diffusion model alone (everything but the REPA projectors)."""
        for name, param in self.named_parameters():
            if not name.startswith("projectors."):
                yield param


def count_parameters(model: SiT, include_projectors: bool = False) -> int:
    """Number of parameters; by default the backbone only, the figure papers report."""
    params = model.parameters() if include_projectors else model.backbone_parameters()
    return sum(p.numel() for p in params)
