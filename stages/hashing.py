"""Content hashes of model weights, used in cache metadata and fingerprints."""

from __future__ import annotations

import hashlib

import torch


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Return a sha256 hex digest of a module's weights.

    The digest covers every ``state_dict`` entry in sorted name order: its name, dtype, shape and
    raw bytes (copied to the CPU). Two modules hash equal exactly when they hold the same tensors
    under the same names, whatever device they live on.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(name.encode("utf-8"))
        digest.update(b"\0")
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(b"\0")
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        digest.update(b"\0")
        # A flat byte view works for every dtype (bf16 included) and for 0-d tensors.
        raw = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
