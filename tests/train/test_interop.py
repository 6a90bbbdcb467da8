"""REPA checkpoint import and export against a REPA-layout SiT built here.

``RepaSiT`` below is written after the public REPA code's ``models/sit.py`` (timm ``PatchEmbed``,
``Attention`` and ``Mlp``, a frozen ``pos_embed`` parameter, projectors as in its ``build_mlp``),
so its state-dict keys are REPA's own names, not names derived from our model. Its checkpoints are
written the way REPA's ``train.py`` writes them: ``model``, ``ema``, ``opt``, ``args``, ``steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.stages.vae import VAESpec, latent_norm, vae_config
from repa_cache.train.checkpoint import ModelCard, latest_checkpoint, load_checkpoint, save_checkpoint
from repa_cache.train.interop import ImportOptions, export_repa_checkpoint, import_repa_checkpoint
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.student import load_student

LATENT, PATCH, WIDTH, HEADS, DEPTH, CLASSES, ENC_DEPTH, PROJ_DIM, Z_DIMS = 8, 2, 64, 4, 3, 4, 2, 48, (32, 16)
#: A tiny model is no named size, so its number of heads is given.
OPTS = ImportOptions(vae="tiny", num_heads=HEADS)


# -- a SiT in REPA's module layout ---------------------------------------------------------------
class _TimeEmbed(nn.Module):
    def __init__(self, width: int, freq: int = 256) -> None:
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        a = t[:, None].float() * f[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], dim=-1))


class _Labels(nn.Module):
    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, width)  # + the null class (dropout 0.1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def _mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True, qk_norm=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=width, hidden_features=4 * width, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(_mod(self.norm1(x), s1, c1))
        return x + g2.unsqueeze(1) * self.mlp(_mod(self.norm2(x), s2, c2))


class _Final(nn.Module):
    def __init__(self, width: int, patch: int, channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_mod(self.norm_final(x), shift, scale))


class RepaSiT(nn.Module):
    """REPA's SiT module tree at a tiny size, every tensor random."""

    def __init__(self, latent: int = LATENT, patch: int = PATCH, channels: int = 4) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.x_embedder = PatchEmbed(latent, patch, channels, WIDTH, bias=True)
        self.t_embedder = _TimeEmbed(WIDTH)
        self.y_embedder = _Labels(CLASSES, WIDTH)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, WIDTH), requires_grad=False)
        self.blocks = nn.ModuleList([_Block(WIDTH, HEADS) for _ in range(DEPTH)])
        self.projectors = nn.ModuleList([
            nn.Sequential(nn.Linear(WIDTH, PROJ_DIM), nn.SiLU(), nn.Linear(PROJ_DIM, PROJ_DIM), nn.SiLU(), nn.Linear(PROJ_DIM, z))
            for z in Z_DIMS])
        self.final_layer = _Final(WIDTH, patch, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.1 * torch.randn_like(p))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i + 1 == ENC_DEPTH:
                zs = [proj(h) for proj in self.projectors]
        h = self.final_layer(h, c)  # (B, T, P*P*C)
        g = int(h.shape[1] ** 0.5)
        p, ch = self.patch, self.channels
        h = h.reshape(h.shape[0], g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], ch, g * p, g * p), zs


def _repa_args(**over: object) -> argparse.Namespace:
    """The fields of REPA train.py's args that the importer reads, with REPA's names."""
    base = dict(model=None, num_classes=CLASSES, encoder_depth=ENC_DEPTH, path_type="linear", proj_coeff=0.5,
                enc_type="dinov2-vit-b", resolution=256, cfg_prob=0.1, qk_norm=False)
    return argparse.Namespace(**{**base, **over})


