"""A teacher array added through the field table: the register tokens of a registry teacher,
stored by ``repa precompute --registers`` and delivered to the training step under their own name."""

from __future__ import annotations

import numpy as np
import torch

from repa_cache.cache.format import LatentNorm
from repa_cache.cache.reader import CacheReader, group_meta
from repa_cache.pipeline.groups import teacher_group_meta
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages.teachers import get_teacher, load_teacher
from repa_cache.train.data import CacheBatches, DataConfig, to_device

from ..conftest import tiny_config
from .test_precompute import _shard_crops, timm_tokens


def test_registers_are_stored_and_reach_the_step(demo_images, tmp_path, run_cli):
    out = tmp_path / "c"
    precompute(tiny_config(demo_images, out, teachers=("tiny-reg", "tiny"), registers=True))
    reader = CacheReader(out)
    assert reader.array_names("teachers/tiny-reg") == ["patch", "cls", "registers"]
    assert reader.array_names("teachers/tiny") == ["patch", "cls"]  # no register tokens: nothing to store

    # the final-norm tokens after CLS and before the patch tokens, per view
    spec = get_teacher("tiny-reg")
    model = load_teacher(spec, 256)
    idx, crops = _shard_crops(reader, demo_images, 0)
    got = reader.read(idx)
    for v, images in enumerate([crops, crops.flip(-1)]):
        tokens = timm_tokens(model, spec, images)  # (B, 1 + 4 + 256, 48)
        np.testing.assert_array_equal(got["teachers/tiny-reg/registers"][:, v], tokens[:, 1:5].half().numpy())
        np.testing.assert_array_equal(got["teachers/tiny-reg/patch"][:, v], tokens[:, 5:].half().numpy())

    # a group made without --registers has the metadata and fingerprint it always had
    plain = teacher_group_meta(reader.meta, "tiny-reg", "float16")
    assert [a.name for a in plain.arrays] == ["patch", "cls"] and "registers" not in plain.fingerprint["model"]
    assert group_meta(out, "teachers/tiny-reg").fingerprint_hash != plain.fingerprint_hash

    # extending the cache without the flag keeps them; a step that reads them gets them as StepBatch.registers
    code, _, err = run_cli(["precompute", str(demo_images), str(out), "--vae", "tiny", "--teacher", "tiny-reg", "--device", "cpu",
                            "--workers", "1", "-q"])
    assert code == 0, err
    ds = CacheBatches(DataConfig(str(out), ("tiny-reg",), 4, teacher_fields=((0, ("patch", "registers")),), num_workers=0))
    raw = ds[0]
    batch = to_device(raw, LatentNorm((1.0,), (0.0,)), ("tiny-reg",), torch.device("cpu"), ds.codecs)
    assert [t.shape for t in batch.registers] == [(4, 4, 48)] and batch.cls == []
    assert torch.equal(batch.registers[0], raw["teachers/tiny-reg/registers"].float())
