"""Checkpoints of the public REPA code (github.com/sihyun-yu/REPA), read and written.

REPA's ``train.py`` saves ``{"model", "ema", "opt", "args", "steps"}``: the two state dicts of
its ``models/sit.py`` SiT, the AdamW state, the ``argparse.Namespace`` of the run and the step;
its ``generate.py`` reads ``["ema"]`` only. Its SiT has the same layers as ours under the same
names except the patch embedding, a timm ``PatchEmbed`` (``x_embedder.proj.weight``, ours
``x_embedder.weight``); timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``) and ``Mlp``
(``fc1``, ``fc2``) match ours name for name, as do the projectors (``projectors.i.{0,2,4}``) and
the final layer. Its fixed position embedding is a frozen ``nn.Parameter`` (ours a buffer), so it
is the first entry of its parameter list and of its optimiser's parameter indices.

:func:`import_repa_checkpoint` turns such a file into a run folder of ours that ``repa sample``
reads (the shape comes from the tensors; the number of heads and the encoder depth, which no
tensor shape fixes, from the run's ``args`` or from options); :func:`export_repa_checkpoint` writes
one of our checkpoints in REPA's layout. Both refuse keys that do not fit, naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.cache.storage import atomic_file
from repa_cache.stages.vae_presets import TINY_VAES, canonical_vae
from repa_cache.stages.weights import load_weights_file
from repa_cache.train.checkpoint import (
    ModelCard,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_state_dicts,
    strip_wrapper_prefixes,
)
from repa_cache.train.methods import METHODS, method_from_card
from repa_cache.train.model import SIT_SIZES, SiT, SiTConfig
from repa_cache.train.student import card_config

log = logging.getLogger(__name__)

#: REPA's latent normalisation (``latents_scale`` 0.18215, ``latents_bias`` 0 in train.py and generate.py).
REPA_LATENT_NORM = LatentNorm((0.18215,), (0.0,))
#: ``--latent-norm`` of an import: REPA's scale, or the named VAE's config (:class:`ImportOptions`).
LATENT_NORMS = ("repa", "vae")
#: Key prefixes that differ: REPA's (timm ``PatchEmbed``) -> ours (a bare ``Conv2d``).
_RENAMES = (("x_embedder.proj.", "x_embedder."),)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LEGACY_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.")
_PROJECTOR = re.compile(r"^projectors\.(\d+)\.")
#: Most names listed in a refusal; the count says how many there were.
_MAX_NAMES = 5
#: Most blocks and projectors a file may declare (SiT-XL has 28 blocks; REPA uses 1-2 projectors).
MAX_BLOCKS, MAX_PROJECTORS = 256, 16


@dataclass(frozen=True)
class ImportOptions:
    """What a REPA checkpoint does not say about itself.

    Attributes:
        teachers: teacher names in projector order (empty: unknown).
        vae: the VAE whose latents the model was trained on, recorded in the model card. REPA
            encodes with ``stabilityai/sd-vae-ft-mse`` and its ``generate.py`` decodes with
            ``sd-vae-ft-ema`` by default; the two share the encoder (only the decoder was
            fine-tuned), so the latents are the same and the default is the decoder REPA samples with.
        encoder_depth: block the projectors read; default: the run's ``args``, else the size's default.
        num_heads: attention heads; default: the run's ``args`` model name, else the named size
            with the same depth and width.
        path: the interpolant; default: the run's ``args.path_type``, else linear.
        latent_norm: ``repa``: SD-VAE's scale 0.18215, as REPA trains; ``vae``: the normalisation
            ``vae``'s config asks for (per-channel statistics for REPA-E's E2E-VAEs), which needs
            that config (a preset, a local folder, or the hub).
    """

    teachers: tuple[str, ...] = ()
    vae: str = "stabilityai/sd-vae-ft-ema"
    encoder_depth: int | None = None
    num_heads: int | None = None
    path: str | None = None
    latent_norm: str = "repa"


# --------------------------------------------------------------------------------------------
# key names


def to_ours(key: str) -> str:
    """REPA state-dict key -> ours."""
    for theirs, ours in _RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def to_repa(key: str) -> str:
    """Our state-dict key -> REPA's."""
    for theirs, ours in _RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_NAMES else "")