@pytest.fixture(scope="module")
def repa(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A REPA train.py checkpoint: model, EMA, AdamW state after two steps, args and steps."""
    torch.manual_seed(0)
    model, ema = RepaSiT(), RepaSiT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    for _ in range(2):
        x = torch.randn(2, 4, LATENT, LATENT)
        v, zs = model(x, torch.rand(2), torch.tensor([0, 3]))
        (v.square().mean() + sum(z.square().mean() for z in zs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": _repa_args(),
            "steps": 2}
    path = tmp_path_factory.mktemp("repa") / "0000002.pt"
    torch.save(ckpt, path)
    return {"path": path, "ckpt": ckpt, "model": model, "ema": ema}


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def test_import_copies_every_tensor_and_infers_the_shape(repa: dict, tmp_path: Path) -> None:
    ema_file = import_repa_checkpoint(repa["path"], tmp_path / "run", ImportOptions(vae="tiny", num_heads=HEADS, teachers=("a", "b")))
    full = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ema_file.name == "ema-step-00000002.pt" and full.step == 2
    card = full.card
    assert SiTConfig(**card.model) == SiTConfig(
        input_size=LATENT, patch_size=PATCH, in_channels=4, hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=4.0, num_classes=CLASSES, encoder_depth=ENC_DEPTH, projector_dim=PROJ_DIM, z_dims=Z_DIMS)
    assert card.teachers == ("a", "b") and card.class_names == ("0", "1", "2", "3") and card.path == "linear"
    assert card.latent_norm == {"scale": [0.18215], "shift": [0.0]}
    assert card.method == {"name": "repa", "options": {"encoder_depth": ENC_DEPTH, "proj_coeff": 0.5}}
    assert card.vae["id"] == "tiny" and card.train["repa_args"]["enc_type"] == "dinov2-vit-b"
    for ours, theirs in ((full.ema, repa["ckpt"]["ema"]), (full.model, repa["ckpt"]["model"])):
        assert ours is not None and len(ours) == len(theirs)
        for key, value in theirs.items():
            mine = ours[key.replace("x_embedder.proj.", "x_embedder.")]
            assert mine.dtype == value.dtype and torch.equal(mine, value), key

    # The imported EMA computes what REPA's module computes.
    loaded = load_student(tmp_path / "run")
    x, t, y = torch.randn(3, 4, LATENT, LATENT), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 2, CLASSES])
    with torch.no_grad():
        v_ref, zs_ref = repa["ema"](x, t, y)
        v, zs = loaded.model(x, t, y)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(zs, zs_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # The optimiser state lands on the same parameters, by name.
    ours_model = SiT(SiTConfig(**card.model))
    ours_model.load_state_dict(full.model)
    opt = torch.optim.AdamW(ours_model.parameters())
    opt.load_state_dict(full.optimizer)
    repa_names = [n for n, _ in repa["model"].named_parameters()]
    our_names = [n for n, _ in ours_model.named_parameters()]
    theirs_state = repa["ckpt"]["opt"]["state"]
    assert 0 not in theirs_state and repa_names[0] == "pos_embed"  # frozen: no state
    assert len(full.optimizer["state"]) == len(theirs_state)
    for i, s in theirs_state.items():
        j = our_names.index(repa_names[i].replace("x_embedder.proj.", "x_embedder."))
        assert torch.equal(full.optimizer["state"][j]["exp_avg"], s["exp_avg"])
        assert torch.equal(full.optimizer["state"][j]["exp_avg_sq"], s["exp_avg_sq"])


def test_sample_from_an_imported_run(repa: dict, tmp_path: Path) -> None:
    import_repa_checkpoint(repa["path"], tmp_path / "run", OPTS)
    res = sample(tmp_path / "run", tmp_path / "s", SampleConfig(num=2, steps=2, sampler="ode", device="cpu", grid=0,
                                                                quiet=True))
    assert res.written == 2 and res.step == 2
    with np.load(tmp_path / "s" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (2, LATENT * 8, LATENT * 8, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(range(CLASSES)) and not np.array_equal(images[0], images[1])


def test_import_then_export_round_trips(repa: dict, tmp_path: Path) -> None:
    import_repa_checkpoint(repa["path"], tmp_path / "run", OPTS)
    out = export_repa_checkpoint(tmp_path / "run", tmp_path / "back.pt")
    back, orig = _load(out), repa["ckpt"]
    assert set(back) == {"model", "ema", "opt", "args", "steps"} and back["steps"] == 2
    for name in ("model", "ema"):
        assert list(back[name]) == list(orig[name])  # same keys, in REPA's order
        for key in orig[name]:
            assert back[name][key].dtype == orig[name][key].dtype and torch.equal(back[name][key], orig[name][key]), key
    assert back["opt"]["param_groups"] == orig["opt"]["param_groups"]
    assert back["opt"]["state"].keys() == orig["opt"]["state"].keys()
    for i, s in orig["opt"]["state"].items():
        assert back["opt"]["state"][i].keys() == s.keys()
        assert all(torch.equal(back["opt"]["state"][i][k], s[k]) for k in s)
    a = back["args"]
    assert isinstance(a, argparse.Namespace)
    assert (a.num_classes, a.encoder_depth, a.path_type, a.qk_norm, a.projector_embed_dims, a.resolution) == (
        CLASSES, ENC_DEPTH, "linear", False, "32,16", 64)
    # A REPA module takes the exported weights and optimiser state as they are.
    fresh = RepaSiT()
    fresh.load_state_dict(back["ema"])
    torch.optim.AdamW(fresh.parameters()).load_state_dict(back["opt"])


def test_export_of_a_trained_checkpoint_loads_into_repas_module(tmp_path: Path) -> None:
    cfg = SiTConfig(input_size=LATENT, patch_size=PATCH, hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS,
                    num_classes=CLASSES, encoder_depth=ENC_DEPTH, projector_dim=PROJ_DIM, z_dims=Z_DIMS)
    torch.manual_seed(1)
    model, ema = SiT(cfg), SiT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, LATENT, LATENT), torch.rand(2), torch.tensor([1, 2]))[0].square().mean().backward()
    opt.step()
    card = ModelCard(model=dataclasses.asdict(cfg), teachers=("t1", "t2"), latent_norm={"scale": [0.18215], "shift": [0.0]},
                     vae={"id": "tiny"}, class_names=("a", "b", "c", "d"), method={"name": "repa", "options": {}},
                     path="cosine")
    save_checkpoint(tmp_path / "ours", 5, model, ema, opt, card)
    back = _load(export_repa_checkpoint(tmp_path / "ours", tmp_path / "repa.pt"))
    repa_model = RepaSiT()
    repa_model.load_state_dict(back["model"])
    repa_opt = torch.optim.AdamW(repa_model.parameters())
    repa_opt.load_state_dict(back["opt"])
    names = [n for n, _ in repa_model.named_parameters()]
    ours = dict(model.named_parameters())
    for i, s in repa_opt.state_dict()["state"].items():
        mine = opt.state_dict()["state"][list(ours).index(names[i].replace("x_embedder.proj.", "x_embedder."))]
        assert torch.equal(s["exp_avg"], mine["exp_avg"]), names[i]
    assert torch.equal(repa_model.x_embedder.proj.weight, model.x_embedder.weight)
    assert back["steps"] == 5 and back["args"].path_type == "cosine" and back["args"].model is None


def test_export_takes_methods_whose_student_is_repas_and_refuses_others(tmp_path: Path) -> None:
    cfg = SiTConfig(input_size=LATENT, patch_size=PATCH, hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS,
                    num_classes=CLASSES, encoder_depth=ENC_DEPTH, projector_dim=PROJ_DIM, z_dims=Z_DIMS)
    torch.manual_seed(3)
    model = SiT(cfg)
    for name in ("haste", "reg"):
        card = ModelCard(model=dataclasses.asdict(cfg), teachers=("t1", "t2"), latent_norm={"scale": [0.18215], "shift": [0.0]},
                         vae={"id": "tiny"}, class_names=("a", "b", "c", "d"), method={"name": name, "options": {}})
        save_checkpoint(tmp_path / name, 2, model, model, torch.optim.AdamW(model.parameters()), card)
    back = _load(export_repa_checkpoint(tmp_path / "haste", tmp_path / "haste.pt"))  # HASTE's student is REPA's SiT
    repa_model = RepaSiT()
    repa_model.load_state_dict(back["ema"])
    assert torch.equal(repa_model.x_embedder.proj.weight, model.x_embedder.weight)
    with pytest.raises(UsageError) as e:
        export_repa_checkpoint(tmp_path / "reg", tmp_path / "reg.pt")
    assert str(e.value).endswith("is a flat model trained with --method reg; REPA's code runs flat SiTs trained with "
                                 "--method repa, haste")
    assert not (tmp_path / "reg.pt").exists()


def _imported_card_run(tmp_path: Path) -> Path:
    """A one-file run imported from a bare REPA EMA checkpoint (only ``ema``, like a release)."""
    torch.manual_seed(2)
    src = tmp_path / "release.pt"
    torch.save({"ema": RepaSiT().state_dict()}, src)
    return import_repa_checkpoint(src, tmp_path / "release-run", ImportOptions(vae="tiny", encoder_depth=ENC_DEPTH, num_heads=HEADS))


def test_an_ema_only_release_imports_as_an_ema_checkpoint(tmp_path: Path) -> None:
    path = _imported_card_run(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ema-step-00000000.pt", "ema-step-00000000.pt.sha256"]
    assert load_checkpoint(path).kind == "ema"


def _edited(repa: dict, tmp_path: Path, edit) -> Path:
    ckpt = {k: (dict(v) if isinstance(v, dict) else v) for k, v in repa["ckpt"].items()}
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["ema"].__setitem__("blocks.0.attn.extra", torch.zeros(3)),
     "['ema'] does not fit a SiT: 1 unknown key(s): blocks.0.attn.extra"),
    (lambda c: c["model"].pop("blocks.1.mlp.fc2.bias"),
     "['model'] does not fit a SiT: 1 missing key(s): blocks.1.mlp.fc2.bias"),
    (lambda c: c["ema"].__setitem__("final_layer.linear.bias", torch.zeros(5)),
     "['ema'] does not fit a SiT: 1 mismatched key(s): final_layer.linear.bias (5,) (expected (16,))"),
    (lambda c: [c["ema"].__setitem__(f"extra.{i}", torch.zeros(1)) for i in range(7)],
     "['ema'] does not fit a SiT: 7 unknown key(s): extra.0, extra.1, extra.2, extra.3, extra.4, ... (7 in all)"),
    (lambda c: c["ema"].pop("x_embedder.proj.weight"), "['ema'] does not fit a SiT: missing key x_embedder.proj.weight"),
    (lambda c: c.pop("ema"), "holds no 'ema' weights (entries: model, opt, args, steps)"),
    (lambda c: c.__setitem__("args", _repa_args(num_classes=10)),
     "['ema']: y_embedder.embedding_table has 5 rows, expected 10 classes and the null class"),
])
def test_keys_that_do_not_fit_are_refused_by_name(repa: dict, tmp_path: Path, edit, message: str) -> None:
    path = _edited(repa, tmp_path, edit)
    with pytest.raises(UsageError) as info:
        import_repa_checkpoint(path, tmp_path / "run", OPTS)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


class _Payload:
    """A pickled object that is not a tensor: a weights-only load must refuse it."""


def test_hostile_and_foreign_files_are_refused(repa: dict, tmp_path: Path, run_cli) -> None:
    bad = tmp_path / "code.pt"
    torch.save({"ema": {}, "x": _Payload()}, bad)
    with pytest.raises(UsageError, match=r"is not a readable REPA checkpoint \(Weights only load failed"):
        import_repa_checkpoint(bad, tmp_path / "run")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _out, err = run_cli(["import-ckpt", str(repa["path"]), str(busy), "--vae", "tiny", "--num-heads", "4"])
    assert code == 2 and err == f"error: {busy} exists and is not an empty folder; pass a new run folder\n"
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_import_and_export(repa: dict, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli(["import-ckpt", str(repa["path"]), str(tmp_path / "run"), "--vae", "tiny",
                              "--num-heads", str(HEADS), "--teacher", "dinov2-vit-b", "--teacher", "other"])
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'run' / 'checkpoints' / 'ema-step-00000002.pt'} (depth 3, width 64, "
                          "encoder depth 2, 4 classes, projectors [32, 16])")
    code, out, err = run_cli(["export-ckpt", str(tmp_path / "run"), str(tmp_path / "x.pt")])
    assert code == 0 and out == f"wrote {tmp_path / 'x.pt'}\n"
    code, out, err = run_cli(["export-ckpt", str(tmp_path / "run"), str(tmp_path / "x.pt")])
    assert code == 2 and err == f"error: {tmp_path / 'x.pt'} exists; pass a new file name\n"
    code, out, err = run_cli(["import-ckpt", str(repa["path"]), str(tmp_path / "r2"), "--teacher", "one"])
    assert code == 2 and "depth 3, width 64 is no named SiT size, so the number of attention heads is unknown; " \
        "pass --num-heads" in err
    code, out, err = run_cli(["import-ckpt", str(repa["path"]), str(tmp_path / "r2"), "--teacher", "one",
                              "--num-heads", "4"])
    assert code == 2 and "has 2 projector(s) (dims [32, 16]); --teacher was given 1 time(s)" in err


def test_the_earlier_decoder_blocks_layout_gives_its_encoder_depth(repa: dict, tmp_path: Path) -> None:
    """REPA's earlier files name the blocks after the projectors ``decoder_blocks.i`` (its
    ``generate.py --legacy`` renames them ``blocks.(i + encoder_depth)``)."""
    def legacy(key: str) -> str:
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= ENC_DEPTH:
            return ".".join(["decoder_blocks", str(int(parts[1]) - ENC_DEPTH), *parts[2:]])
        return key

    old = {legacy(k): v for k, v in repa["ckpt"]["ema"].items()}
    assert "decoder_blocks.0.attn.qkv.weight" in old and "blocks.2.attn.qkv.weight" not in old
    src = tmp_path / "legacy.pt"
    torch.save({"ema": old}, src)
    path = import_repa_checkpoint(src, tmp_path / "run", OPTS)
    ckpt = load_checkpoint(path)
    assert ckpt.card.model["encoder_depth"] == ENC_DEPTH and ckpt.card.model["depth"] == DEPTH
    for key, value in repa["ckpt"]["ema"].items():
        assert torch.equal(ckpt.ema[key.replace("x_embedder.proj.", "x_embedder.")], value), key
    with pytest.raises(UsageError, match=r"is in REPA's earlier layout with 2 encoder blocks; --encoder-depth 1 contradicts it$"):
        import_repa_checkpoint(src, tmp_path / "run2", ImportOptions(vae="tiny", num_heads=HEADS, encoder_depth=1))


def test_a_file_declaring_too_many_blocks_is_refused(tmp_path: Path) -> None:
    sd = RepaSiT().state_dict()
    sd.update({f"blocks.{i}.norm.weight": torch.zeros(1) for i in range(DEPTH, 300)})
    src = tmp_path / "many.pt"
    torch.save({"ema": sd}, src)
    with pytest.raises(UsageError, match=r"\['ema'\] declares 300 blocks; at most 256 are read$"):
        import_repa_checkpoint(src, tmp_path / "run", OPTS)


def test_a_named_size_gives_the_heads_and_a_default_encoder_depth(caplog: pytest.LogCaptureFixture) -> None:
    """SiT-XL/2's shapes (meta tensors: no memory) identify the size, hence 16 heads; the encoder
    depth comes from args, else the size's default with a warning."""
    from repa_cache.train.interop import infer_config
    from repa_cache.train.model import sit_config

    want = sit_config("SiT-XL/2", z_dims=(768, 1024))
    with torch.device("meta"):
        sd = SiT(want).state_dict()
    assert infer_config(sd, {"encoder_depth": 6}, ImportOptions(), "f") == dataclasses.replace(want, encoder_depth=6)
    with caplog.at_level("WARNING"):
        assert infer_config(sd, {}, ImportOptions(), "f") == want
    assert "f records no encoder depth; assuming 8 (the SiT-XL/2 default)" in caplog.text


