"""Training from a cache whose teacher tokens are stored as int8 (``--feature-codec int8``): the
loader ships the stored int8 values and scales, the trainer dequantises on the device, and the
batches are the float16 cache's (same samples, views and labels; tokens within the codec's bound)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repa_cache.cache.codec import Int8Codec
from repa_cache.cache.copy import copy_cache
from repa_cache.cache.format import LatentNorm
from repa_cache.train.config import TrainConfig
from repa_cache.train.data import CacheBatches, DataConfig, to_device
from repa_cache.train.loop import train


def test_int8_batches_dequantise_on_the_device_to_the_float16_batches(tiny_cache, tmp_path):
    int8 = tmp_path / "int8"
    copy_cache(tiny_cache, int8, feature_codec="int8", quiet=True)
    fields = ((0, ("cls", "patch")),)
    ref = CacheBatches(DataConfig(str(tiny_cache), ("tiny",), 8, teacher_fields=fields, num_workers=0))
    q = CacheBatches(DataConfig(str(int8), ("tiny",), 8, teacher_fields=fields, num_workers=0))
    assert ref.codecs == {"tiny": None} and q.codecs["tiny"] == Int8Codec(("patch", "cls"))
    norm = LatentNorm((1.0,), (0.0,))
    for step in range(3):
        a, b = ref[step], q[step]
        for k in ("index", "view", "label", "latents/mean", "latents/std"):
            assert torch.equal(a[k], b[k]), k
        patch, cls = b["teachers/tiny/patch"], b["teachers/tiny/cls"]
        assert patch.dtype == torch.int8 and b["teachers/tiny/patch_scale"].shape == (*patch.shape[:2], 1)
        assert cls.dtype == torch.int8 and b["teachers/tiny/cls_scale"].shape == (8, 1)
        torch.manual_seed(0)
        fa = to_device(a, norm, ("tiny",), torch.device("cpu"), ref.codecs)
        torch.manual_seed(0)
        fb = to_device(b, norm, ("tiny",), torch.device("cpu"), q.codecs)
        assert torch.equal(fa.x, fb.x)
        for x, y in ((fa.patch[0], fb.patch[0]), (fa.cls[0], fb.cls[0])):
            assert y.dtype == torch.float32 and x.shape == y.shape
            assert F.cosine_similarity(x, y, dim=-1).min() >= 0.999


def test_reg_trains_from_an_int8_cache(tiny_cache, tmp_path):
    int8 = tmp_path / "int8"
    copy_cache(tiny_cache, int8, feature_codec="int8", quiet=True)
    res = train(TrainConfig(cache=str(int8), out=str(tmp_path / "run"), model="SiT-tiny/2", method="reg", batch_size=8,
                            max_steps=2, ckpt_every=2, log_every=1, num_workers=0, device="cpu", quiet=True))
    assert res.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in res.last_metrics.values())