def check_keys(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str,
               rename: Any = to_repa) -> None:
    """Refuse a state dict whose keys or shapes differ from ``want`` (both in our names), naming
    the keys in the file's own names (``rename`` maps ours to them).

    Raises:
        UsageError: one line listing the unknown, missing and mismatched keys (first few and count).
    """
    unknown = sorted(rename(k) for k in got.keys() - want.keys())
    missing = sorted(rename(k) for k in want.keys() - got.keys())
    bad = sorted(f"{rename(k)} {tuple(got[k].shape)} (expected {tuple(want[k].shape)})"
                 for k in got.keys() & want.keys() if tuple(got[k].shape) != tuple(want[k].shape))
    parts = [f"{len(v)} {what} key(s): {_names(v)}" for what, v in
             (("unknown", unknown), ("missing", missing), ("mismatched", bad)) if v]
    if parts:
        raise UsageError(f"{where} does not fit a SiT: {'; '.join(parts)}")


# --------------------------------------------------------------------------------------------
# reading a REPA file


def _load_repa(src: Path) -> dict[str, Any]:
    """A REPA checkpoint read without running code from it (``args`` is an ``argparse.Namespace``,
    the one class besides tensors that is allowed)."""
    if not src.is_file():
        raise UsageError(f"no checkpoint file at {src}")
    try:
        state = load_weights_file(src, allowed=[argparse.Namespace])
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or code-carrying: all refused
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"{src} is not a readable REPA checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{src} is not a REPA checkpoint (it holds a {type(state).__name__}, not a dict)")
    if "format" in state and "card" in state:
        raise UsageError(f"{src} is already a checkpoint of this tool")
    for name in ("ema", "model"):
        value = state.get(name)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())):
            raise UsageError(f"{src}: '{name}' is not a state dict of tensors")
    if state.get("ema") is None:
        raise UsageError(f"{src} holds no 'ema' weights (entries: {', '.join(map(str, state)) or 'none'})")
    return state


def _args(state: dict[str, Any]) -> dict[str, Any]:
    args = state.get("args")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def _tensor(sd: dict[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Tensor:
    if key not in sd:
        raise UsageError(f"{where} does not fit a SiT: missing key {to_repa(key)}")
    if sd[key].ndim != ndim:
        raise UsageError(f"{where} does not fit a SiT: {to_repa(key)} has shape {tuple(sd[key].shape)}, expected {ndim} dims")
    return sd[key]


def _count(sd: dict[str, torch.Tensor], pattern: re.Pattern[str], what: str, where: str, limit: int = MAX_BLOCKS) -> int:
    """How many numbered modules (``blocks.N``, ``projectors.N``) there are; they must be 0..n-1."""
    found = sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})
    if len(found) > limit:
        raise UsageError(f"{where} declares {len(found)} {what}; at most {limit} are read")
    if found != list(range(len(found))):
        raise UsageError(f"{where} does not fit a SiT: {what} are numbered {_names([str(i) for i in found])}, "
                         f"not 0..{len(found) - 1}")
    return len(found)


def _legacy_renames(keys: list[str], where: str) -> tuple[dict[str, str], int | None]:
    """REPA's earlier layout kept the blocks after the projectors as ``decoder_blocks.i``, which its
    ``generate.py --legacy`` renames to ``blocks.(i + encoder_depth)``; there the encoder depth is
    the number of ``blocks.N``. Returns the renames and that depth (None for the current layout)."""
    if not any(_LEGACY_BLOCK.match(k) for k in keys):
        return {}, None
    probe = dict.fromkeys(keys, torch.empty(0))
    depth = _count(probe, _BLOCK, "blocks", where)
    _count(probe, _LEGACY_BLOCK, "decoder_blocks", where)
    renames = {}
    for k in keys:
        if m := _LEGACY_BLOCK.match(k):
            renames[k] = f"blocks.{int(m.group(1)) + depth}.{k[m.end():]}"
    return renames, depth


def _size_name(depth: int, hidden: int, patch: int) -> str | None:
    """The named size (``"SiT-XL/2"``) of a shape, or None."""
    return next((name for name, s in SIT_SIZES.items()
                 if (s["depth"], s["hidden_size"], s["patch_size"]) == (depth, hidden, patch)), None)


