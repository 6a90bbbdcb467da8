"""The cache's read side stands on its own: it finds shards and records through cache.layout and
never imports the write side."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import HUNG


def test_read_side_does_not_import_the_writer() -> None:
    read_side = ["reader", "verify", "stats", "copy", "wds"]
    code = "; ".join(
        ["import sys", *(f"import repa_cache.cache.{m}" for m in read_side), "print('repa_cache.cache.writer' in sys.modules)"]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=HUNG)
    assert out.stdout.strip() == "False", f"a read-side module imports repa_cache.cache.writer:\n{out.stdout}{out.stderr}"
