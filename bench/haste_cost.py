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
the two methods' steps alternate, and the first ``--warmup`` of each are not timed. ``--flops``
counts the FLOPs of each step (forward and backward) and of the teacher blocks, which do not
depend on the machine's load. Also printed: the hidden tokens' bytes per view in
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

import torch
from common import count_step_flops, sync  # type: ignore[import-not-found]  # run as python bench/haste_cost.py
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from repa_cache.stages.devices import resolve_device
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.teachers import get_teacher, load_teacher, parse_layers, teacher_metadata
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.model import sit_config
from repa_cache.train.step import build_trainer, train_step


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
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs per image only (no timing), one trainer at a time")
    ap.add_argument("--flops", action="store_true", help="also count the FLOPs per image of each step and of the teacher blocks")
    args = ap.parse_args()

    device = resolve_device(args.device)
    spec = get_teacher(args.teacher)
    record = teacher_metadata(spec, args.resolution, layers=parse_layers(args.layers))
    teacher = load_teacher(spec, args.resolution, device=device, pretrained=False)  # random weights, real shapes
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
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model, "teacher": args.teacher, "teacher_blocks": args.layers, "batch_size": B,
        "student_blocks": f"{blocks[0]}-{blocks[-1]}", "heads_aligned": heads,
        "hidden_kib_per_view_float16": P * record["dim"] * 2 / 1024,
        "attention_maps_mib_per_view_float16": (record["hidden"]["last_block"] - record["hidden"]["first_block"] + 1)
        * record["hidden"]["heads"] * (T + record["num_prefix_tokens"]) ** 2 * 2 / 2**20,
    }

    def trainer(name: str) -> Any:
        method = make_method(name)
        method.bind(context)
        if name == "haste":
            method.attach_teacher(teacher)  # type: ignore[attr-defined]
        return build_trainer(mcfg, device, method=method, precision=args.precision)

    if args.flops_only:  # one trainer at a time: SiT-XL/2's two trainers do not fit a small machine's memory
        flops = {}
        for name in ("repa", "haste"):
            tr = trainer(name)
            flops[name] = {"gflop_per_img": count_step_flops(tr, batch) / B / 1e9}
            del tr
        flops["haste_over_repa_flops"] = flops["haste"]["gflop_per_img"] / flops["repa"]["gflop_per_img"]
        print(json.dumps({"info": info, "results": flops}, indent=1))
        return
    trainers = {name: trainer(name) for name in ("repa", "haste")}
    tail = trainers["haste"].method._tail  # type: ignore[attr-defined]
    assert tail is not None

    def run(name: str, i: int) -> None:
        if name == "tail":
            tail(batch.hidden[0])
            return
        torch.manual_seed(i)
        train_step(trainers[name], batch, i).loss.item()

    # the steps alternate, so that a change of load on a shared machine hits both methods alike
    times: dict[str, list[float]] = {"repa": [], "haste": [], "tail": []}
    for i in range(args.warmup + args.steps):
        for name in times:
            sync(device)
            t0 = time.perf_counter()
            run(name, i)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    results: dict[str, Any] = {name: {"step_s": statistics.median(ts)} for name, ts in times.items()}
    for name in ("repa", "haste"):
        results[name]["img_per_s"] = B / results[name]["step_s"]
    if args.flops:
        for name, tr in trainers.items():
            results[name]["gflop_per_img"] = count_step_flops(tr, batch) / B / 1e9
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            tail(batch.hidden[0])
        results["tail"]["gflop_per_img"] = fc.get_total_flops() / B / 1e9
        results["haste_over_repa_flops"] = results["haste"]["gflop_per_img"] / results["repa"]["gflop_per_img"]
    results["haste_over_repa"] = results["haste"]["step_s"] / results["repa"]["step_s"]
    print(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