def infer_config(sd: dict[str, torch.Tensor], args: dict[str, Any], opts: ImportOptions, where: str) -> SiTConfig:
    """Our config of a REPA SiT from the shapes of its tensors (in our key names), with the
    number of heads and the encoder depth from ``args`` or ``opts`` (no shape fixes them)."""
    patch = _tensor(sd, "x_embedder.weight", 4, where)  # (D, C, P, P)
    hidden, channels, p, p2 = patch.shape
    if p != p2:
        raise UsageError(f"{where}: the patch embedding is {p}x{p2}, not square")
    tokens = _tensor(sd, "pos_embed", 3, where).shape[1]  # (1, T, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UsageError(f"{where}: pos_embed has {tokens} tokens, not a square grid")
    depth = _count(sd, _BLOCK, "blocks", where)
    num_proj = _count(sd, _PROJECTOR, "projectors", where, MAX_PROJECTORS)
    if depth == 0:
        raise UsageError(f"{where} does not fit a SiT: it has no blocks.N keys")
    fc1 = _tensor(sd, "blocks.0.mlp.fc1.weight", 2, where)  # (D * ratio, D)
    labels = _tensor(sd, "y_embedder.embedding_table.weight", 2, where)  # (classes + 1, D)
    z_dims = tuple(int(_tensor(sd, f"projectors.{i}.4.weight", 2, where).shape[0]) for i in range(num_proj))
    projector_dim = int(_tensor(sd, "projectors.0.0.weight", 2, where).shape[0]) if num_proj else 1
    named = args.get("model") if isinstance(args.get("model"), str) else None
    size = named if named in SIT_SIZES else _size_name(depth, hidden, p)
    num_heads = opts.num_heads
    if num_heads is None and "blocks.0.attn.q_norm.weight" in sd:
        num_heads = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]  # (K,): heads = D / K
    if num_heads is None and size is not None:
        num_heads = SIT_SIZES[size]["num_heads"]
    if num_heads is None:
        raise UsageError(f"{where}: depth {depth}, width {hidden} is no named SiT size, so the number of "
                         "attention heads is unknown; pass --num-heads")
    encoder_depth = opts.encoder_depth
    if encoder_depth is None and isinstance(args.get("encoder_depth"), int):
        encoder_depth = args["encoder_depth"]
    if encoder_depth is None:
        if size is None:
            raise UsageError(f"{where} records no encoder depth and is no named SiT size; pass --encoder-depth")
        encoder_depth = SIT_SIZES[size]["encoder_depth"]
        log.warning("%s records no encoder depth; assuming %d (the %s default); pass --encoder-depth if it "
                    "differs", where, encoder_depth, size)
    num_classes = int(labels.shape[0]) - 1
    if isinstance(args.get("num_classes"), int) and args["num_classes"] != num_classes:
        raise UsageError(f"{where}: y_embedder.embedding_table has {labels.shape[0]} rows, expected "
                         f"{args['num_classes']} classes and the null class (trained without label dropout?)")
    try:
        return SiTConfig(
            input_size=grid * p, patch_size=p, in_channels=channels, hidden_size=hidden, depth=depth,
            num_heads=num_heads, mlp_ratio=fc1.shape[0] / hidden, num_classes=num_classes,
            encoder_depth=encoder_depth, projector_dim=projector_dim, z_dims=z_dims,
            qk_norm="blocks.0.attn.q_norm.weight" in sd)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


