"""Reading a ``torch.save`` file a user hands us: ``weights_only`` (no pickled code runs; only
tensors, containers and the classes named in ``allowed``) and memory-mapped, so a huge file costs
no memory until its tensors are used. Files in the layout before zip archives cannot be mapped;
they are read whole, still with ``weights_only``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_weights_file"]


def load_weights_file(path: str | Path, allowed: Sequence[type] = ()) -> Any:
    """The object ``torch.save`` wrote to ``path``, read without running code.

    Raises:
        Whatever ``torch.load`` raises for a damaged, foreign or code-carrying file; callers turn
        it into one line naming the file.
    """
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # not a zip archive: read whole
