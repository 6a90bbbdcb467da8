"""What HASTE's attention alignment costs per training step, against plain REPA.

Same student, batch, precision and device; inputs are random tensors already on the device (no
data loading), so the difference is the method alone:

* ``repa``: the REPA step (``--method repa``);
* ``haste``: the HASTE step: the student's aligned blocks written out to return their attention
  logits, the teacher's blocks FIRST..LAST run on the hidden tokens (the teacher built from its
  timm config with random weights: same shapes and FLOPs as the real one), the attention
  cross-entropy;
* ``tail``: the teacher's blocks alone (forward, no gradient), the part HASTE adds outside the student.

Each step is the trainer's own (``train.step.train_step``), timed with a device sync at its end;
the first ``--warmup`` steps are not timed. Also printed: the hidden tokens' bytes per view in
float16 (what the cache stores instead of the attention maps).

Examples::

    python bench/haste_cost.py                                          # CPU: SiT-B/2 vs DINOv2-B blocks 9-12, batch 4
    python bench/haste_cost.py --device cuda --model SiT-XL/2 --batch-size 256
    python bench/haste_cost.py --model SiT-tiny/2 --teacher tiny --layers 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import timm
import torch

from repa_cache.stages.devices import resolve_device
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.teachers import get_teacher, load_teacher, parse_layers, teacher_input_size, teacher_metadata
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.model import sit_config
from repa_cache.train.step import build_trainer, train_step


def _teacher(name: str, resolution: int, device: torch.device) -> torch.nn.Module:
    """The teacher with random weights: the tiny one from its seed, a real one from its timm config."""
    spec = get_teacher(name)
    if spec.tiny:
        return load_teacher(spec, resolution, device=device)
    model = timm.create_model(spec.timm_id, pretrained=False, num_classes=0, img_size=teacher_input_size(spec, resolution))
    return model.to(device).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, warmup: int, steps: int) -> list[float]:
    out = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SiT-B/2")
    ap.add_argument("--teacher", default="dinov2-vit-b")
    ap.add_argument("--layers", default="9-12", help="teacher blocks FIRST-LAST, 1-based (as precompute --teacher-layers)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    spec = get_teacher(args.teacher)
    record = teacher_metadata(spec, args.resolution, layers=parse_layers(args.layers))
    teacher = _teacher(args.teacher, args.resolution, device)
    context = CacheContext((args.teacher,), {args.teacher: record}, {args.teacher: state_dict_sha256(teacher)}, args.resolution)
    mcfg = sit_config(args.model, z_dims=(record["dim"],), num_classes=1000, input_size=args.resolution // 8)
    B, T, P = args.batch_size, record["num_tokens"], record["hidden"]["num_tokens"]
    g = torch.Generator(device=device).manual_seed(0)
    batch = StepBatch(torch.randn(B, mcfg.in_channels, mcfg.input_size, mcfg.input_size, device=device, generator=g),
                      torch.randint(0, 1000, (B,), device=device, generator=g),
                      [torch.randn(B, T, record["dim"], device=device, generator=g)], [],
                      [torch.randn(B, P, record["dim"], device=device, generator=g)])

    probe = make_method("haste")
    probe.bind(context)
    blocks, heads = probe.student_blocks(mcfg)  # type: ignore[attr-defined]
    results: dict[str, Any] = {}
    for name in ("repa", "haste"):
        method = make_method(name)
        method.bind(context)
        if name == "haste":
            method.attach_teacher(teacher)  # type: ignore[attr-defined]
        tr = build_trainer(mcfg, device, method=method, precision=args.precision)

        def step(i: int, tr: Any = tr) -> None:
            torch.manual_seed(i)
            train_step(tr, batch, i).loss.item()

        times = _time(step, device, args.warmup, args.steps)
        results[name] = {"step_s": statistics.median(times), "img_per_s": B / statistics.median(times)}
        if name == "haste":
            tail = method._tail  # type: ignore[attr-defined]
            assert tail is not None

            def run_tail(i: int, tail: Any = tail) -> None:
                tail(batch.hidden[0])

            results["tail"] = {"step_s": statistics.median(_time(run_tail, device, args.warmup, args.steps))}
        del tr
    results["haste_over_repa"] = results["haste"]["step_s"] / results["repa"]["step_s"]
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model, "teacher": args.teacher, "teacher_blocks": args.layers, "batch_size": B,
        "student_blocks": f"{blocks[0]}-{blocks[-1]}", "heads_aligned": heads,
        "hidden_kib_per_view_float16": P * record["dim"] * 2 / 1024,
        "attention_maps_mib_per_view_float16": (record["hidden"]["last_block"] - record["hidden"]["first_block"] + 1)
        * record["hidden"]["heads"] * (T + record["num_prefix_tokens"]) ** 2 * 2 / 2**20,
    }
    print(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