def _expected(config: SiTConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """State dict of our SiT of ``config`` (on the meta device: shapes only) and its parameter
    names in ``parameters()`` order, which is the optimiser's index order."""
    with torch.device("meta"):
        model = SiT(config)
    return model.state_dict(), [name for name, _ in model.named_parameters()]


def _repa_param_order(ours: list[str]) -> list[str]:
    """REPA's parameter names in ``parameters()`` order: its own ``pos_embed`` parameter first,
    then the sub-modules in the same order as ours."""
    return ["pos_embed", *(to_repa(k) for k in ours)]


def _remap_optimizer(opt: Any, order_from: list[str], order_to: list[str], where: str) -> dict[str, Any]:
    """An AdamW state dict renumbered from one parameter order to another (both as names). REPA's
    frozen ``pos_embed`` is a parameter there and not here: dropped on the way in (it has no state,
    as it never gets a gradient), added to the first group without state on the way out."""
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise UsageError(f"{where}: the optimiser state is not a torch optimiser state dict")
    indices = [i for g in opt["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    if sorted(indices) != list(range(len(order_from))):
        raise UsageError(f"{where}: the optimiser state has {len(indices)} parameters, the model {len(order_from)}")
    target = {name: i for i, name in enumerate(order_to)}
    new_index = {i: target[name] for i, name in enumerate(order_from) if name in target}
    dropped = [order_from[i] for i in opt["state"] if i not in new_index]
    if dropped:
        log.warning("%s: optimiser state of %s not carried over", where, _names(dropped))
    groups = [{**g, "params": [new_index[i] for i in g["params"] if i in new_index]} for g in opt["param_groups"]]
    groups[0]["params"] += [target[name] for name in order_to if name not in set(order_from)]  # REPA's frozen pos_embed
    for g in groups:
        g["params"].sort()  # a state dict numbers parameters in order, group by group
    state = {new_index[i]: s for i, s in opt["state"].items() if i in new_index}
    return {"state": state, "param_groups": groups}


def import_repa_checkpoint(src: str | Path, out_run: str | Path, opts: ImportOptions | None = None) -> Path:
    """Write a REPA checkpoint as a run folder of ours that ``repa sample`` and ``repa align`` read.

    The EMA weights always become an EMA-only checkpoint; with REPA's ``model`` and ``opt`` also
    present, a full checkpoint holds all three. Tensors are copied unchanged (same values and
    dtypes), only renamed. The model card records the shape, REPA's latent normalisation, the VAE
    of ``opts.vae`` (no weights hash: sampling checks nothing against it), the class names ``"0"``
    ... ``"N-1"``, method ``repa`` and the interpolant; ``train`` keeps REPA's ``args``.

    Returns:
        The EMA-only checkpoint written.

    Raises:
        UsageError: the file cannot be read safely, is not a REPA SiT checkpoint, has unknown,
            missing or mismatched keys (named), or ``out_run`` is not a new or empty folder.
    """
    opts = opts or ImportOptions()
    if opts.latent_norm not in LATENT_NORMS:  # options first: before the file is read
        raise UsageError(f"--latent-norm must be {' or '.join(LATENT_NORMS)}, not '{opts.latent_norm}'")
    src, out_run = Path(src), Path(out_run)
    if out_run.exists() and (not out_run.is_dir() or any(out_run.iterdir())):
        raise UsageError(f"{out_run} exists and is not an empty folder; pass a new run folder")
    state = _load_repa(src)
    args = _args(state)
    raw_ema = strip_wrapper_prefixes(state["ema"])
    legacy, legacy_depth = _legacy_renames(list(raw_ema), f"{src} ['ema']")
    if legacy_depth is not None:
        if opts.encoder_depth not in (None, legacy_depth):
            raise UsageError(f"{src} is in REPA's earlier layout with {legacy_depth} encoder blocks; "
                             f"--encoder-depth {opts.encoder_depth} contradicts it")
        opts = dataclasses.replace(opts, encoder_depth=legacy_depth)

    def rename(key: str) -> str:
        return to_ours(legacy.get(key, key))

    ema = {rename(k): v for k, v in raw_ema.items()}
    config = infer_config(ema, args, opts, f"{src} ['ema']")
    if opts.teachers and len(opts.teachers) != len(config.z_dims):
        raise UsageError(f"{src} has {len(config.z_dims)} projector(s) (dims {list(config.z_dims)}); "
                         f"--teacher was given {len(opts.teachers)} time(s)")
    want, our_order = _expected(config)
    check_keys(ema, want, f"{src} ['ema']")
    model = optimizer = None
    if state.get("model") is not None:
        raw = strip_wrapper_prefixes(state["model"])
        model = {rename(k): v for k, v in raw.items()}
        check_keys(model, want, f"{src} ['model']")
        if state.get("opt") is not None:
            optimizer = _remap_optimizer(state["opt"], [rename(k) for k in raw], our_order, f"{src} ['opt']")
        else:
            log.warning("%s has model weights but no optimiser state; only the EMA weights are imported", src)
    step = state.get("steps", 0)
    if not isinstance(step, int) or not 0 <= step < 10**12:
        raise UsageError(f"{src}: 'steps' is {step!r}, not a step count")
    path = opts.path or args.get("path_type") or "linear"
    if path not in ("linear", "cosine"):
        raise UsageError(f"{src}: path type {path!r} is neither linear nor cosine")
    options: dict[str, Any] = {"encoder_depth": config.encoder_depth}
    if isinstance(args.get("proj_coeff"), (int, float)):
        options["proj_coeff"] = float(args["proj_coeff"])
    card = ModelCard(
        model=dataclasses.asdict(config),
        teachers=tuple(opts.teachers),
        latent_norm=_import_norm(opts, config, src).to_json(),
        vae={"id": canonical_vae(opts.vae), "revision": None, "weights_sha256": None, "tiny": opts.vae in TINY_VAES},
        class_names=tuple(str(i) for i in range(config.num_classes)),
        method={"name": "repa", "options": options},
        path=path,
        train={"imported_from": str(src.resolve()),
               "repa_args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))}},
    )
    out_run.mkdir(parents=True, exist_ok=True)
    written = save_state_dicts(out_run, step, card, ema, model, optimizer)
    log.info("imported %s (%s, step %d) into %s", src, _describe(config), step, written)
    return written


def _import_norm(opts: ImportOptions, config: SiTConfig, src: Path) -> LatentNorm:
    """The latent normalisation a release was trained with (see :class:`ImportOptions`)."""
    if opts.latent_norm == "repa":
        return REPA_LATENT_NORM
    from repa_cache.stages.vae import VAESpec, latent_norm, vae_config

    vae = vae_config(VAESpec(canonical_vae(opts.vae)))
    if int(vae["latent_channels"]) != config.in_channels:
        raise UsageError(f"{src} takes {config.in_channels} latent channels but VAE '{opts.vae}' has {vae['latent_channels']}")
    return latent_norm(vae)


def _describe(config: SiTConfig) -> str:
    name = _size_name(config.depth, config.hidden_size, config.patch_size) or f"depth {config.depth}, width {config.hidden_size}"
    return f"{name}, encoder depth {config.encoder_depth}, {config.num_classes} classes, projectors {list(config.z_dims)}"


# --------------------------------------------------------------------------------------------
# writing a REPA file


def export_repa_checkpoint(ours: str | Path, dst: str | Path) -> Path:
    """Write one of our checkpoints (a file, or a run folder's newest full checkpoint, else its
    newest weights) in REPA's layout: ``ema``, and ``model``, ``opt`` when the checkpoint has
    them, ``steps``, and ``args`` (an ``argparse.Namespace`` like REPA's ``train.py`` saves) with
    ``model``, ``num_classes``, ``encoder_depth``, ``resolution`` (latent side x 8), ``path_type``,
    ``qk_norm``, and ``projector_embed_dims`` as ``generate.py`` takes it (``"768,1024"``).

    Raises:
        UsageError: no such checkpoint, weights that do not fit the card's model, or ``dst`` exists.
    """
    dst = Path(dst)
    if dst.exists():
        raise UsageError(f"{dst} exists; pass a new file name")
    src = Path(ours)
    path = (latest_checkpoint(src) or resolve_checkpoint(src)) if src.is_dir() else resolve_checkpoint(src)
    ckpt = load_checkpoint(path)
    config = card_config(ckpt.card, path)
    method = method_from_card(ckpt.card.method)
    if not method.repa_weights or config.layout != "flat":
        able = ", ".join(name for name, m in METHODS.items() if m.repa_weights)
        raise UsageError(f"{path} is a {config.layout} model trained with --method {method.name}; REPA's code runs flat SiTs "
                         f"trained with --method {able}")
    want, our_order = _expected(config)
    repa_order = _repa_param_order(our_order)

    def convert(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        sd = strip_wrapper_prefixes(sd)
        check_keys(sd, want, f"{path} [{name}]", rename=lambda k: k)
        ordered = [to_ours(k) for k in repa_order] + [k for k in sd if k not in set(map(to_ours, repa_order))]
        return {to_repa(k): sd[k] for k in ordered}  # REPA's parameter order

    out: dict[str, Any] = {"ema": convert(ckpt.ema, "ema")}
    if ckpt.model is not None:
        out["model"] = convert(ckpt.model, "model")
    if ckpt.optimizer is not None:
        out["opt"] = _remap_optimizer(ckpt.optimizer, [to_repa(k) for k in our_order], repa_order, f"{path} [optimizer]")
    size = _size_name(config.depth, config.hidden_size, config.patch_size) or ckpt.card.train.get("model")
    out["args"] = argparse.Namespace(
        model=size, num_classes=config.num_classes, encoder_depth=config.encoder_depth,
        resolution=config.input_size * 8, path_type=ckpt.card.path, qk_norm=config.qk_norm,
        projector_embed_dims=",".join(str(z) for z in config.z_dims))
    out["steps"] = ckpt.step
    with atomic_file(dst) as f:
        torch.save(out, f)
    return dst


def describe_import(path: Path) -> str:
    """One line for ``repa import-ckpt``: what was written and how to sample from it."""
    card = load_checkpoint(path).card
    config = card_config(card, path)
    return f"wrote {path} ({_describe(config)}); sample with: repa sample --ckpt {path.parent.parent} --out DIR"
