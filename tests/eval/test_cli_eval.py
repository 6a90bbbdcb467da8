"""The evaluation commands through the real CLI entry point: bad input is one line and exit 2."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--ckpt", "NOPE", "--out", "OUT"], "error: no checkpoint or run folder at NOPE"),
        (["sample", "--ckpt", "FILE", "--out", "OUT"], "error: FILE is not a checkpoint of this tool"),
        (["sample", "--ckpt", "FILE", "--out", "OUT", "--guidance-interval", "0.5,2"], "error: --guidance-interval must lie within [0, 1], got 0.5,2"),
        (["sample", "--ckpt", "FILE", "--out", "OUT", "--guidance-interval", "0.7,0.2"], "error: --guidance-interval needs LOW <= HIGH, got 0.7,0.2"),
        (["fid", "NOPE", "NOPE"], "error: no such samples npz or image folder: NOPE"),
        (["align", "--ckpt", "NOPE"], "error: no checkpoint or run folder at NOPE"),
    ],
)
def test_bad_eval_input_exits_2_with_one_line(args, message, tmp_path, run_cli):
    (tmp_path / "file.pt").write_bytes(b"not a checkpoint")
    subst = {"NOPE": str(tmp_path / "missing"), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file.pt")}
    code, _, err = run_cli([subst.get(a, a) for a in args])
    for k, v in subst.items():
        message = message.replace(k, v)
    assert code == 2, err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