def test_a_patch_1_release_on_f16d32_latents_round_trips(tmp_path: Path) -> None:
    """REPA-E's SiT/1 releases: 32 latent channels on a 16x16 grid, one token per latent."""
    torch.manual_seed(1)
    model, ema = RepaSiT(latent=16, patch=1, channels=32), RepaSiT(latent=16, patch=1, channels=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    v, zs = model(torch.randn(2, 32, 16, 16), torch.rand(2), torch.tensor([0, 3]))
    (v.square().mean() + sum(z.square().mean() for z in zs)).backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": _repa_args(), "steps": 1}
    torch.save(ckpt, tmp_path / "0000001.pt")
    run = tmp_path / "run"
    import_repa_checkpoint(tmp_path / "0000001.pt", run, OPTS)
    loaded = load_checkpoint(latest_checkpoint(run))
    cfg = SiTConfig(**loaded.card.model)
    assert (cfg.patch_size, cfg.in_channels, cfg.input_size, cfg.num_tokens) == (1, 32, 16, 256)
    back = _load(export_repa_checkpoint(run, tmp_path / "back.pt"))
    for name in ("model", "ema"):
        assert list(back[name]) == list(ckpt[name])
        for key, value in ckpt[name].items():
            assert torch.equal(back[name][key], value), key
    for i, state in ckpt["opt"]["state"].items():
        assert all(torch.equal(back["opt"]["state"][i][k], state[k]) for k in state)
    # and our student computes what REPA's module computes on the same weights
    x, t, y = torch.randn(2, 32, 16, 16), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        want, _ = ema(x, t, y)
        got, _ = load_student(run).model(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the latent normalisation of the VAE the release was trained on, from that VAE's config
    assert loaded.card.norm == LatentNorm((0.18215,), (0.0,))
    import_repa_checkpoint(tmp_path / "0000001.pt", tmp_path / "f16", dataclasses.replace(OPTS, vae="tiny-f16", latent_norm="vae"))
    assert load_checkpoint(latest_checkpoint(tmp_path / "f16")).card.norm == latent_norm(vae_config(VAESpec("tiny-f16")))
    with pytest.raises(UsageError, match=r"takes 32 latent channels but VAE 'tiny' has 4$"):
        import_repa_checkpoint(tmp_path / "0000001.pt", tmp_path / "f8", dataclasses.replace(OPTS, latent_norm="vae"))
    with pytest.raises(UsageError, match=r"^--latent-norm must be repa or vae, not 'sd'$"):
        import_repa_checkpoint(tmp_path / "missing.pt", tmp_path / "f8", dataclasses.replace(OPTS, latent_norm="sd"))


def test_sit_xl_1_on_f16d32_latents_is_named_from_its_shapes() -> None:
    """REPA-E's E2E-VAVAE + SiT-XL/1 release: the shapes alone give the size (meta tensors)."""
    from repa_cache.train.interop import infer_config
    from repa_cache.train.model import sit_config

    want = sit_config("SiT-XL/1", input_size=16, in_channels=32, z_dims=(768,))
    with torch.device("meta"):
        sd = SiT(want).state_dict()
    assert infer_config(sd, {"encoder_depth": 8}, ImportOptions(), "f") == want
    assert (want.num_tokens, want.hidden_size, want.depth, want.num_heads) == (256, 1152, 28, 16)
