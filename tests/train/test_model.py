"""SiT with REPA projectors: shapes, sizes, init, position embedding, and a small overfit."""

from __future__ import annotations

import math

import pytest
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import TransportConfig
from repa_cache.train.loss import repa_loss
from repa_cache.train.model import SIT_SIZES, SiT, SiTConfig, count_parameters, sit_config
from repa_cache.train.transport import Transport


def tiny(**overrides: object) -> SiTConfig:
    settings: dict[str, object] = dict(input_size=8, num_classes=10, z_dims=(32, 48), projector_dim=64)
    settings.update(overrides)
    return sit_config("SiT-tiny/2", **settings)


def perturbed(model: SiT, scale: float = 0.05) -> SiT:
    """Move every parameter off its init so no branch is silenced by adaLN-Zero."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_forward_shapes() -> None:
    torch.manual_seed(0)
    model = SiT(tiny())
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])  # 10 = null class
    v, zs = model(x, t, y)
    assert v.shape == (3, 4, 8, 8)
    assert [z.shape for z in zs] == [(3, 16, 32), (3, 16, 48)]
    assert model.config.num_tokens == 16 and model.config.grid == 4
    assert model.y_embedder.embedding_table.num_embeddings == 11


def test_zs_come_from_block_encoder_depth() -> None:
    torch.manual_seed(0)
    model = perturbed(SiT(tiny(encoder_depth=2)))
    captured: list[torch.Tensor] = []
    model.blocks[1].register_forward_hook(lambda mod, args, out: captured.append(out))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        _, zs = model(x, t, y)
        torch.testing.assert_close(zs[0], model.projectors[0](captured[0]))
        torch.testing.assert_close(zs[1], model.projectors[1](captured[0]))
        # blocks after the alignment layer do not change zs
        model.blocks[3].mlp.fc2.weight.add_(1.0)
        _, zs2 = model(x, t, y)
    assert torch.equal(zs2[0], zs[0])


def test_projector_layout() -> None:
    model = SiT(tiny(z_dims=(24,), projector_dim=40))
    layers = [type(m).__name__ for m in model.projectors[0]]
    assert layers == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    shapes = [tuple(m.weight.shape) for m in model.projectors[0] if isinstance(m, torch.nn.Linear)]
    assert shapes == [(40, 64), (40, 40), (24, 40)]


def test_adaln_zero_init_predicts_exact_zero() -> None:
    torch.manual_seed(0)
    model = SiT(tiny())
    v, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7]))
    assert torch.equal(v, torch.zeros_like(v))
    assert zs[0].abs().sum() > 0  # the projectors are not zeroed
    v2, _ = perturbed(model)(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7]))
    assert v2.abs().sum() > 0


def test_prediction_depends_on_time_and_label() -> None:
    torch.manual_seed(0)
    model = perturbed(SiT(tiny()))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        base = model(x, torch.tensor([0.3]), torch.tensor([1]))[0]
        other_t = model(x, torch.tensor([0.7]), torch.tensor([1]))[0]
        other_y = model(x, torch.tensor([0.3]), torch.tensor([10]))[0]
    assert not torch.allclose(base, other_t) and not torch.allclose(base, other_y)


def test_position_embedding_is_a_fixed_sincos_buffer() -> None:
    model = SiT(tiny())
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" in model.state_dict()
    pe = model.pos_embed  # (1, T, D) with T = 16, D = 64
    assert pe.shape == (1, 16, 64) and not pe.requires_grad
    row, col = 2, 3
    token = pe[0, row * 4 + col]
    q = 16  # D / 4 frequencies per sin/cos half of a coordinate
    k = torch.arange(q, dtype=torch.float64)
    omega = 10000.0 ** (-k / q)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)]).float()
    torch.testing.assert_close(token, expected)
    before = pe.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    v, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    (v.sum() + zs[0].sum()).backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


def test_unpatchify_layout() -> None:
    model = SiT(tiny(input_size=8, in_channels=3))  # grid 4, patch 2, C 3
    g, P, C = 4, 2, 3
    token = torch.arange(g * g).reshape(1, -1, 1) * 1000  # (1, T, 1)
    k = torch.arange(P * P * C).reshape(1, 1, -1)  # (1, 1, P*P*C) ordered (pi, pj, c)
    img = model.unpatchify((token + k).float())  # (1, C, 8, 8)
    h, w, c = 5, 2, 1
    assert img[0, c, h, w].item() == ((h // P) * g + w // P) * 1000 + ((h % P) * P + w % P) * C + c


def test_qk_norm_option() -> None:
    model = SiT(tiny(qk_norm=True))
    assert isinstance(model.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    v, _ = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    assert v.shape == (1, 4, 8, 8)


# Published DiT/SiT parameter counts (learn_sigma on); ours has learn_sigma off, a bit smaller.
PUBLISHED_M = {"SiT-S/2": 33.0, "SiT-B/2": 130.5, "SiT-L/2": 458.0, "SiT-XL/2": 675.0}


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_parameter_counts_match_published(name: str) -> None:
    with torch.device("meta"):
        model = SiT(sit_config(name))
    n = count_parameters(model)
    assert abs(n / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, n
    D = model.config.hidden_size
    projector = D * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    assert count_parameters(model, include_projectors=True) == n + projector


def test_size_registry() -> None:
    assert len(SIT_SIZES) == 18  # S/B/L/XL at patch 1/2/4/8, tiny at 1/2
    for name, (depth, width, heads, enc) in {
        "SiT-S/8": (12, 384, 6, 4), "SiT-B/4": (12, 768, 12, 4), "SiT-XL/1": (28, 1152, 16, 8), "SiT-tiny/1": (4, 64, 4, 2),
        "SiT-L/2": (24, 1024, 16, 8), "SiT-XL/2": (28, 1152, 16, 8),
        "SiT-tiny/2": (4, 64, 4, 2),
    }.items():
        c = sit_config(name)
        assert (c.depth, c.hidden_size, c.num_heads, c.encoder_depth) == (depth, width, heads, enc)
        assert c.patch_size == int(name.rsplit("/", 1)[1])
    assert sit_config("SiT-B/4").num_tokens == 64
    assert sit_config("SiT-XL/2", z_dims=[768, 1024]).z_dims == (768, 1024)


def test_unknown_model_message() -> None:
    message = r"^unknown model 'SiT-XXL/2' \(did you mean 'SiT-XL/2'\?\); known models: SiT-S/1, SiT-S/2, .*SiT-XL/8"
    with pytest.raises(UsageError, match=message):
        sit_config("SiT-XXL/2")
    with pytest.raises(UsageError, match=r"^unknown model 'ViT-B'; known models: SiT-S/1, "):  # nothing close: no guess
        sit_config("ViT-B")
    with pytest.raises(UsageError, match="unknown SiT option"):
        sit_config("SiT-B/2", widht=10)


def test_validation_messages() -> None:
    with pytest.raises(UsageError, match=r"^--encoder-depth 13 is outside the model's blocks 1\.\.12$"):
        sit_config("SiT-B/2", encoder_depth=13)
    with pytest.raises(UsageError, match=r"^--encoder-depth 0 is outside the model's blocks 1\.\.12$"):
        sit_config("SiT-B/2", encoder_depth=0)
    with pytest.raises(UsageError, match="latent side 30 is not divisible by the patch size 4"):
        sit_config("SiT-B/4", input_size=30)
    with pytest.raises(UsageError, match="hidden size 100 is not divisible by the number of heads 12"):
        sit_config("SiT-B/2", hidden_size=100)


def test_overfit_tiny_batch() -> None:
    """SiT-tiny/2 + transport + REPA memorise 8 latents and their teacher tokens.

    Measured with these seeds: denoise 2.01 -> 0.52, REPA -0.01 -> -0.95 (400 steps, ~7 s).
    """
    torch.manual_seed(0)
    config = sit_config("SiT-tiny/2", input_size=8, num_classes=8, z_dims=(32,))
    model = SiT(config)
    x = torch.randn(8, 4, 8, 8)
    y = torch.arange(8)
    target = torch.randn(8, config.num_tokens, 32)
    transport = Transport(TransportConfig(label_dropout=0.0, null_class=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def evaluate() -> tuple[float, float]:
        """Losses averaged over 4 fixed draws of (t, noise), leaving the training RNG alone."""
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1234)
            draws = [transport.training_losses(model, x, y) for _ in range(4)]
            denoise = sum(d.denoise.item() for d in draws) / 4
            repa = sum(repa_loss(d.zs, [target])[0].item() for d in draws) / 4
        return denoise, repa

    denoise0, repa0 = evaluate()
    for _ in range(400):
        out = transport.training_losses(model, x, y)
        repa, _ = repa_loss(out.zs, [target])
        loss = out.denoise + 0.5 * repa
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    denoise1, repa1 = evaluate()
    print(f"overfit: denoise {denoise0:.3f} -> {denoise1:.3f}, repa {repa0:.3f} -> {repa1:.3f}")
    assert math.isfinite(denoise1) and math.isfinite(repa1)
    assert denoise0 / denoise1 > 2.5
    assert (1 + repa0) / (1 + repa1) > 5  # distance of the REPA loss to its minimum, -1
